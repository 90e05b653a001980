"""Kronecker-structured products on stacked tensor blocks.

A block is an order-k tensor ``G`` (``[N, d_1, …, d_k]`` for a stack of N
blocks). With ``vec`` in row-major order, ``(P_1 ⊗ … ⊗ P_k) vec(G)`` is the
product of ``G`` with ``P_i`` along every mode i, and ``G_(i) G_(i)ᵀ`` is the
contraction of ``G`` with itself over every mode but i (ALGORITHMS.md,
Notation).
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = string.ascii_letters


def mode_gram(x, axis: int):
  """``G_(i) G_(i)ᵀ`` per block: ``[N, d_1..d_k] -> [N, d_i, d_i]``.

  ``axis`` counts block modes from 0 (the stacking axis is not a mode).
  """
  k = x.ndim - 1
  idx = _LETTERS[1:k + 1]
  left = "a" + idx
  right = "a" + idx[:axis] + "Z" + idx[axis + 1:]
  out = "a" + idx[axis] + "Z"
  return jnp.einsum(f"{left},{right}->{out}", x, x, precision=HIGHEST)


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
