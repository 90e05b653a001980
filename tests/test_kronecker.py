"""kronopt.linalg.kronecker against dense float64 numpy (ALGORITHMS §3, §7.3).

Every jax computation runs in float64 inside ``jax.enable_x64(True)``;
the oracles build ``𝓡(H)``, Kronecker products and SVDs with numpy from the
index formulas, independently of kronopt.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronopt.linalg import kronecker

M, N = 3, 4


def rearrange_oracle(h, m, n):
  """``𝓡(H)_{(i,k),(j,l)} = H_{(i,j),(k,l)}`` by explicit loops."""
  out = np.zeros((m * m, n * n))
  for i in range(m):
    for j in range(n):
      for k in range(m):
        for l in range(n):
          out[i * m + k, j * n + l] = h[i * n + j, k * n + l]
  return out


def gradients(rng, t=7, m=M, n=N):
  """``t`` gradients with correlated rows and columns (a clear top triple)."""
  a = rng.standard_normal((m, m)) + 2 * np.eye(m)
  b = rng.standard_normal((n, n)) + 2 * np.eye(n)
  return np.stack([a @ rng.standard_normal((m, n)) @ b for _ in range(t)])


def covariance(gs):
  """``H = E[g gᵀ]`` with row-major ``g = vec(G)``."""
  flat = gs.reshape(len(gs), -1)
  return flat.T @ flat / len(gs)


def test_rearrange_matches_index_formula_and_norm_identity():
  rng = np.random.default_rng(0)
  h = rng.standard_normal((M * N, M * N))
  a, b = rng.standard_normal((M, M)), rng.standard_normal((N, N))
  with jax.enable_x64(True):
    r = np.asarray(kronecker.rearrange(jnp.asarray(h), (M, N)))
  np.testing.assert_array_equal(r, rearrange_oracle(h, M, N))
  # ‖H − A⊗B‖_F = ‖𝓡(H) − vec A vec Bᵀ‖_F
  np.testing.assert_allclose(
      np.linalg.norm(h - np.kron(a, b)),
      np.linalg.norm(r - np.outer(a.reshape(-1), b.reshape(-1))), rtol=1e-12)


def test_power_step_from_identity_gives_shampoo_statistics():
  """ALGORITHMS §7.3: one step from (I, I) is (E[G Gᵀ], E[Gᵀ G])."""
  gs = gradients(np.random.default_rng(1))
  h = covariance(gs)
  with jax.enable_x64(True):
    left, right = kronecker.kronecker_power_step(
        jnp.asarray(h), jnp.eye(M), jnp.eye(N))
  np.testing.assert_allclose(left, np.mean(gs @ gs.transpose(0, 2, 1), 0),
                             rtol=1e-12)
  np.testing.assert_allclose(right, np.mean(gs.transpose(0, 2, 1) @ gs, 0),
                             rtol=1e-12)


def test_exact_kronecker_product_is_recovered():
  """ALGORITHMS §7.3: for H = A⊗B, H = L⊗R / tr H and the optimum is H."""
  rng = np.random.default_rng(2)
  a = rng.standard_normal((M, M))
  b = rng.standard_normal((N, N))
  a, b = a @ a.T, b @ b.T
  h = np.kron(a, b)
  with jax.enable_x64(True):
    hj = jnp.asarray(h)
    left, right = kronecker.kronecker_power_step(hj, jnp.eye(M), jnp.eye(N))
    opt_a, opt_b = kronecker.optimal_kronecker(hj, (M, N), num_iters=3)
  np.testing.assert_allclose(np.kron(left, right) / np.trace(h), h,
                             rtol=1e-12, atol=1e-12 * np.abs(h).max())
  np.testing.assert_allclose(np.kron(opt_a, opt_b), h, rtol=1e-10,
                             atol=1e-12 * np.abs(h).max())


def test_optimal_kronecker_is_the_top_singular_triple():
  gs = gradients(np.random.default_rng(3), t=20)
  h = covariance(gs)
  u, s, vt = np.linalg.svd(rearrange_oracle(h, M, N))
  expected = np.kron(s[0] * u[:, 0].reshape(M, M), vt[0].reshape(N, N))
  with jax.enable_x64(True):
    a, b = kronecker.optimal_kronecker(jnp.asarray(h), (M, N), num_iters=100)
  np.testing.assert_allclose(np.kron(a, b), expected, rtol=1e-8,
                             atol=1e-10 * np.abs(expected).max())
  # The optimum is PSD (Van Loan & Pitsianis), as power iteration from (I, I)
  # keeps it.
  assert np.linalg.eigvalsh(a).min() > -1e-10 * np.abs(a).max()
  assert np.linalg.eigvalsh(b).min() > -1e-10 * np.abs(b).max()


def test_cosine_similarity_and_optimality_order():
  """cos(H, optimal) ≥ cos(H, L⊗R): the optimum maximises the cosine."""
  gs = gradients(np.random.default_rng(4), t=20)
  h = covariance(gs)
  with jax.enable_x64(True):
    hj = jnp.asarray(h)
    left, right = kronecker.kronecker_power_step(hj, jnp.eye(M), jnp.eye(N))
    a, b = kronecker.optimal_kronecker(hj, (M, N), num_iters=100)
    cos_lr = float(kronecker.cosine_similarity(hj, jnp.kron(left, right)))
    cos_opt = float(kronecker.cosine_similarity(hj, jnp.kron(a, b)))
    cos_self = float(kronecker.cosine_similarity(hj, 2.0 * hj))
  shampoo_hat = np.kron(left, right)
  np.testing.assert_allclose(
      cos_lr, np.sum(h * shampoo_hat) / (np.linalg.norm(h) *
                                         np.linalg.norm(shampoo_hat)),
      rtol=1e-12)
  np.testing.assert_allclose(cos_self, 1.0, rtol=1e-12)
  assert cos_lr <= cos_opt + 1e-12
  assert 0.0 < cos_lr < 1.0


@pytest.mark.parametrize("shape,axis", [((3, 4), 0), ((3, 4), 1),
                                        ((2, 3, 4), 1)])
def test_weighted_mode_gram(shape, axis):
  """``G_(i) (⊗_{j≠i} M_j) G_(i)ᵀ`` against np.kron of the other factors."""
  rng = np.random.default_rng(5)
  g = rng.standard_normal((2,) + shape)
  mats = {}
  for j, d in enumerate(shape):
    x = rng.standard_normal((2, d, d))
    mats[j] = x @ x.transpose(0, 2, 1)
  with jax.enable_x64(True):
    got = np.asarray(kronecker.weighted_mode_gram(
        jnp.asarray(g), axis, {j: jnp.asarray(m) for j, m in mats.items()}))
    plain = np.asarray(kronecker.mode_gram(jnp.asarray(g), axis))
  for b in range(2):
    unfolded = np.moveaxis(g[b], axis, 0).reshape(shape[axis], -1)
    others = [mats[j][b] for j in range(len(shape)) if j != axis]
    weight = others[0]
    for m in others[1:]:
      weight = np.kron(weight, m)
    np.testing.assert_allclose(got[b], unfolded @ weight @ unfolded.T,
                               rtol=1e-12)
    np.testing.assert_allclose(plain[b], unfolded @ unfolded.T, rtol=1e-12)
