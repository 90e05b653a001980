"""Low-rank eigendecompositions of Kronecker factors (docs/algorithms.md §6).

The K-factors of K-FAC (Martens & Grosse 2015) are exponential averages
``M ← ρ M + (1−ρ) Â Âᵀ`` of batch Gram matrices. Their damped inverses are
kept as a :class:`LowRank` eigendecomposition ``M ≈ U diag(D) Uᵀ`` (``U``
``d×r`` orthonormal, ``D`` descending), obtained in one of three ways:

* exactly, from ``eigh`` of the ``d×d`` factor (:func:`from_eigh`; K-FAC);
* by a randomized symmetric EVD of the factor (:func:`randomized_eigh`;
  RS-KFAC, Puiu, "Randomized K-FACs: Speeding up K-FAC with Randomized
  Numerical Linear Algebra", arXiv 2206.15397);
* online, never forming the factor: Brand's update of a thin
  eigendecomposition by the new columns ``B = √(1−ρ) Â``
  (:func:`brand_update`; B-KFAC, Puiu, "Brand New K-FACs: Speeding up K-FAC
  with Online Decomposition Updates", arXiv 2210.08494, after Brand, "Fast
  low-rank modifications of the thin singular value decomposition", 2006),
  optionally corrected against the exact factor (:func:`rayleigh_ritz`).

The damped inverse is applied through the decomposition with the spectrum
continued at its smallest kept eigenvalue (:func:`inverse_apply`), which
costs ``O(d·r)`` per column. Every function is batched over a leading axis
of ``N`` stacked factors and decomposes through :mod:`kronopt.linalg.lapack`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kronopt.linalg import kronecker
from kronopt.linalg import lapack
from kronopt.linalg import roots

HIGHEST = jax.lax.Precision.HIGHEST


class LowRank(NamedTuple):
  """A batch of eigendecompositions ``U diag(D) Uᵀ`` (``d×d``, rank ``r``).

  Attributes:
    basis: ``[N, d, r]`` orthonormal columns ``U``.
    values: ``[N, r]`` eigenvalues ``D``, non-increasing, ``≥ 0``.
  """
  basis: jax.Array
  values: jax.Array


def _bmm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def _t(a):
  return jnp.swapaxes(a, -1, -2)


def init(n: int, d: int, r: int, dtype=jnp.float32) -> LowRank:
  """The zero factor (``D = 0``) with ``U = I[:, :r]``."""
  return LowRank(basis=jnp.broadcast_to(jnp.eye(d, r, dtype=dtype), (n, d, r)),
                 values=jnp.zeros((n, r), dtype))


def dense(lr: LowRank) -> jax.Array:
  """``U diag(D) Uᵀ`` as ``[N, d, d]`` (for tests and diagnostics)."""
  return _bmm(lr.basis * lr.values[:, None, :], _t(lr.basis))


def sort_descending(lr: LowRank) -> LowRank:
  """Orders the modes of each block by decreasing eigenvalue."""
  order = jnp.argsort(-lr.values, axis=-1)
  return LowRank(basis=jnp.take_along_axis(lr.basis, order[:, None, :], -1),
                 values=jnp.take_along_axis(lr.values, order, -1))


def truncate(lr: LowRank, rank: int) -> LowRank:
  """The top ``rank`` modes of each (sorted) block."""
  return LowRank(basis=lr.basis[..., :rank], values=lr.values[..., :rank])


def _from_symmetric_eigh(m, basis=None) -> LowRank:
  """Descending eigendecomposition of symmetric ``m``, values clipped at 0.

  With ``basis`` (``[N, d, k]``), ``m`` is ``k×k`` in those coordinates and
  the returned vectors are ``basis @ eigenvectors``.
  """
  lam, v = lapack.eigh(roots.symmetrize(m))
  lam, v = lam[..., ::-1], v[..., ::-1]
  if basis is not None:
    v = _bmm(basis, v)
  return LowRank(basis=v, values=jnp.maximum(lam, 0.0))


def from_eigh(m) -> LowRank:
  """The full (``r = d``) eigendecomposition of a PSD stack ``[N, d, d]``."""
  return _from_symmetric_eigh(m)


def brand_expand(lr: LowRank, b, rho) -> LowRank:
  """The eigendecomposition of ``ρ U D Uᵀ + B Bᵀ``, before truncation.

  Brand's update (arXiv 2210.08494, §3) with ``B`` ``[N, d, k]``:
  ``P = Uᵀ B``; ``Q R = B − U P`` (reduced QR); in the orthonormal basis
  ``[U Q]``,

      ρ U D Uᵀ + B Bᵀ = [U Q] K [U Q]ᵀ,
      K = [[ρ D + P Pᵀ, P Rᵀ], [R Pᵀ, R Rᵀ]]   ((r+k)×(r+k)),

  so ``eigh(K) = V Λ Vᵀ`` gives ``U ← [U Q] V``, ``D ← Λ``: cost
  ``O(d (r+k)²)``, linear in ``d``, and no ``d×d`` matrix. When
  ``d ≤ r + k`` the residual ``B − U P`` cannot have ``k`` independent
  columns outside ``span(U)``, and the ``d×d`` matrix is no larger than
  ``K``: it is then formed and decomposed directly (same result, no
  rank-deficient QR). Returns ``r + k`` modes (``d`` on the direct path),
  descending.
  """
  u, vals = lr.basis, lr.values
  d, r = u.shape[-2:]
  k = b.shape[-1]
  b = b.astype(u.dtype)
  scaled = rho * vals
  if d <= r + k:
    m = _bmm(u * scaled[:, None, :], _t(u)) + _bmm(b, _t(b))
    return _from_symmetric_eigh(m)
  p = _bmm(_t(u), b)
  q, rr = lapack.qr(b - _bmm(u, p))
  top = _bmm(p, _t(p)) + jax.vmap(jnp.diag)(scaled)
  side = _bmm(p, _t(rr))
  kmat = jnp.concatenate([
      jnp.concatenate([top, side], axis=-1),
      jnp.concatenate([_t(side), _bmm(rr, _t(rr))], axis=-1)], axis=-2)
  return _from_symmetric_eigh(kmat, basis=jnp.concatenate([u, q], axis=-1))


def _finite_per_block(*xs):
  ok = True
  for x in xs:
    ok &= jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
  return ok


def _select(ok, new: LowRank, old: LowRank) -> LowRank:
  return LowRank(basis=jnp.where(ok[:, None, None], new.basis, old.basis),
                 values=jnp.where(ok[:, None], new.values, old.values))


def brand_update(lr: LowRank, b, rho) -> LowRank:
  """Brand's update (:func:`brand_expand`) truncated to the top ``r`` modes.

  ``U D Uᵀ`` becomes the best rank-``r`` approximation of
  ``ρ U D Uᵀ + B Bᵀ``; for the K-factor EMA, ``B = √(1−ρ) Â``. A block whose
  ``B`` or result is non-finite keeps its previous decomposition (its ``B``
  is zeroed first, so that LAPACK never sees a NaN).
  """
  ok = _finite_per_block(b)
  b = jnp.where(ok[:, None, None], b, 0.0)
  new = truncate(brand_expand(lr, b, rho), lr.values.shape[-1])
  return _select(ok & _finite_per_block(new.basis, new.values), new, lr)


def orthogonality_error(lr: LowRank) -> jax.Array:
  """``max|UᵀU − I|`` per block (``[N]``)."""
  u = lr.basis
  eye = jnp.eye(u.shape[-1], dtype=u.dtype)
  return jnp.max(jnp.abs(_bmm(_t(u), u) - eye), axis=(-2, -1))


def reorthogonalize(lr: LowRank) -> LowRank:
  """Restores ``UᵀU = I`` while keeping ``U D Uᵀ``.

  ``U = Q R`` (reduced QR), ``R D Rᵀ = W Λ Wᵀ``, then ``U ← Q W``,
  ``D ← Λ``: the same matrix, in an orthonormal basis. ``O(d r²)``. Brand's
  updates lose orthogonality slowly in float32; this is run periodically.
  """
  q, rr = lapack.qr(lr.basis)
  s = _bmm(rr * lr.values[:, None, :], _t(rr))
  return _from_symmetric_eigh(s, basis=q)


def _gaussian(keys, shape, dtype):
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def randomized_eigh(m, rank: int, keys, *, oversample: int = 10,
                    power_iters: int = 3) -> LowRank:
  """The top-``rank`` eigenpairs of PSD ``m`` ``[N, d, d]`` by a randomized EVD.

  RS-KFAC (arXiv 2206.15397) after Halko, Martinsson & Tropp, "Finding
  structure with randomness", SIAM Review 2011: with ``l = rank +
  oversample`` and ``Ω`` Gaussian ``d×l`` (one key of ``keys`` per block),
  ``Y = (M Mᵀ)^q M Ω = M^{2q+1} Ω`` (``q = power_iters``, each product
  re-orthonormalised by a QR, as in ``torch.svd_lowrank`` which the
  authors' code calls), ``Q = qr(Y)``, ``eigh(Qᵀ M Q) = W Λ Wᵀ``, keep the
  top ``rank`` of ``U = Q W`` and ``Λ``. When ``l ≥ d`` the sketch would
  span everything and this is :func:`from_eigh`, truncated.
  """
  d = m.shape[-1]
  rank = min(rank, d)
  width = rank + oversample
  if width >= d:
    return truncate(from_eigh(m), rank)
  step = lambda _, q: lapack.qr(_bmm(m, q))[0]
  q = jax.lax.fori_loop(0, 2 * power_iters + 1, step,
                        _gaussian(keys, (d, width), m.dtype))
  h = _bmm(_t(q), _bmm(m, q))
  return truncate(_from_symmetric_eigh(h, basis=q), rank)


def num_corrected(rank: int, fraction: float) -> int:
  """How many modes :func:`rayleigh_ritz` corrects: ``round(fraction·r)``."""
  return min(rank, max(1, int(round(fraction * rank))))


def rayleigh_ritz(lr: LowRank, m, keys, *, fraction: float = 0.2) -> LowRank:
  """B-KFAC-c: corrects a random ``fraction`` of the modes against exact ``m``.

  Per block (one key of ``keys`` each), a random subset ``S`` of
  :func:`num_corrected` modes, ``U_S`` their columns, is replaced by the
  Rayleigh–Ritz pairs of ``m`` on ``span(U_S)``: ``U_Sᵀ M U_S = W Θ Wᵀ``,
  ``U_S ← U_S W``, ``D_S ← Θ`` (arXiv 2210.08494, B-KFAC-c; the authors'
  code does this, without a power step). The span is unchanged, so ``U``
  stays orthonormal; the corrected eigenvalues are the exact EMA's on it.
  Costs ``O(d² |S|)``. The subset is selected by a one-hot matrix (the
  ``|S|`` largest of ``r`` uniform draws), so selection and write-back are
  matmuls. The modes are re-sorted.
  """
  r = lr.values.shape[-1]
  s = num_corrected(r, fraction)
  scores = jax.vmap(lambda k: jax.random.uniform(k, (r,)))(keys)
  pick = jax.nn.one_hot(jax.lax.top_k(scores, s)[1], r,
                        dtype=lr.basis.dtype)  # [N, s, r]
  us = _bmm(lr.basis, _t(pick))
  corrected = _from_symmetric_eigh(_bmm(_t(us), _bmm(m, us)), basis=us)
  old_values = jnp.einsum("nsr,nr->ns", pick, lr.values, precision=HIGHEST)
  return sort_descending(LowRank(
      basis=lr.basis + _bmm(corrected.basis - us, pick),
      values=lr.values + jnp.einsum("ns,nsr->nr",
                                    corrected.values - old_values, pick,
                                    precision=HIGHEST)))


def inverse_scales(lr: LowRank, damping, relative=True):
  """``(a, t)`` of ``(·)^{-1} = U diag(a − t) Uᵀ + t I`` per block.

  The spectrum is continued at the smallest kept eigenvalue ``d_min``: the
  factor is taken as ``U diag(D) Uᵀ + d_min (I − U Uᵀ)``, damped by
  ``λ' = λ·max D`` (relative, :func:`kronopt.linalg.roots.damping`) or ``λ``
  (absolute). With ``λ_eff = λ' + d_min``, ``a = (D + λ')^{-1}`` on
  ``span(U)`` and ``t = λ_eff^{-1}`` elsewhere (arXiv 2210.08494, §4). A
  block whose spectrum is all zero (no statistics yet) gets the identity
  (``a = t = 1``).
  """
  vals = lr.values
  top = jnp.max(vals, axis=-1)
  lam = roots.damping(top, damping, relative)
  empty = top <= 0.0
  a = 1.0 / jnp.where(empty[:, None], 1.0, vals + lam[:, None])
  t = 1.0 / jnp.where(empty, 1.0, lam + jnp.min(vals, axis=-1))
  return a, t


def inverse_apply(lr: LowRank, x, axis: int, *, damping, relative=True):
  """``x ×_i (M + λ'I)^{-1}`` for stacked blocks ``x`` (``[N, d_1..d_k]``).

  ``(·)^{-1} X = U [(D + λ')^{-1} − λ_eff^{-1}] Uᵀ X + λ_eff^{-1} X`` with
  the continued spectrum of :func:`inverse_scales`, ``O(d·r)`` per column
  and no ``d×d`` matrix. With ``r = d`` it is the exact damped inverse.
  """
  a, t = inverse_scales(lr, damping, relative)
  u = lr.basis
  coef = kronecker.mode_product(x, _t(u), axis)
  shape = [a.shape[0]] + [1] * (x.ndim - 1)
  shape[axis + 1] = a.shape[1]
  coef = coef * jnp.reshape(a - t[:, None], shape)
  tail = jnp.reshape(t, [-1] + [1] * (x.ndim - 1))
  return tail * x + kronecker.mode_product(coef, u, axis)


def relative_error(lr: LowRank, m, num_iters: int = 30) -> jax.Array:
  """``‖M − U D Uᵀ‖₂ / ‖M‖₂`` per block, by power iteration (``[N]``)."""
  diff = m - dense(lr)
  sq = lambda a: roots.power_iteration(_bmm(a, _t(a)), num_iters)
  norm = lambda a: jnp.sqrt(jnp.maximum(sq(a), 0.0))
  return norm(diff) / jnp.maximum(norm(m), roots.TINY)


def rank_for(d: int, rank: int) -> int:
  """The kept rank of a ``d``-dimensional factor: ``min(rank, d)``."""
  return max(1, min(int(rank), int(d)))

