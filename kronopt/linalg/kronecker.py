"""Kronecker-structured products on stacked tensor blocks.

A block is an order-k tensor ``G`` (``[N, d_1, …, d_k]`` for a stack of N
blocks). With ``vec`` in row-major order, ``(P_1 ⊗ … ⊗ P_k) vec(G)`` is the
product of ``G`` with ``P_i`` along every mode i, and ``G_(i) G_(i)ᵀ`` is the
contraction of ``G`` with itself over every mode but i (docs/algorithms.md,
Notation).
"""

import string

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = string.ascii_letters


def mode_cross_gram(x, y, axis: int):
  """``X_(i) Y_(i)ᵀ`` per block: ``[N, d_1..d_k]² -> [N, d_i, d_i]``.

  The contraction of ``x`` with ``y`` over every mode but i. ``axis`` counts
  block modes from 0 (the stacking axis is not a mode).
  """
  k = x.ndim - 1
  idx = _LETTERS[1:k + 1]
  left = "a" + idx
  right = "a" + idx[:axis] + "Z" + idx[axis + 1:]
  out = "a" + idx[axis] + "Z"
  return jnp.einsum(f"{left},{right}->{out}", x, y, precision=HIGHEST)


def mode_gram(x, axis: int):
  """``G_(i) G_(i)ᵀ`` per block: ``[N, d_1..d_k] -> [N, d_i, d_i]``."""
  return mode_cross_gram(x, x, axis)


def weighted_mode_gram(x, axis: int, mats: dict):
  """``G_(i) (⊗_{j≠i} M_j) G_(i)ᵀ`` per block.

  The mode-i statistic with every other mode j in ``mats`` (axis ->
  ``[N, d_j, d_j]``, symmetric) weighted by ``M_j``; modes absent from
  ``mats`` are weighted by ``I``. For a matrix, ``G M_R Gᵀ`` (axis 0) or
  ``Gᵀ M_L G`` (axis 1): the online power iteration of Morwani et al. 2024
  (ALGORITHMS §3).
  """
  others = {j: m for j, m in mats.items() if j != axis}
  return mode_cross_gram(x, kron_apply(x, others), axis)


def mode_product(x, m, axis: int):
  """``G ×_i M`` per block: ``y[…, a, …] = Σ_b M[a, b] x[…, b, …]``.

  ``x`` is ``[N, d_1..d_k]`` and ``m`` is ``[N, d_i, d_i]`` (or ``[N, e, d_i]``).
  """
  k = x.ndim - 1
  idx = _LETTERS[1:k + 1]
  src = "a" + idx
  mat = "aZ" + idx[axis]
  out = "a" + idx[:axis] + "Z" + idx[axis + 1:]
  return jnp.einsum(f"{mat},{src}->{out}", m, x, precision=HIGHEST)


def kron_apply(x, mats: dict):
  """``(⊗_i M_i) vec(G)``: a mode product along every axis in ``mats``."""
  for axis, m in mats.items():
    x = mode_product(x, m, axis)
  return x


# Explicit (mn)×(mn) matrices: the optimal Kronecker view of Morwani et al.,
# "A New Perspective on Shampoo's Preconditioner", 2024 (ALGORITHMS §3), after
# Van Loan & Pitsianis, "Approximation with Kronecker products", 1993.


def rearrange(h, shape):
  """The rearrangement ``𝓡(H)_{(i,k),(j,l)} = H_{(i,j),(k,l)}``.

  ``H`` is ``(mn)×(mn)`` with ``(m, n) = shape`` (row index ``(i, j)``,
  row-major). ``𝓡(H)`` is ``m²×n²`` and ``‖H − A⊗B‖_F =
  ‖𝓡(H) − vec A vec Bᵀ‖_F``: Kronecker approximation is rank-1
  approximation of ``𝓡(H)``.
  """
  m, n = shape
  h4 = jnp.reshape(h, (m, n, m, n))
  return jnp.reshape(jnp.transpose(h4, (0, 2, 1, 3)), (m * m, n * n))


def kronecker_power_step(h, a, b):
  """One power-iteration step on ``𝓡(H)``: ``(𝓡(H) vec B, 𝓡(H)ᵀ vec A)``.

  Returned as matrices ``(m×m, n×n)``. From ``(I, I)`` and
  ``H = E[g gᵀ]`` it gives exactly Shampoo's ``(E[G Gᵀ], E[Gᵀ G])``.
  """
  m, n = a.shape[0], b.shape[0]
  h4 = jnp.reshape(h, (m, n, m, n))
  new_a = jnp.einsum("ijkl,jl->ik", h4, b, precision=HIGHEST)
  new_b = jnp.einsum("ijkl,ik->jl", h4, a, precision=HIGHEST)
  return new_a, new_b


def _unit(x):
  return x / jnp.maximum(jnp.linalg.norm(x), 1e-30)


def optimal_kronecker(h, shape, num_iters: int = 50):
  """The Frobenius-optimal ``A⊗B ≈ H`` by power iteration on ``𝓡(H)``.

  Starts from ``(A, B) = (I, I)``; each step is
  :func:`kronecker_power_step` followed by normalisation, so ``A`` and ``B``
  converge to the top singular vectors of ``𝓡(H)`` (for PSD ``H`` they stay
  PSD). Returns ``(σ·Â, B̂)`` with ``‖B̂‖_F = 1`` and
  ``σ = vec Âᵀ 𝓡(H) vec B̂``, the top singular value, so that ``A⊗B`` is the
  approximation itself.
  """
  m, n = shape
  init = (jnp.eye(m, dtype=h.dtype), jnp.eye(n, dtype=h.dtype))

  def body(_, ab):
    new_a, new_b = kronecker_power_step(h, *ab)
    return _unit(new_a), _unit(new_b)

  a, b = jax.lax.fori_loop(0, num_iters, body, init)
  sigma = jnp.vdot(a, kronecker_power_step(h, a, b)[0])
  return sigma * a, b


def cosine_similarity(h, h_hat):
  """``⟨H, Ĥ⟩_F / (‖H‖_F ‖Ĥ‖_F)``, how well ``Ĥ`` matches ``H`` in direction."""
  num = jnp.vdot(h, h_hat)
  return num / (jnp.linalg.norm(h) * jnp.linalg.norm(h_hat))
