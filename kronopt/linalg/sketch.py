"""Frequent Directions sketches of Kronecker factors (docs/algorithms.md §5).

Frequent Directions (Liberty, "Simple and deterministic matrix sketching",
KDD 2013; Ghashami et al., SIAM J. Comput. 2016) with exponential decay, as
used by Sketchy (Feinberg, Chen, Sun, Anil & Hazan, "Sketchy: Memory-efficient
adaptive regularization with Frequent Directions", NeurIPS 2023).

A :class:`Sketch` of a ``d×d`` statistic ``C_t = Σ_s β₂^{t−s} G_s G_sᵀ`` is
``U diag(σ²) Uᵀ`` with ``U`` ``d×k`` orthonormal, plus the escaped mass ``ρ``:

    0 ⪯ C_t − U diag(σ²) Uᵀ ⪯ ρ I.

Both ``σ`` and ``ρ`` are kept as roots (``σ`` and ``r = √ρ``), and every
step decomposes ``Z`` divided by its largest entry, so that a sketch of
gradients from ``1e-30`` up to the float32 range of Shampoo's statistic
(:func:`representable`) is represented without under- or overflow.

:func:`fd_update` has two methods. ``"exact"`` decomposes ``Z`` (a ``d×d``
``eigh`` when ``Z`` is wide); ``"randomized"`` compresses ``Z`` to ``l = k +
oversample`` columns by a randomized range step warm-started at ``U`` and
decomposes only the ``d×l`` result, linear in ``d`` (see its docstring for
the bound it keeps).

Its inverse root is applied as a :class:`LowRankRoot` without ever forming a
``d×d`` matrix, so a sketch and its root take ``O(d·k)`` memory. Every function
is batched over a leading axis of ``N`` stacked blocks.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from kronopt import engine
from kronopt.linalg import kronecker
from kronopt.linalg import lapack
from kronopt.linalg import roots

HIGHEST = jax.lax.Precision.HIGHEST
FD_METHODS = ("exact", "randomized")
OVERSAMPLE = 16  # default columns beyond k of the randomized range step
MASS_BLOCK = 4  # columns of the block power estimate of the escaped mass
MASS_ITERS = 4  # its steps


class Sketch(NamedTuple):
  """A batch of FD sketches ``U diag(σ²) Uᵀ`` with escaped mass ``ρ = r²``.

  Attributes:
    basis: ``[N, d, k]`` orthonormal columns ``U``.
    sigma: ``[N, k]`` root singular values ``σ``, non-increasing.
    sqrt_rho: ``[N]`` the root ``r = √ρ`` of the escaped mass ``ρ``.
  """
  basis: jax.Array
  sigma: jax.Array
  sqrt_rho: jax.Array


class LowRankRoot(NamedTuple):
  """A batch of operators ``P = U diag(a) Uᵀ + t (I − U Uᵀ)``.

  Attributes:
    basis: ``[N, d, k]`` orthonormal columns ``U``.
    scale: ``[N, k]`` the root's eigenvalues ``a`` on ``span(U)``.
    tail: ``[N]`` the root's eigenvalue ``t`` on the complement of ``span(U)``.
  """
  basis: jax.Array
  scale: jax.Array
  tail: jax.Array


def _bmm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _t(a):
  return jnp.swapaxes(a, -1, -2)


def _leading_eye(n, d, k, dtype):
  return jnp.broadcast_to(jnp.eye(d, k, dtype=dtype), (n, d, k))


def init_sketch(n: int, d: int, k: int, dtype=jnp.float32) -> Sketch:
  """The empty sketch (``σ = 0``, ``ρ = 0``) with ``U = I[:, :k]``."""
  return Sketch(basis=_leading_eye(n, d, k, dtype),
                sigma=jnp.zeros((n, k), dtype),
                sqrt_rho=jnp.zeros((n,), dtype))


def init_root(n: int, d: int, k: int, dtype=jnp.float32) -> LowRankRoot:
  """The identity operator as a :class:`LowRankRoot`."""
  return LowRankRoot(basis=_leading_eye(n, d, k, dtype),
                     scale=jnp.ones((n, k), dtype), tail=jnp.ones((n,), dtype))


def _finite_per_block(x):
  return jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


def left_singular_pairs(z):
  """``(V, s²)`` of the thin SVD ``Z = V s Wᵀ`` (``[N, d, c]``), s descending.

  A wide ``Z`` (``d ≤ c``) goes through ``eigh(Z Zᵀ)`` (``d×d``), which skips
  the right singular vectors (about 5× faster than the SVD on CPU at
  ``1024×1280``) with ``s²`` accurate to ``O(ε_mach · s_1²)``, the precision
  of Shampoo's statistics; a tall ``Z`` goes through its thin SVD, whose cost
  ``O(d·c²)`` is already linear in ``d``.
  """
  d, c = z.shape[-2:]
  if d > c:
    v, s, _ = lapack.svd(z)
    return v, s ** 2
  s2, v = lapack.eigh(_bmm(z, _t(z)))
  return v[..., ::-1], jnp.maximum(s2[..., ::-1], 0.0)


def _gaussian(keys, shape, dtype):
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def _orthonormal(x):
  return lapack.qr(x)[0]


def range_basis(z, start, power_iters):
  """Orthonormal ``W`` (``[N, c, l]``) spanning ``(ZᵀZ)^q Zᵀ Ω``.

  The randomized range finder of Halko, Martinsson & Tropp ("Finding
  structure with randomness", SIAM Review 2011, Alg. 4.4) for the row space
  of ``Z`` (``[N, d, c]``), from the ``d×l`` start ``Ω`` and ``q =
  power_iters`` power steps (may be traced), each re-orthonormalised by a
  QR.
  """
  step = lambda _, w: _orthonormal(_bmm(_t(z), _bmm(z, w)))
  return jax.lax.fori_loop(0, power_iters, step,
                           _orthonormal(_bmm(_t(z), start)))


def escaped_mass(z, w, basis, sigma2, o):
  """A lower bound on ``λ_max(Z Zᵀ − U diag(σ²) Uᵀ)`` per block.

  Block power iteration (``MASS_ITERS`` steps) on the PSD operator
  ``x ↦ Z Zᵀ x − U diag(σ²) Uᵀ x``, started from the range of the dropped
  part, ``Z (I − W Wᵀ) O`` for the random ``O`` (``[N, c, b]``); the value
  is the largest Rayleigh–Ritz value of the final orthonormal block, which
  never exceeds ``λ_max`` (up to rounding).
  """
  def apply(x):
    return _bmm(z, _bmm(_t(z), x)) - _bmm(basis * sigma2[:, None, :],
                                          _bmm(_t(basis), x))

  x = _bmm(z, o - _bmm(w, _bmm(_t(w), o)))
  x = jax.lax.fori_loop(0, MASS_ITERS, lambda _, x: _orthonormal(apply(x)), x)
  lam, _ = lapack.eigh(roots.symmetrize(_bmm(_t(x), apply(x))))
  return jnp.maximum(lam[:, -1], 0.0)


def uses_range_step(d: int, k: int, m: int, oversample: int) -> bool:
  """Whether ``"randomized"`` compresses a ``d × (k + m)`` ``Z``.

  Only when ``2 (k + oversample) ≤ min(d, k + m)``: a wider compression
  costs about as much as the exact decomposition, and that is then used.
  """
  return 2 * (k + oversample) <= min(d, k + m)


def _default_keys(n):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
      jnp.arange(n))


def _exact_step(z, k):
  """``(U, σ², e)`` of the exact FD step on ``z``, escaped mass ``e = c²``."""
  v, s2 = left_singular_pairs(z)
  cutoff2 = s2[:, k] if s2.shape[-1] > k else jnp.zeros_like(s2[:, 0])
  sigma2 = jnp.maximum(s2[:, :k] - cutoff2[:, None], 0.0)
  return v[:, :, :k], sigma2, cutoff2


def _randomized_step(z, basis, keys, oversample, power_iters):
  """``(U, σ², e)`` of the FD step on ``Z W``, ``e`` estimated (fd_update)."""
  n, d, c = z.shape
  k = basis.shape[-1]
  # One draw for both random blocks (each jax.random call compiles anew).
  noise = _gaussian(keys, (d * oversample + c * MASS_BLOCK,), z.dtype)
  start = jnp.concatenate(
      [basis, jnp.reshape(noise[:, :d * oversample], (n, d, oversample))], -1)
  w = range_basis(z, start, power_iters)
  u, sigma2, cutoff2 = _exact_step(_bmm(z, w), k)
  o = jnp.reshape(noise[:, d * oversample:], (n, c, MASS_BLOCK))
  mass = jnp.maximum(cutoff2, escaped_mass(z, w, u, sigma2, o))
  return u, sigma2, mass


def representable(top, b2):
  """Whether Shampoo's statistic of largest root eigenvalue ``top`` is finite.

  The sketch approximates ``C_t = L_t / (1−β₂)`` of Shampoo's ``L_t``
  (``L_t`` itself when β₂ = 1); a step is representable when ``L_t``'s
  largest eigenvalue ``w·top²`` (``w = 1−β₂``, or 1) is finite in ``top``'s
  dtype, so that Sketchy and Shampoo skip the same steps.
  """
  weight = jnp.where(b2 < 1, 1.0 - b2, 1.0)
  return jnp.isfinite(jnp.square(jnp.sqrt(weight).astype(top.dtype) * top))


def fd_update(sketch: Sketch, g: jax.Array, b2, *, method: str = "exact",
              keys: Optional[jax.Array] = None,
              oversample: int = OVERSAMPLE, power_iters=1) -> Sketch:
  """One decayed Frequent Directions step with new columns ``g`` ``[N, d, m]``.

  ``Z = [√β₂ U diag(σ), G]`` (``d × (k + m)``), decomposed as ``Z/s`` with
  ``s = max|Z|`` per block (scale-free, so that ``1e-30`` gradients keep
  their spectrum), and ``ρ ← β₂ ρ + e`` with ``e`` the mass escaped this step.

  * ``"exact"``: thin SVD ``Z = V s Wᵀ`` (:func:`left_singular_pairs`),
    cutoff ``c = s_{k+1}`` (0 if there is none), ``σ_j = √(s_j² − c²)``,
    ``U = V[:, :k]``, ``e = c²``. The FD guarantee
    ``0 ⪯ C_t − U diag(σ²) Uᵀ ⪯ ρ I`` holds exactly.
  * ``"randomized"`` (when :func:`uses_range_step`, else ``"exact"``): ``W``
    (``(k+m)×l``, ``l = k + oversample``) orthonormal from the range finder
    (:func:`range_basis`) started at ``Ω = [U, Gaussian d×oversample]``
    (the previous basis is the warm start), then the exact step on the
    ``d×l`` matrix ``Z W``. As ``Z Zᵀ = Z W Wᵀ Zᵀ + Z (I−WWᵀ) Zᵀ`` with both
    terms PSD, the new sketch never exceeds ``β₂ (sketch) + G Gᵀ``, so
    ``0 ⪯ C_t − U diag(σ²) Uᵀ`` still holds exactly. The escaped mass
    ``e = max(c², λ̂)`` with ``λ̂`` a power estimate of ``λ_max(Z Zᵀ −
    U diag(σ²) Uᵀ)`` (:func:`escaped_mass`); both are lower bounds of that
    ``λ_max``, so the upper bound holds as ``C_t − U diag(σ²) Uᵀ ⪯ (1+η) ρ
    I`` with ``η`` the largest relative shortfall of an estimate (``η = 0``
    for the exact method; a few percent in the tests). Cost ``O(d (k+m) l)``
    in matmuls, QRs of ``(k+m)×l``, a thin SVD of ``d×l`` and no ``d×d``
    matrix.

  Before truncation ``Z Zᵀ = β₂ U diag(σ²) Uᵀ + G Gᵀ``, so the new
  columns enter with weight 1. A block whose ``Z`` is non-finite, or whose
  statistic would not be finite in the sketch's dtype (:func:`representable`
  with ``top = √(σ₁² + ρ)``: a 1e25 entry does that), comes out NaN (its
  ``Z`` is zeroed before the decomposition, so that LAPACK never sees a
  NaN), so that a caller (the engine) sees the failure and skips the step.

  Args:
    sketch: the current sketches.
    g: ``[N, d, m]`` new columns.
    b2: decay ``β₂``.
    method: one of :data:`FD_METHODS`.
    keys: ``[N]`` PRNG keys, one per block, for ``"randomized"`` (default:
      ``fold_in(key(0), block)``).
    oversample: ``l − k`` of ``"randomized"`` (static).
    power_iters: power steps of ``"randomized"``'s range finder (may be
      traced).
  """
  n, d, k = sketch.basis.shape
  dtype = sketch.basis.dtype
  old = jnp.sqrt(b2).astype(dtype) * sketch.basis * sketch.sigma[:, None, :]
  z = jnp.concatenate([old, g.astype(dtype)], axis=-1)
  finite = _finite_per_block(z) & jnp.isfinite(sketch.sqrt_rho)
  scale = jnp.max(jnp.abs(jnp.where(finite[:, None, None], z, 0.0)),
                  axis=(-2, -1))
  scale = jnp.where(scale > 0, scale, 1.0)
  z = jnp.where(finite[:, None, None], z / scale[:, None, None], 0.0)
  if method == "randomized" and uses_range_step(d, k, g.shape[-1],
                                                oversample):
    keys = _default_keys(n) if keys is None else keys
    basis, sigma2, mass = _randomized_step(z, sketch.basis, keys, oversample,
                                           power_iters)
  else:
    basis, sigma2, mass = _exact_step(z, k)
  rho = b2 * jnp.square(sketch.sqrt_rho / scale) + mass
  new = Sketch(basis=basis, sigma=scale[:, None] * jnp.sqrt(sigma2),
               sqrt_rho=scale * jnp.sqrt(rho))
  ok = finite & representable(scale * jnp.sqrt(sigma2[:, 0] + rho), b2)
  ok &= _finite_per_block(new.basis) & _finite_per_block(new.sigma)
  ok &= jnp.isfinite(new.sqrt_rho)
  failed = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), new)
  return engine.tree_select(ok, new, failed)


def inverse_root(sketch: Sketch, p, *, epsilon, relative_epsilon=True):
  """``(U diag(σ²) Uᵀ + ρ I + ε' I)^{-1/p}`` as a :class:`LowRankRoot`.

  ``a = (σ² + ρ + ε')^{-1/p}``, ``t = (ρ + ε')^{-1/p}`` with
  ``ε' = ε · λ`` (relative to ``λ = max(σ² + ρ)``) or ``ε`` (absolute).
  The relative root is computed scale-free, ``a = μ^{-2/p} ((σ/μ)² +
  (r/μ)² + ε)^{-1/p}`` with ``μ = √λ``, so that a sketch of ``1e-30``
  gradients gets the same root as one of ``1`` up to the factor
  ``μ^{-2/p}``; only the empty sketch (``λ = 0``) takes the floor
  ``ε' = ε · tiny`` (:func:`kronopt.linalg.roots.damping`), by design the
  largest root.

  Returns ``(root, residual)`` where the residual ``max|UᵀU − I|`` measures
  the loss of orthonormality of the basis (checked by the refresh guard).
  """
  sigma, r = sketch.sigma, sketch.sqrt_rho
  mu = jnp.hypot(jnp.max(sigma, axis=-1), r)
  safe = jnp.where(mu > 0, mu, 1.0)
  unit = lambda x: jnp.square(x / safe[:, None])
  rho_unit = unit(r[:, None])
  empty = jnp.power(jnp.asarray(epsilon * roots.TINY, sigma.dtype), -1.0 / p)
  prefactor = safe ** (-2.0 / p)

  def relative(e):
    return jnp.where(mu[:, None] > 0, prefactor[:, None] * (e + epsilon) ** (
        -1.0 / p), empty)

  def absolute(eig):
    return (eig + epsilon) ** (-1.0 / p)

  rho = jnp.square(r)[:, None]
  scale = jnp.where(relative_epsilon, relative(unit(sigma) + rho_unit),
                    absolute(jnp.square(sigma) + rho))
  tail = jnp.where(relative_epsilon, relative(rho_unit), absolute(rho))
  root = LowRankRoot(basis=sketch.basis, scale=scale.astype(sigma.dtype),
                     tail=tail[:, 0].astype(sigma.dtype))
  u = sketch.basis
  eye = jnp.eye(u.shape[-1], dtype=u.dtype)
  residual = jnp.max(jnp.abs(_bmm(_t(u), u) - eye), axis=(-2, -1))
  return root, residual


def apply_root(root: LowRankRoot, x: jax.Array, axis: int) -> jax.Array:
  """``x ×_i P`` for stacked blocks ``x`` (``[N, d_1..d_k]``), ``d_i = d``.

  ``P x = U diag(a) Uᵀ x + t (x − U Uᵀ x) = t x + U diag(a − t) Uᵀ x``,
  computed with ``O(d·k)`` work per column and no ``d×d`` matrix.
  """
  u = root.basis
  coef = kronecker.mode_product(x, jnp.swapaxes(u, -1, -2), axis)
  shift = root.scale - root.tail[:, None]
  shape = [shift.shape[0]] + [1] * (x.ndim - 1)
  shape[axis + 1] = shift.shape[1]
  coef = coef * jnp.reshape(shift, shape)
  tail = jnp.reshape(root.tail, [-1] + [1] * (x.ndim - 1))
  return tail * x + kronecker.mode_product(coef, u, axis)
