"""Warm-started eigenbases and the ``qr`` root method (docs/algorithms.md §0).

Against a float64 numpy eigh reference on slowly drifting PSD statistics:
the basis after a few warm refreshes, the root's error, the skip when the
tolerance holds, the eigh fallback from ``Q = I``, and padding kept on the
identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronopt.linalg import eigenbasis
from kronopt.linalg import roots

D, N, P = 12, 3, 4


def _drifting_stats(steps, drift=0.02, seed=0):
  """``A_t = β A_{t-1} + (1−β) G Gᵀ`` with a slowly rotating gradient law."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((N, D, D)))
  lam = np.logspace(0, -3, D)
  mix = np.eye(D) + drift * rng.standard_normal((D, D))
  a = np.einsum("nij,j,nkj->nik", q, lam, q)
  out = []
  for _ in range(steps):
    q = np.einsum("nij,jk->nik", q, mix)
    q, _ = np.linalg.qr(q)
    new = np.einsum("nij,j,nkj->nik", q, lam, q)
    a = 0.9 * a + 0.1 * new
    out.append(a.copy())
  return out


def _root64(a, p, eps):
  lam, q = np.linalg.eigh(a)
  lam = np.maximum(lam, 0) + eps * lam.max(axis=-1, keepdims=True)
  return np.einsum("nij,nj,nkj->nik", q, lam ** (-1 / p), q)


def _rel(x, y):
  return float(np.max(np.abs(np.asarray(x, np.float64) - y)) / np.max(
      np.abs(y)))


@pytest.fixture(scope="module")
def qr_root():
  return jax.jit(lambda a, q: roots.inverse_root_qr(
      a, q, P, epsilon=1e-4, tolerance=0.01, iterations=3, fallback=0.1))


def test_first_refresh_from_identity_falls_back_to_eigh(qr_root):
  a = _drifting_stats(1)[0]
  eye = jnp.broadcast_to(jnp.eye(D), (N, D, D))
  root, q, mass = qr_root(jnp.asarray(a, jnp.float32), eye)
  assert float(jnp.max(mass)) < 1e-3
  assert _rel(root, _root64(a, P, 1e-4)) < 1e-3
  np.testing.assert_allclose(np.einsum("nji,njk->nik", q, q),
                             np.broadcast_to(np.eye(D), (N, D, D)),
                             atol=1e-5)


def test_warm_refreshes_track_drifting_statistics(qr_root):
  """Each refresh starts from the last basis; the root stays accurate."""
  q = jnp.broadcast_to(jnp.eye(D), (N, D, D))
  errors, masses = [], []
  for a in _drifting_stats(12):
    root, q, mass = qr_root(jnp.asarray(a, jnp.float32), q)
    errors.append(_rel(root, _root64(a, P, 1e-4)))
    masses.append(float(jnp.max(mass)))
  assert max(masses) <= 0.1, masses         # never needed the eigh fallback
  assert max(masses[3:]) <= 0.02, masses    # within ~tolerance when warm
  assert max(errors[3:]) < 0.05, errors      # the root, against float64 eigh


def test_basis_within_tolerance_is_kept_without_a_qr_step():
  a = jnp.asarray(_drifting_stats(1)[0], jnp.float32)
  q, _ = eigenbasis.eigenbasis(a)
  q2, est, mass = eigenbasis.refine(a, q, tolerance=0.01, iterations=5)
  np.testing.assert_array_equal(q2, q)       # bit-identical: no step taken
  assert float(jnp.max(mass)) < 0.01
  lam64 = np.sort(np.linalg.eigvalsh(np.asarray(a, np.float64)))[..., ::-1]
  np.testing.assert_allclose(np.sort(est)[..., ::-1], lam64, rtol=1e-3,
                             atol=1e-6)


def test_power_qr_steps_converge_to_the_eigenbasis():
  a = _drifting_stats(1)[0]
  rng = np.random.default_rng(1)
  q0, _ = np.linalg.qr(np.eye(D) + 0.3 * rng.standard_normal((N, D, D)))
  _, _, before = eigenbasis.rayleigh(jnp.asarray(a, jnp.float32),
                                     jnp.asarray(q0, jnp.float32))
  _, _, after = eigenbasis.refine(jnp.asarray(a, jnp.float32),
                                  jnp.asarray(q0, jnp.float32),
                                  tolerance=0.0, iterations=30)
  assert np.all(np.asarray(after) < 0.2 * np.asarray(before))


def test_padding_stays_on_the_identity():
  """Real extent 7 of 12: the last 5 coordinates are zero padding."""
  real = jnp.asarray([7, 12, 5])
  a = np.asarray(_drifting_stats(1)[0])
  for n, r in enumerate([7, 12, 5]):
    a[n, r:, :] = 0.0
    a[n, :, r:] = 0.0
  a = jnp.asarray(a, jnp.float32)
  q, lam = eigenbasis.eigenbasis(a, real)
  q = eigenbasis.refine(a, q, tolerance=0.0, iterations=2, real=real)[0]
  for n, r in enumerate([7, 12, 5]):
    qn = np.asarray(q[n])
    np.testing.assert_array_equal(qn[r:, r:], np.eye(D - r))
    np.testing.assert_array_equal(qn[:r, r:], 0.0)
    np.testing.assert_array_equal(qn[r:, :r], 0.0)
    np.testing.assert_allclose(qn[:r, :r].T @ qn[:r, :r], np.eye(r),
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lam[n])[r:], 0.0)
