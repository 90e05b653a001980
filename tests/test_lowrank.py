"""Low-rank K-factor decompositions (kronopt.linalg.lowrank), §6 and §7.7.

Oracles are dense float64 numpy: ``np.linalg.eigh`` of ``ρ U D Uᵀ + B Bᵀ``
for Brand's update, of the exact EMA for the randomized EVD and the
Rayleigh–Ritz correction, and ``np.linalg.solve`` with the continued
spectrum for the damped inverse application.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronopt.linalg import lowrank

sys.path.insert(0, os.path.dirname(__file__))
from fast_jit import jit  # noqa: E402

RHO = 0.95

# Jitted once per module (eager dispatch compiles every small op on its
# own), with the cheap compile options of tests/fast_jit.py.
brand_expand = jit(lowrank.brand_expand)
brand_update = jit(lowrank.brand_update)
reorthogonalize = jit(lowrank.reorthogonalize)
randomized_eigh = jit(lowrank.randomized_eigh, static_argnums=1)
rayleigh_ritz = jit(lowrank.rayleigh_ritz, static_argnames=("fraction",))
inverse_apply = jit(lowrank.inverse_apply,
                    static_argnames=("axis", "relative"))


def np_top_eigh(m, r):
  lam, v = np.linalg.eigh(m)
  return lam[::-1][:r], v[:, ::-1][:, :r]


def random_lowrank(rng, n, d, r):
  """Orthonormal ``U`` and a decaying positive spectrum ``D`` per block."""
  u = np.stack([np.linalg.qr(rng.standard_normal((d, r)))[0]
                for _ in range(n)])
  vals = np.sort(rng.uniform(0.1, 3.0, (n, r)), axis=-1)[:, ::-1]
  return u, vals


def dense(u, vals):
  return np.einsum("nij,nj,nkj->nik", u, vals, u)


def assert_same_subspace(u, v, atol):
  """``span(u) = span(v)`` for orthonormal columns (per block)."""
  proj = lambda x: x @ np.swapaxes(x, -1, -2)
  np.testing.assert_allclose(proj(u), proj(v), atol=atol)


# d > r + k: Brand's path (QR of the residual, (r+k)×(r+k) eigh);
# d ≤ r + k: the d×d matrix is decomposed directly.
@pytest.mark.parametrize("d,r,k", [(12, 4, 3), (7, 4, 5), (6, 6, 2)],
                         ids=["brand", "direct", "full_rank"])
def test_brand_before_truncation_is_exact_eigh(d, r, k):
  rng = np.random.default_rng(0)
  n = 3
  u, vals = random_lowrank(rng, n, d, r)
  b = rng.standard_normal((n, d, k))
  want = RHO * dense(u, vals) + b @ np.swapaxes(b, -1, -2)
  with jax.enable_x64(True):
    got = brand_expand(lowrank.LowRank(jnp.asarray(u),
                                               jnp.asarray(vals)),
                               jnp.asarray(b), RHO)
    got = jax.tree_util.tree_map(np.asarray, got)
  width = min(d, r + k)
  assert got.basis.shape == (n, d, width)
  np.testing.assert_allclose(
      np.einsum("nij,nik->njk", got.basis, got.basis),
      np.broadcast_to(np.eye(width), (n, width, width)), atol=1e-10)
  np.testing.assert_allclose(dense(got.basis, got.values), want, atol=1e-10)
  for i in range(n):
    lam, _ = np_top_eigh(want[i], width)
    np.testing.assert_allclose(got.values[i], np.maximum(lam, 0.0),
                               atol=1e-10)
  assert np.all(np.diff(got.values, axis=-1) <= 1e-12)


def test_brand_update_truncates_to_best_rank_r():
  rng = np.random.default_rng(1)
  n, d, r, k = 2, 16, 5, 3
  u, vals = random_lowrank(rng, n, d, r)
  b = rng.standard_normal((n, d, k))
  want = RHO * dense(u, vals) + b @ np.swapaxes(b, -1, -2)
  with jax.enable_x64(True):
    got = brand_update(
        lowrank.LowRank(jnp.asarray(u), jnp.asarray(vals)), jnp.asarray(b),
        RHO)
    got = jax.tree_util.tree_map(np.asarray, got)
  assert got.basis.shape == (n, d, r)
  for i in range(n):
    lam, vec = np_top_eigh(want[i], r)
    np.testing.assert_allclose(got.values[i], lam, rtol=1e-10)
    assert_same_subspace(got.basis[i], vec, atol=1e-8)


def test_brand_with_full_rank_tracks_the_exact_ema_in_float32():
  """r = d: every update is exact, so the state equals the EMA itself."""
  rng = np.random.default_rng(2)
  n, d, k = 2, 6, 4
  state = lowrank.init(n, d, d)
  ema = np.zeros((n, d, d))
  update = brand_update
  for _ in range(8):
    a = rng.standard_normal((n, d, k)) * np.linspace(2.0, 0.1, d)[:, None]
    b = np.sqrt(1 - RHO) * a
    ema = RHO * ema + b @ np.swapaxes(b, -1, -2)
    state = update(state, jnp.asarray(b, jnp.float32), RHO)
  got = np.asarray(lowrank.dense(state), np.float64)
  np.testing.assert_allclose(got, ema, atol=2e-6 * np.abs(ema).max())


def test_brand_thin_updates_match_truncated_ema_in_float32():
  """d > r + k on every step: a float32 run against float64 numpy Brand."""
  rng = np.random.default_rng(3)
  n, d, r, k = 2, 24, 6, 3
  state = lowrank.init(n, d, r)
  u, vals = np.broadcast_to(np.eye(d, r), (n, d, r)), np.zeros((n, r))
  update = brand_update
  for _ in range(6):
    b = rng.standard_normal((n, d, k)) * np.linspace(2.0, 0.1, d)[:, None]
    target = RHO * dense(u, vals) + b @ np.swapaxes(b, -1, -2)
    pairs = [np_top_eigh(t, r) for t in target]
    vals = np.stack([p[0] for p in pairs])
    u = np.stack([p[1] for p in pairs])
    state = update(state, jnp.asarray(b, jnp.float32), RHO)
  np.testing.assert_allclose(np.asarray(state.values), vals, rtol=1e-4)
  assert float(jnp.max(lowrank.orthogonality_error(state))) < 1e-5


def test_brand_update_keeps_a_block_with_nonfinite_columns():
  rng = np.random.default_rng(4)
  n, d, r, k = 2, 10, 3, 2
  u, vals = random_lowrank(rng, n, d, r)
  old = lowrank.LowRank(jnp.asarray(u, jnp.float32),
                        jnp.asarray(vals, jnp.float32))
  b = rng.standard_normal((n, d, k))
  b[1, 0, 0] = np.nan
  new = brand_update(old, jnp.asarray(b, jnp.float32), RHO)
  np.testing.assert_array_equal(np.asarray(new.basis[1]), u[1]
                                .astype(np.float32))
  np.testing.assert_array_equal(np.asarray(new.values[1]),
                                vals[1].astype(np.float32))
  assert np.all(np.isfinite(np.asarray(new.basis)))
  assert not np.allclose(np.asarray(new.values[0]), vals[0])


def test_reorthogonalize_keeps_the_matrix_and_restores_orthonormality():
  rng = np.random.default_rng(5)
  n, d, r = 2, 9, 4
  u, vals = random_lowrank(rng, n, d, r)
  drifted = u + 1e-3 * rng.standard_normal(u.shape)
  with jax.enable_x64(True):
    lr = lowrank.LowRank(jnp.asarray(drifted), jnp.asarray(vals))
    before = float(jnp.max(lowrank.orthogonality_error(lr)))
    fixed = reorthogonalize(lr)
    after = np.asarray(lowrank.orthogonality_error(fixed))
    np.testing.assert_allclose(np.asarray(lowrank.dense(fixed)),
                               dense(drifted, vals), atol=1e-12)
  assert before > 1e-4 and np.all(after < 1e-12)
  assert np.all(np.diff(np.asarray(fixed.values), axis=-1) <= 0)


def decaying_psd(rng, n, d, decay=0.7):
  """PSD matrices with eigenvalues ``decay^j``."""
  lam = decay ** np.arange(d)
  q = np.stack([np.linalg.qr(rng.standard_normal((d, d)))[0]
                for _ in range(n)])
  return (q * lam) @ np.swapaxes(q, -1, -2), lam


def keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


RSVD_N, RSVD_D, RSVD_R = 2, 40, 6


@pytest.fixture(scope="module")
def rsvd_problem():
  """PSD matrices with eigenvalues 0.7^j, ``d = 40``, and their RSVD at
  ``r = 6`` (oversampling 10, 3 power iterations) for three key sets."""
  m, lam = decaying_psd(np.random.default_rng(6), RSVD_N, RSVD_D)
  m32 = jnp.asarray(m, jnp.float32)
  runs = [randomized_eigh(m32, RSVD_R, keys(RSVD_N, seed))
          for seed in (1, 1, 2)]
  return m, lam, runs


def test_randomized_eigh_recovers_top_spectrum(rsvd_problem):
  """The top-r eigenvalues to 1e-5 relative and the subspace to 1e-4 in
  float32; the truncation error is the first dropped eigenvalue."""
  m, lam, (got, _, _) = rsvd_problem
  assert got.basis.shape == (RSVD_N, RSVD_D, RSVD_R)
  for i in range(RSVD_N):
    want_vals, want_vecs = np_top_eigh(m[i], RSVD_R)
    np.testing.assert_allclose(np.asarray(got.values[i]), want_vals,
                               rtol=1e-5)
    assert_same_subspace(np.asarray(got.basis[i], np.float64), want_vecs,
                         atol=1e-4)
  err = np.asarray(jit(lowrank.relative_error)(
      got, jnp.asarray(m, jnp.float32)))
  np.testing.assert_allclose(err, lam[RSVD_R] / lam[0], rtol=1e-3)


def test_randomized_eigh_is_deterministic_for_a_key(rsvd_problem):
  a, b, c = rsvd_problem[2]
  np.testing.assert_array_equal(np.asarray(a.basis), np.asarray(b.basis))
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  # Another key gives another sketch (equal only to float32 rounding).
  assert not np.array_equal(np.asarray(a.basis), np.asarray(c.basis))


def test_randomized_eigh_with_full_sketch_is_exact():
  rng = np.random.default_rng(8)
  m, _ = decaying_psd(rng, 2, 8)
  with jax.enable_x64(True):
    got = randomized_eigh(jnp.asarray(m), 3, keys(2))
    got = jax.tree_util.tree_map(np.asarray, got)
  for i in range(2):
    lam, vec = np_top_eigh(m[i], 3)
    np.testing.assert_allclose(got.values[i], lam, rtol=1e-12)
    assert_same_subspace(got.basis[i], vec, atol=1e-10)


def test_rayleigh_ritz_corrects_a_random_fifth_of_the_modes():
  """U holds exact eigenvectors with wrong eigenvalues: the corrected modes
  get the exact ones, the others are untouched, U stays orthonormal."""
  rng = np.random.default_rng(9)
  n, d, r = 2, 12, 10
  m, _ = decaying_psd(rng, n, d, decay=0.8)
  lam, vec = (np.stack(x) for x in zip(*[np_top_eigh(y, r) for y in m]))
  wrong = lam * rng.uniform(0.5, 1.5, lam.shape)
  with jax.enable_x64(True):
    lr = lowrank.sort_descending(lowrank.LowRank(jnp.asarray(vec),
                                                 jnp.asarray(wrong)))
    got = rayleigh_ritz(lr, jnp.asarray(m), keys(n), fraction=0.2)
    got = jax.tree_util.tree_map(np.asarray, got)
    start = jax.tree_util.tree_map(np.asarray, lr)
  assert lowrank.num_corrected(r, 0.2) == 2
  for i in range(n):
    # Each mode is still an exact eigenvector (the span of a pair of
    # eigenvectors is invariant); match modes by their vectors.
    overlap = np.abs(start.basis[i].T @ got.basis[i])
    match = np.argmax(overlap, axis=0)
    np.testing.assert_allclose(overlap.max(axis=0), 1.0, atol=1e-10)
    exact = np.einsum("ij,ik,kj->j", got.basis[i], m[i], got.basis[i])
    fixed = np.isclose(got.values[i], exact, rtol=1e-10)
    kept = np.isclose(got.values[i], start.values[i][match], rtol=1e-12)
    assert fixed.sum() >= 2 and np.all(fixed | kept)
    assert np.sum(~kept) <= 2
  np.testing.assert_allclose(
      np.einsum("nij,nik->njk", got.basis, got.basis),
      np.broadcast_to(np.eye(r), (n, r, r)), atol=1e-12)
  assert np.all(np.diff(got.values, axis=-1) <= 0)


def np_continued_inverse(u, vals, damping, relative=True):
  """``(U D Uᵀ + d_min (I − U Uᵀ) + λ' I)^{-1}`` as a dense matrix."""
  d = u.shape[0]
  lam = damping * vals.max() if relative else damping
  m = (u * vals) @ u.T + vals.min() * (np.eye(d) - u @ u.T)
  return np.linalg.inv(m + lam * np.eye(d))


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("axis", [0, 1])
def test_inverse_apply_is_a_dense_solve_with_continued_spectrum(axis,
                                                                relative):
  rng = np.random.default_rng(10)
  n, d, r, other = 2, 9, 4, 5
  u, vals = random_lowrank(rng, n, d, r)
  shape = (n, d, other) if axis == 0 else (n, other, d)
  x = rng.standard_normal(shape)
  damping = 1e-2 if relative else 0.05
  with jax.enable_x64(True):
    got = np.asarray(inverse_apply(
        lowrank.LowRank(jnp.asarray(u), jnp.asarray(vals)), jnp.asarray(x),
        axis, damping=damping, relative=relative))
  for i in range(n):
    inv = np_continued_inverse(u[i], vals[i], damping, relative)
    want = inv @ x[i] if axis == 0 else x[i] @ inv
    np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)


def test_inverse_apply_with_full_rank_is_the_exact_damped_inverse():
  rng = np.random.default_rng(11)
  m, lam = decaying_psd(rng, 1, 7)
  x = rng.standard_normal((1, 7, 3))
  with jax.enable_x64(True):
    got = np.asarray(inverse_apply(
        lowrank.from_eigh(jnp.asarray(m)), jnp.asarray(x), 0, damping=1e-3))
  want = np.linalg.solve(m[0] + 1e-3 * lam.max() * np.eye(7), x[0])
  np.testing.assert_allclose(got[0], want, rtol=1e-9)


def test_inverse_apply_of_an_empty_factor_is_the_identity():
  x = jnp.asarray(np.random.default_rng(12).standard_normal((2, 5, 3)),
                  jnp.float32)
  got = inverse_apply(lowrank.init(2, 5, 2), x, 0, damping=1e-3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
