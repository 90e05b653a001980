"""Warm-started eigenbases of PSD matrices (docs/algorithms.md §0, §8).

The ``qr`` root method of the Shampoo family and SOAP's refresh (Vyas et al.,
"SOAP: Improving and stabilizing Shampoo using Adam", 2024) keep an
orthonormal basis ``Q`` of each statistic ``A`` and refine it instead of
decomposing ``A`` from scratch:

    B = Qᵀ A Q,   est = diag(B),
    mass = ‖B − diag(est)‖_F / ‖B‖_F = ‖A Q − Q diag(est)‖_F / ‖A‖_F,
    while mass > τ (at most ``iterations`` times):  Q ← qr(A Q).

The off-diagonal mass needs no second product (``Q`` is orthonormal, so
``‖Q X‖_F = ‖X‖_F``): one product ``A Q`` gives ``est`` (the Rayleigh
quotients) and ``mass``, without the cancellation of ``‖A‖² − ‖est‖²``, and
is also the next power step's input. A step
costs one ``d×d`` matmul and one QR against a symmetric ``eigh``'s
≈ 9–10 d³ flops; the first basis comes from :func:`eigenbasis`.

Everything is batched over a leading ``[N]`` axis. ``real`` (int ``[N]``,
optional) is the unpadded size of each block: coordinates ``≥ real`` are
zero padding, and the bases keep them on the identity (``Q[p, p] = 1``, no
mixing with real coordinates), which SOAP needs because its rotated second
moment is not basis-invariant.

SOAP's refresh (:func:`sorted_power_step`) first sorts the columns of ``Q``
by ``est`` descending (:func:`descending_order`; padded coordinates stay
last, in place) and returns the permutation, which SOAP applies to its
rotated second moment, then takes one power + QR step from the sorted basis.
"""

import jax
import jax.numpy as jnp

from kronopt.linalg import lapack

HIGHEST = jax.lax.Precision.HIGHEST
TINY = 1e-30


def _bmm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _pad_mask(real, a):
  """``[N, d]`` bool, True on padded coordinates (``None``: no padding)."""
  if real is None:
    return None
  return jnp.arange(a.shape[-1]) >= jnp.asarray(real)[..., None]


def _keep_padding_identity(q, pad):
  """Zeroes the pad rows/columns of ``q`` and puts ``I`` on the pad block."""
  if pad is None:
    return q
  real = ~pad
  q = q * (real[..., :, None] & real[..., None, :])
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  return q + eye * pad[..., None, :]


def eigenbasis(a, real=None):
  """``(Q, λ)`` of symmetric ``a``, eigenvalues descending.

  With ``real``, the padded coordinates get a sentinel eigenvalue below the
  spectrum of the real part (their rows and columns of ``a`` are zero), so
  they come out as the last columns, which are then set to exactly the
  identity; their ``λ`` is 0.
  """
  a = 0.5 * (a + jnp.swapaxes(a, -1, -2))
  pad = _pad_mask(real, a)
  if pad is not None:
    trace = jnp.trace(a, axis1=-2, axis2=-1)
    sentinel = -(jnp.abs(trace) + 1.0)[..., None]
    diag = jnp.where(pad, sentinel, 0.0)
    a = a + diag[..., None] * jnp.eye(a.shape[-1], dtype=a.dtype)
  lam, q = lapack.eigh(a)
  q, lam = q[..., ::-1], lam[..., ::-1]
  if pad is not None:
    lam = jnp.where(pad, 0.0, lam)
  return _keep_padding_identity(q, pad), lam


def _frobenius(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1)))


def rayleigh(a, q):
  """``(A Q, est, mass)``: the Rayleigh quotients of ``Q``'s columns and the
  relative off-diagonal mass ``‖A Q − Q diag(est)‖_F / ‖A‖_F`` (0 for
  ``A = 0``)."""
  aq = _bmm(a, q)
  est = jnp.sum(q * aq, axis=-2)
  mass = _frobenius(aq - q * est[..., None, :]) / jnp.maximum(
      _frobenius(a), TINY)
  return aq, est, mass


def power_qr_step(aq, real=None):
  """``qr(A Q)``, keeping padded coordinates on the identity."""
  pad = _pad_mask(real, aq)
  if pad is not None:
    eye = jnp.eye(aq.shape[-1], dtype=aq.dtype)
    aq = aq * (~pad)[..., None, :] + eye * pad[..., None, :]
  q, r = lapack.qr(aq)
  # Fix the signs so that R has a non-negative diagonal (a basis that has
  # converged then stays put instead of flipping columns).
  sign = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
  return _keep_padding_identity(q * sign[..., None, :], pad)


def refine(a, q, *, tolerance, iterations, real=None):
  """Up to ``iterations`` power + QR steps from ``q``, while ``mass > τ``.

  Each matrix steps only while its own off-diagonal mass exceeds
  ``tolerance``; the loop ends as soon as no matrix of the batch needs a
  step (so a basis within tolerance costs one product, no QR).
  ``iterations`` may be traced.

  Returns:
    ``(Q, est, mass)`` after the last step: the basis, the Rayleigh quotients
    ``diag(Qᵀ A Q)`` and the relative off-diagonal mass.
  """
  def needs(mass):
    return mass > tolerance

  def cond(carry):
    i, _, _, _, mass = carry
    return (i < iterations) & jnp.any(needs(mass))

  def body(carry):
    i, q, aq, _, mass = carry
    q = jnp.where(needs(mass)[..., None, None], power_qr_step(aq, real), q)
    return (i + 1, q) + rayleigh(a, q)

  carry = (jnp.asarray(0), q) + rayleigh(a, q)
  _, q, _, est, mass = jax.lax.while_loop(cond, body, carry)
  return q, est, mass


def descending_order(est, real=None):
  """Per matrix, the column order that sorts ``est`` descending (``[N, d]``).

  Stable (ties keep their order); with ``real``, the padded coordinates are
  ordered last, in place, so the permutation never mixes them with real ones.
  """
  pad = _pad_mask(real, est)
  if pad is not None:
    est = jnp.where(pad, -jnp.inf, est)
  return jnp.argsort(-est, axis=-1, stable=True)


def sort_columns(a, q, real=None):
  """``(A Q[:, order], order, mass)``: the columns of ``q`` in the order of
  their Rayleigh quotients ``est = diag(Qᵀ A Q)``, descending.

  ``order`` (``[N, d]`` ints) says that column ``k`` of the sorted basis was
  column ``order[k]`` of ``q``; apply it to whatever is indexed by the old
  columns. ``mass`` is the relative off-diagonal mass of ``q`` (see
  :func:`rayleigh`). One product ``A Q`` gives all three.
  """
  aq, est, mass = rayleigh(a, q)
  order = descending_order(est, real)
  return jnp.take_along_axis(aq, order[..., None, :], axis=-1), order, mass


def sorted_power_step(a, q, real=None):
  """SOAP's warm refresh of a basis (docs/algorithms.md §8).

  Sorts the columns of ``q`` by ``est`` descending, then takes one power +
  QR step: ``Q ← qr(A Q[:, order])``.

  Returns:
    ``(Q, order, mass)``: the new basis, and the order and the off-diagonal
    mass of the old one (see :func:`sort_columns`).
  """
  aq, order, mass = sort_columns(a, q, real)
  return power_qr_step(aq, real), order, mass
