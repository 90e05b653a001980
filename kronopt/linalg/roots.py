"""Batched matrix powers of symmetric PSD matrices (docs/algorithms.md §0).

Every function here takes a stack ``A`` of shape ``[N, d, d]`` and works on all
``N`` matrices in one batched call. Three methods compute the inverse p-th
root ``A^{-1/p}``; the first two with the contract ``(root, residual)``:

* :func:`inverse_root_eigh` -- ``A = Q diag(λ) Qᵀ``, damp the eigenvalues,
  ``root = Q diag(λ^{-1/p}) Qᵀ``.
* :func:`inverse_root_newton` -- the coupled Newton iteration (Guo & Higham
  2006; Anil et al. 2020, "Scalable second order optimization for deep
  learning"), matmuls only: the fast path on GPU/TPU.
* :func:`inverse_root_qr` -- from a warm-started eigenbasis kept between
  refreshes (power + QR steps, :mod:`kronopt.linalg.eigenbasis`), returning
  ``(root, basis, residual)``.

The residual is what the refresh guard of the engine compares to
``inverse_failure_threshold``: for Newton, ``max|M − I|`` at the returned
iterate (``M → X^p A'``); for eigh, the relative reconstruction error
``max|Q diag(λ) Qᵀ − A| / λ_max``; for qr, the relative off-diagonal mass
``‖QᵀAQ − diag‖_F / ‖A‖_F`` of the basis.
"""

import jax
import jax.numpy as jnp

from kronopt.linalg import eigenbasis as eigenbasis_lib
from kronopt.linalg import lapack

HIGHEST = jax.lax.Precision.HIGHEST
TINY = 1e-30


def _bmm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _eye_like(a):
  return jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)


def symmetrize(a):
  """``(A + Aᵀ) / 2`` over the last two axes."""
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def power_iteration(a, num_iters: int = 20):
  """Largest eigenvalue of each PSD matrix in ``a`` (``[N, d, d]`` -> ``[N]``).

  Plain power iteration from the all-ones vector (plus a small deterministic
  perturbation so that it is not orthogonal to the top eigenvector of common
  structured matrices). Returns the Rayleigh quotient after ``num_iters``.
  """
  d = a.shape[-1]
  v = jnp.ones(a.shape[:-1], a.dtype) + 1e-3 * jnp.arange(d, dtype=a.dtype) / d
  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

  def body(_, v):
    w = jnp.einsum("...ij,...j->...i", a, v, precision=HIGHEST)
    return w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), TINY)

  v = jax.lax.fori_loop(0, num_iters, body, v)
  return jnp.einsum("...i,...ij,...j->...", v, a, v, precision=HIGHEST)


def damping(lam_max, epsilon, relative_epsilon):
  """The damping added to every eigenvalue: ``ε·max(λ_max, tiny)`` or ``ε``.

  ``lam_max`` is the scale the damping is relative to (λ_max, or the mean
  eigenvalue for ``relative_to="mean"``). ``relative_epsilon`` may be a Python
  bool or a traced boolean (so that it survives ``optax.inject_hyperparams``).
  """
  rel = epsilon * jnp.maximum(lam_max, TINY)
  return jnp.where(relative_epsilon, rel, jnp.asarray(epsilon, lam_max.dtype))


RELATIVE_TO = ("max", "mean")


def mean_eigenvalue(a):
  """``tr(A)/d`` per matrix of a PSD stack (``[N, d, d]`` -> ``[N]``).

  ``d`` counts only the dimensions with a positive diagonal entry (at least
  1): a zero diagonal entry of a PSD matrix means a zero row and column, such
  as a zero-padded block dimension, and is not an eigenvalue of the data.
  With this, padding a matrix with zero rows and columns leaves its mean
  eigenvalue unchanged.
  """
  diag = jnp.diagonal(a, axis1=-2, axis2=-1)
  d = jnp.maximum(jnp.sum(diag > 0, axis=-1), 1).astype(a.dtype)
  return jnp.sum(diag, axis=-1) / d


def _damping_scale(a, lam_max, relative_to):
  """The scale ``ε`` is relative to: λ_max or :func:`mean_eigenvalue`."""
  if relative_to == "max":
    return lam_max
  if relative_to == "mean":
    return mean_eigenvalue(a)
  raise ValueError(f"relative_to={relative_to!r}; expected one of "
                   f"{', '.join(map(repr, RELATIVE_TO))}.")


def noise_floor(lam_max, d: int, dtype):
  """``d · ε_mach · λ_max``: eigenvalues below it are decomposition noise.

  A backward-stable eigensolver returns the eigenvalues of ``A + E`` with
  ``‖E‖₂ ≲ d·ε_mach·‖A‖₂``, so computed eigenvalues below this bound (the
  near-zero spectrum of rank-deficient statistics, ``±1e-7·λ_max`` in
  float32) carry no information and, left as they are, make the damped
  roots depend on rounding (jit vs. eager, a traced ``β₂``). They are treated
  as 0 before damping, as distributed Shampoo's pseudo-inverse option does.
  """
  return d * jnp.finfo(dtype).eps * jnp.maximum(lam_max, 0.0)


def power_from_eigen(q, lam, power, *, epsilon=0.0, relative_epsilon=True,
                     clip_negative=True, scale=None):
  """``Q diag((λ + δ)^{power}) Qᵀ`` from an eigendecomposition.

  With ``clip_negative`` (the relative-damping recipe of docs/algorithms.md
  §0) every ``λ`` below :func:`noise_floor` (negative ones included) is
  first set to 0; without it (the papers' absolute ``A + εI``) the
  eigenvalues are used as computed and a negative one gives a NaN the refresh
  guard rejects. ``δ`` is :func:`damping` of ``scale`` (default: the largest
  eigenvalue).

  Returns ``(power_of_A, damped_eigenvalues)``.
  """
  lam_max = jnp.max(lam, axis=-1)
  floor = noise_floor(lam_max, q.shape[-1], lam.dtype)[..., None]
  lam = jnp.where(clip_negative, jnp.where(lam < floor, 0.0, lam), lam)
  scale = lam_max if scale is None else scale
  lam = lam + damping(scale, epsilon, relative_epsilon)[..., None]
  powered = _bmm(q * (lam ** power)[..., None, :], jnp.swapaxes(q, -1, -2))
  return powered, lam


def matrix_power_eigh(a, power, *, epsilon=0.0, relative_epsilon=True,
                      clip_negative=True, relative_to="max"):
  """``(A + δI)^{power}`` for a stack of PSD matrices via eigh.

  ``δ`` is :func:`damping` of the largest eigenvalue (``relative_to="max"``)
  or of the mean eigenvalue ``tr(A)/d`` (``"mean"``, CASPR's ``ε_r``,
  docs/algorithms.md §4; see :func:`mean_eigenvalue`); see
  :func:`power_from_eigen` for ``clip_negative``.

  Returns ``(power_of_A, eigenvalues, eigenvectors, residual)`` where the
  eigenvalues are the damped ones and the residual is the relative
  reconstruction error of the decomposition.
  """
  a = symmetrize(a)
  lam, q = lapack.eigh(a)
  lam_max = jnp.max(lam, axis=-1)
  recon = _bmm(q * lam[..., None, :], jnp.swapaxes(q, -1, -2))
  residual = jnp.max(jnp.abs(recon - a), axis=(-2, -1)) / jnp.maximum(
      jnp.abs(lam_max), TINY)
  powered, lam = power_from_eigen(
      q, lam, power, epsilon=epsilon, relative_epsilon=relative_epsilon,
      clip_negative=clip_negative,
      scale=_damping_scale(a, lam_max, relative_to))
  return powered, lam, q, residual


def inverse_root_eigh(a, p, *, epsilon=1e-6, relative_epsilon=True,
                      relative_to="max"):
  """``A^{-1/p}`` of a stack of PSD matrices by eigh (ALGORITHMS §0).

  ``λ ← max(λ, 0) + ε·max(λ_max, tiny)`` (relative) or ``λ ← λ + ε``
  (absolute), ``root = Q diag(λ^{-1/p}) Qᵀ``. ``relative_to="mean"`` makes
  the relative damping ``ε·tr(A)/d`` instead (CASPR, ALGORITHMS §4). Runs in
  the dtype of ``a`` (pass float64 where x64 is enabled for the float64
  option).

  Returns ``(root, residual)``.
  """
  root, _, _, residual = matrix_power_eigh(
      a, -1.0 / p, epsilon=epsilon, relative_epsilon=relative_epsilon,
      clip_negative=relative_epsilon, relative_to=relative_to)
  return root, residual


def _matrix_int_power(t, p: int):
  """``T^p`` for a static positive integer ``p`` by repeated squaring."""
  result, base = None, t
  while p:
    if p & 1:
      result = base if result is None else _bmm(result, base)
    p >>= 1
    if p:
      base = _bmm(base, base)
  return result


def inverse_root_newton(a, p: int, *, epsilon=1e-6, relative_epsilon=True,
                        max_iters: int = 100, tol: float = 1e-6,
                        power_iters: int = 20, relative_to="max"):
  """``A^{-1/p}`` of a stack of PSD matrices by the coupled Newton iteration.

  ``A' = A + δI`` (``δ`` from :func:`damping` with λ_max from
  :func:`power_iteration`, or with :func:`mean_eigenvalue` for
  ``relative_to="mean"``); ``z = (1+p)/(2‖A'‖₂)``; ``M₀ = z A'``,
  ``X₀ = z^{1/p} I``; iterate ``T = ((p+1)I − M)/p``, ``X ← X T``,
  ``M ← T^p M`` while ``max|M − I| > tol``, the error decreases and fewer
  than ``max_iters`` steps were taken. Each matrix of the batch stops on its
  own; the iterate with the smallest error is returned. ``p`` must be a
  positive integer.

  Returns ``(root, residual)`` with ``residual = max|M − I|``.
  """
  p = int(p)
  a = symmetrize(a)
  eye = _eye_like(a)
  lam_max = power_iteration(a, power_iters)
  delta = damping(_damping_scale(a, lam_max, relative_to), epsilon,
                  relative_epsilon)
  a_damped = a + delta[..., None, None] * eye
  norm = jnp.maximum(lam_max + delta, TINY)
  z = (1.0 + p) / (2.0 * norm)
  m = z[..., None, None] * a_damped
  x = (z ** (1.0 / p))[..., None, None] * eye
  err = jnp.max(jnp.abs(m - eye), axis=(-2, -1))
  batch = a.shape[:-2]

  def cond(carry):
    i, _, _, _, active = carry
    return (i < max_iters) & jnp.any(active)

  def body(carry):
    i, x, m, err, active = carry
    t = ((p + 1.0) * eye - m) / p
    x_new = _bmm(x, t)
    m_new = _bmm(_matrix_int_power(t, p), m)
    err_new = jnp.max(jnp.abs(m_new - eye), axis=(-2, -1))
    # Always take the first step: max|M - I| (entrywise) can rise on it even
    # though every eigenvalue of M moves toward 1; X0 = z^(1/p) I is no root.
    improved = active & ((err_new < err) | (i == 0))
    take = improved[..., None, None]
    x = jnp.where(take, x_new, x)
    m = jnp.where(take, m_new, m)
    err = jnp.where(improved, err_new, err)
    active = improved & (err_new > tol)
    return i + 1, x, m, err, active

  active0 = jnp.broadcast_to(err > tol, batch)
  _, x, _, err, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(0), x, m, err, active0))
  return x, err


def inverse_root_qr(a, q, p, *, epsilon=1e-6, relative_epsilon=True,
                    relative_to="max", tolerance=0.01, iterations=1,
                    fallback=0.1):
  """``A^{-1/p}`` from the warm-started eigenbasis ``q`` (docs/algorithms.md §0).

  :func:`kronopt.linalg.eigenbasis.refine` takes up to ``iterations`` power +
  QR steps from ``q`` while the off-diagonal mass of ``Qᵀ A Q`` exceeds
  ``tolerance``; the Rayleigh quotients ``λ̂ = diag(Qᵀ A Q)``, clipped at 0
  and damped as for eigh, give ``root = Q diag(λ̂^{-1/p}) Qᵀ``. If any
  matrix's off-diagonal mass is still above ``fallback`` (the first refresh
  from ``q = I``, or statistics that moved fast), the whole stack is
  decomposed by eigh instead (:func:`kronopt.linalg.eigenbasis.eigenbasis`).

  Returns ``(root, basis, residual)``; the residual is the off-diagonal mass
  of the basis returned (about ``1e-7`` after eigh).
  """
  a = symmetrize(a)
  q, est, mass = eigenbasis_lib.refine(a, q, tolerance=tolerance,
                                       iterations=iterations)

  def by_eigh(_):
    q_e, _ = eigenbasis_lib.eigenbasis(a)
    _, est_e, mass_e = eigenbasis_lib.rayleigh(a, q_e)
    return q_e, est_e, mass_e

  q, est, mass = jax.lax.cond(jnp.any(mass > fallback), by_eigh,
                              lambda _: (q, est, mass), None)
  root, _ = power_from_eigen(
      q, est, -1.0 / p, epsilon=epsilon, relative_epsilon=relative_epsilon,
      clip_negative=relative_epsilon,
      scale=_damping_scale(a, jnp.max(est, axis=-1), relative_to))
  return root, q, mass


def inverse_root(a, p, *, method="eigh", epsilon=1e-6, relative_epsilon=True,
                 relative_to="max", **kwargs):
  """Dispatches to :func:`inverse_root_eigh` or :func:`inverse_root_newton`."""
  if method == "eigh":
    return inverse_root_eigh(a, p, epsilon=epsilon,
                             relative_epsilon=relative_epsilon,
                             relative_to=relative_to)
  if method == "newton":
    return inverse_root_newton(a, p, epsilon=epsilon,
                               relative_epsilon=relative_epsilon,
                               relative_to=relative_to, **kwargs)
  raise ValueError(f"root_method={method!r}; expected 'eigh' or 'newton'.")
