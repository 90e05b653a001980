"""Frequent Directions sketches (kronopt.linalg.sketch), ALGORITHMS.md §5, §7.5.

Oracles are dense float64 numpy: the FD step by ``np.linalg.svd`` and the
inverse root as ``(U diag(σ²) Uᵀ + (ρ + ε') I)^{-1/p}`` by ``np.linalg.eigh``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronopt.linalg import sketch

N, D, K, STEPS = 2, 10, 3, 6
B2 = 0.9


def gradients(seed=0, n=N, d=D, m=4, steps=STEPS):
  """Gradient columns whose row scales differ, so the spectrum is spread."""
  rng = np.random.default_rng(seed)
  scales = np.linspace(2.0, 0.2, d)[:, None]
  return [scales * rng.standard_normal((n, d, m)) for _ in range(steps)]


def np_fd_update(u, sigma, rho, g, b2):
  """One decayed FD step for one block, float64."""
  k = sigma.shape[0]
  z = np.concatenate([np.sqrt(b2) * u * sigma, g], axis=1)
  v, s, _ = np.linalg.svd(z, full_matrices=False)
  c = s[k] if s.shape[0] > k else 0.0
  sigma = np.sqrt(np.maximum(s[:k] ** 2 - c ** 2, 0.0))
  return v[:, :k], sigma, b2 * rho + c ** 2


def dense_sketch(u, sigma):
  return (u * sigma ** 2) @ u.T


@pytest.fixture(scope="module", params=[4, 12], ids=["tall", "wide"])
def fd_run(request):
  """FD run in float32 (jit), in float64 (jit, x64) and the exact C_t.

  ``Z`` is ``D × (K + m)``: tall (thin SVD) for m = 4, wide (eigh of
  ``Z Zᵀ``) for m = 12.
  """
  gs = gradients(m=request.param)
  update = jax.jit(sketch.fd_update)
  s32 = sketch.init_sketch(N, D, K)
  with jax.enable_x64(True):
    s64 = sketch.init_sketch(N, D, K, jnp.float64)
    for g in gs:
      s64 = update(s64, jnp.asarray(g, jnp.float64), B2)
    s64 = jax.tree_util.tree_map(np.asarray, s64)
  for g in gs:
    s32 = update(s32, jnp.asarray(g, jnp.float32), B2)
  exact = np.zeros((N, D, D))
  for g in gs:
    exact = B2 * exact + g @ np.swapaxes(g, -1, -2)
  return gs, jax.tree_util.tree_map(np.asarray, s32), s64, exact


def test_fd_update_matches_float64_oracle(fd_run):
  gs, s32, _, _ = fd_run
  for b in range(N):
    u, sigma, rho = np.zeros((D, K)), np.zeros(K), 0.0
    for g in gs:
      u, sigma, rho = np_fd_update(u, sigma, rho, g[b], B2)
    expected = dense_sketch(u, sigma)
    got = dense_sketch(s32.basis[b].astype(np.float64), s32.sigma[b])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got / scale, expected / scale, atol=1e-5)
    np.testing.assert_allclose(s32.rho[b], rho, rtol=1e-5)
    assert rho > 0.05 * scale  # the run did truncate


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-5)])
def test_fd_guarantee(fd_run, dtype, rtol):
  """§7.5: 0 ⪯ C_t − U diag(σ²) Uᵀ ⪯ ρ I, by eigenvalues."""
  _, s32, s64, exact = fd_run
  s = s64 if dtype == "float64" else s32
  for b in range(N):
    u = s.basis[b].astype(np.float64)
    np.testing.assert_allclose(u.T @ u, np.eye(K), atol=10 * rtol)
    gap = np.linalg.eigvalsh(exact[b] - dense_sketch(u, s.sigma[b]))
    tol = rtol * np.linalg.eigvalsh(exact[b])[-1]
    rho = float(s.rho[b])
    assert gap[0] >= -tol
    assert gap[-1] <= rho + tol
    assert gap[-1] >= 0.5 * rho  # the bound is not vacuous


def test_fd_rank_at_least_d_is_exact():
  """With k = d nothing escapes: the sketch is the exact decayed sum."""
  gs = gradients(seed=1, d=4, m=3, steps=3)
  s = sketch.init_sketch(N, 4, 4)
  exact = np.zeros((N, 4, 4))
  for g in gs:
    s = sketch.fd_update(s, jnp.asarray(g, jnp.float32), B2)
    exact = B2 * exact + g @ np.swapaxes(g, -1, -2)
  for b in range(N):
    got = dense_sketch(np.asarray(s.basis[b], np.float64),
                       np.asarray(s.sigma[b]))
    np.testing.assert_allclose(got, exact[b], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(s.rho), 0.0)


def test_fd_update_skips_non_finite_block():
  gs = gradients(seed=2, steps=2)
  s = sketch.fd_update(sketch.init_sketch(N, D, K), jnp.asarray(gs[0]), B2)
  bad = np.array(gs[1], np.float32)
  bad[0, 3, 1] = np.nan
  s2 = sketch.fd_update(s, jnp.asarray(bad), B2)
  for old, new in zip(s, s2):
    np.testing.assert_array_equal(np.asarray(new[0]), np.asarray(old[0]))
    assert np.all(np.isfinite(np.asarray(new)))
  assert not np.allclose(np.asarray(s2.sigma[1]), np.asarray(s.sigma[1]))


def dense_root(u, sigma, rho, p, epsilon, relative):
  lam = sigma ** 2 + rho
  eps = epsilon * lam.max() if relative else epsilon
  w, q = np.linalg.eigh(dense_sketch(u, sigma) + (rho + eps) * np.eye(len(u)))
  return (q * w ** (-1.0 / p)) @ q.T


@pytest.mark.parametrize("relative,epsilon", [(True, 1e-3), (False, 0.5)])
def test_inverse_root_and_apply_match_dense(fd_run, relative, epsilon):
  """P x along each mode of an order-3 tensor equals the dense root's."""
  _, s32, _, _ = fd_run
  st = sketch.Sketch(*(jnp.asarray(x) for x in s32))
  root, residual = sketch.inverse_root(st, 6, epsilon=epsilon,
                                       relative_epsilon=relative)
  assert np.all(np.asarray(residual) < 1e-5)
  x = np.random.default_rng(3).standard_normal((N, 3, D, 5))
  got = np.asarray(sketch.apply_root(root, jnp.asarray(x, jnp.float32), 1))
  for b in range(N):
    p = dense_root(s32.basis[b].astype(np.float64), s32.sigma[b],
                   float(s32.rho[b]), 6, epsilon, relative)
    expected = np.einsum("ij,ajb->aib", p, x[b])
    np.testing.assert_allclose(got[b], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_initial_root_is_identity():
  root = sketch.init_root(2, 5, 3)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 4)),
                  jnp.float32)
  np.testing.assert_allclose(sketch.apply_root(root, x, 0), x, atol=1e-6)
