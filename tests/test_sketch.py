"""Frequent Directions sketches (kronopt.linalg.sketch), docs/algorithms.md §5.

Oracles are dense float64 numpy: the FD step by ``np.linalg.svd`` and the
inverse root as ``(U diag(σ²) Uᵀ + (ρ + ε') I)^{-1/p}`` by ``np.linalg.eigh``;
the FD bound (§7.5) is checked by eigenvalues of the exact statistic.
"""

import functools

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
    np.testing.assert_allclose(s32.sqrt_rho[b] ** 2, rho, rtol=1e-5)
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
    rho = float(s.sqrt_rho[b]) ** 2
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
  np.testing.assert_array_equal(np.asarray(s.sqrt_rho), 0.0)


def test_fd_update_surfaces_non_finite_block():
  """A NaN block comes out NaN (for the engine to skip), the others update."""
  gs = gradients(seed=2, steps=2)
  s = sketch.fd_update(sketch.init_sketch(N, D, K), jnp.asarray(gs[0]), B2)
  bad = np.array(gs[1], np.float32)
  bad[0, 3, 1] = np.nan
  s2 = sketch.fd_update(s, jnp.asarray(bad), B2)
  good = sketch.fd_update(s, jnp.asarray(gs[1], jnp.float32), B2)
  for new, want in zip(s2, good):
    assert np.all(np.isnan(np.asarray(new[0])))
    np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(want[1]))


def test_fd_update_surfaces_overflowing_statistic():
  """(1−β₂)(σ₁² + ρ) beyond float32 (a 1e25 entry) is NaN; 1e17 is not."""
  g = np.array(gradients(seed=5, steps=1)[0], np.float32)
  g[0, 2, 1] = 1e25
  g[1] *= 1e17
  s = sketch.fd_update(sketch.init_sketch(N, D, K), jnp.asarray(g), B2)
  assert all(np.all(np.isnan(np.asarray(x[0]))) for x in s)
  assert all(np.all(np.isfinite(np.asarray(x[1]))) for x in s)
  _, sigma, _ = np_fd_update(np.zeros((D, K)), np.zeros(K), 0.0,
                             g[1].astype(np.float64), B2)
  np.testing.assert_allclose(np.asarray(s.sigma[1]), sigma, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e15])
def test_fd_update_is_scale_equivariant(fd_run, scale):
  """``s·G`` gives ``U`` and ``σ/s``, ``√ρ/s`` of ``G``: no under/overflow."""
  gs, s32, _, _ = fd_run
  update = jax.jit(sketch.fd_update)
  s = sketch.init_sketch(N, D, K)
  for g in gs:
    s = update(s, jnp.asarray(scale * g, jnp.float32), B2)
  for b in range(N):
    u = np.asarray(s.basis[b], np.float64)
    got = dense_sketch(u, np.asarray(s.sigma[b], np.float64) / scale)
    want = dense_sketch(s32.basis[b].astype(np.float64), s32.sigma[b])
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(np.asarray(s.sqrt_rho, np.float64) / scale,
                             s32.sqrt_rho, rtol=1e-5)


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
                   float(s32.sqrt_rho[b]) ** 2, 6, epsilon, relative)
    expected = np.einsum("ij,ajb->aib", p, x[b])
    np.testing.assert_allclose(got[b], expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_initial_root_is_identity():
  root = sketch.init_root(2, 5, 3)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 4)),
                  jnp.float32)
  np.testing.assert_allclose(sketch.apply_root(root, x, 0), x, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e15])
def test_inverse_root_is_scale_free(fd_run, scale):
  """A sketch of ``s·G`` has the root of ``G``'s times ``s^{-2/p}``."""
  _, s32, _, _ = fd_run
  st = sketch.Sketch(*(jnp.asarray(x) for x in s32))
  big = st._replace(sigma=st.sigma * scale, sqrt_rho=st.sqrt_rho * scale)
  root, _ = sketch.inverse_root(st, 4, epsilon=1e-3)
  got, _ = sketch.inverse_root(big, 4, epsilon=1e-3)
  for a, b in ((got.scale, root.scale), (got.tail, root.tail)):
    np.testing.assert_allclose(np.asarray(a, np.float64) * scale ** 0.5,
                               np.asarray(b), rtol=1e-5)


def test_empty_sketch_root_is_the_damping_floor():
  root, _ = sketch.inverse_root(sketch.init_sketch(2, 5, 3), 4, epsilon=1e-6)
  np.testing.assert_allclose(np.asarray(root.scale), 1e-36 ** -0.25,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(root.tail), 1e-36 ** -0.25,
                             rtol=1e-5)


# ------------------------------------------------- the randomized range step

# (d, k, m, oversample, β₂): a tall Z (k + m < d), a wide one (k + m > d)
# with β₂ = 1, and a third; each has 2(k + oversample) ≤ min(d, k + m).
RANDOMIZED = [(24, 3, 16, 4, 0.9), (32, 4, 40, 4, 1.0), (40, 5, 30, 6, 0.99)]
RANDOMIZED_STEPS = 6
ETA = 0.1  # largest relative shortfall of an escaped-mass estimate (≈ 0.02)


def drifting_gradients(seed, d, m, steps, rank=None):
  """A stream with a decaying spectrum whose eigenbasis drifts."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
  spectrum = np.arange(1, d + 1) ** -0.75
  if rank is not None:
    spectrum[rank:] = 0.0
  out = []
  for _ in range(steps):
    if rank is None:
      basis = np.linalg.qr(basis + 0.1 * rng.standard_normal((d, d)))[0]
    out.append(np.stack([(basis * spectrum) @ rng.standard_normal((d, m))
                         for _ in range(N)]))
  return out


def block_keys(step):
  base = jax.random.fold_in(jax.random.key(7), step)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(N))


@functools.lru_cache(maxsize=None)
def randomized_update(oversample):
  return jax.jit(functools.partial(sketch.fd_update, method="randomized",
                                   oversample=oversample))


@pytest.mark.parametrize("d,k,m,oversample,b2", RANDOMIZED)
def test_randomized_fd_bound(d, k, m, oversample, b2):
  """0 ⪯ C_t − sketch ⪯ (1+η) ρ I; per step, ρ grows by at most (and at
  least 1/(1+η) of) λ_max of the mass this step let escape."""
  assert sketch.uses_range_step(d, k, m, oversample)
  update = randomized_update(oversample)
  s = sketch.init_sketch(N, d, k)
  exact = np.zeros((N, d, d))
  for t, g in enumerate(drifting_gradients(d, d, m, RANDOMIZED_STEPS)):
    new = update(s, jnp.asarray(g, jnp.float32), b2, keys=block_keys(t))
    exact = b2 * exact + g @ np.swapaxes(g, -1, -2)
    for b in range(N):
      u = np.asarray(new.basis[b], np.float64)
      np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-5)
      old_sk = dense_sketch(np.asarray(s.basis[b], np.float64),
                            np.asarray(s.sigma[b], np.float64))
      new_sk = dense_sketch(u, np.asarray(new.sigma[b], np.float64))
      tol = 1e-5 * np.linalg.eigvalsh(exact[b])[-1]
      escaped = np.linalg.eigvalsh(b2 * old_sk + g[b] @ g[b].T - new_sk)
      rho = float(new.sqrt_rho[b]) ** 2
      grown = rho - b2 * float(s.sqrt_rho[b]) ** 2
      assert escaped[0] >= -tol
      assert grown <= escaped[-1] + tol
      assert grown >= escaped[-1] / (1 + ETA) - tol
      gap = np.linalg.eigvalsh(exact[b] - new_sk)
      assert gap[0] >= -tol
      assert gap[-1] <= (1 + ETA) * rho + tol
      assert gap[-1] >= 0.5 * rho  # the bound is not vacuous
    s = new


def test_randomized_is_exact_on_a_low_rank_stream():
  """rank(C) ≤ k: both methods keep C exactly and nothing escapes."""
  d, k, m, oversample, b2 = RANDOMIZED[1]
  update = randomized_update(oversample)
  s = sketch.init_sketch(N, d, k)
  exact = np.zeros((N, d, d))
  for t, g in enumerate(drifting_gradients(3, d, m, 3, rank=k - 1)):
    s = update(s, jnp.asarray(g, jnp.float32), b2, keys=block_keys(t))
    exact = b2 * exact + g @ np.swapaxes(g, -1, -2)
  for b in range(N):
    got = dense_sketch(np.asarray(s.basis[b], np.float64),
                       np.asarray(s.sigma[b], np.float64))
    np.testing.assert_allclose(got, exact[b],
                               atol=1e-5 * np.abs(exact[b]).max())
  assert np.all(np.asarray(s.sqrt_rho) ** 2
                <= 1e-5 * np.abs(exact).max())


def test_randomized_takes_the_exact_step_when_compression_cannot_pay():
  """2(k + oversample) > min(d, k + m): bit for bit the exact method."""
  gs = gradients(seed=6, m=12, steps=3)
  assert not sketch.uses_range_step(D, K, 12, 16)
  update, exact_update = randomized_update(16), jax.jit(sketch.fd_update)
  s = want = sketch.init_sketch(N, D, K)
  for t, g in enumerate(gs):
    s = update(s, jnp.asarray(g, jnp.float32), B2, keys=block_keys(t))
    want = exact_update(want, jnp.asarray(g, jnp.float32), B2)
  for got, expected in zip(s, want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
