"""A dense float64 numpy oracle of SOAP (docs/algorithms.md §0, §8).

Written from the math, independently of kronopt: numpy only, no jax and no
import from kronopt. Parameters are dicts ``name -> np.ndarray``.

Layout (§0): squeeze size-1 dims; rank ≤ 1 is plain Adam; adjacent dims are
merged left to right while the product stays ≤ ``block_size`` and at least
two dims remain; a merged dim larger than ``max_precond_dim`` is not rotated
and not split; every other merged dim larger than ``block_size`` is cut into
blocks of ``block_size`` (the last one shorter); a parameter left with no
rotated dim is plain Adam. The oracle works on each block's real (unpadded)
sub-block only, so agreement with kronopt's padded blocks shows that padding
changes nothing.

SOAP per block ``G`` and rotated axis i, at step ``t`` (1-based, counting
finite steps only; a non-finite gradient tree changes nothing and gives a
zero update):

* ``L_i ← β_s L_i + w G_(i) G_(i)ᵀ`` (``w = 1`` if ``β_s = 1`` else
  ``1 − β_s``); ``G' = G ×_i Q_iᵀ``; ``M ← β₁ M + (1−β₁) G``;
  ``V ← β₂ V + (1−β₂) G'²``;
* ``N' = (M ×_i Q_iᵀ)/(1−β₁ᵗ) / (√(V/(1−β₂ᵗ)) + ε)``, ``D = N' ×_i Q_i``,
  with the bases of the previous refresh;
* then, if ``c = t − 1 ≥ start`` and ``c % every == 0``: per axis,
  ``est = diag(Q_iᵀ L_i Q_i)``, ``order = argsort(−est)`` (stable), ``V``
  reordered along axis i by ``order``, and ``Q_i = eigh(L_i)`` (descending)
  on the first such refresh (``c − start < every``), else
  ``Q_i = qr(L_i Q_i[:, order])``.

Plain-Adam leaves: ``optax.scale_by_adam``'s update in float64. The
ready-made chain adds ``wd · params`` and scales by ``−lr``.
"""

import math
from typing import Optional

import numpy as np


def squeeze(shape):
  return tuple(int(d) for d in shape if d != 1)


def merged_shape(shape, block_size) -> Optional[tuple]:
  dims = list(squeeze(shape))
  if len(dims) <= 1 or 0 in dims:
    return None
  out = [dims.pop(0)]
  while dims:
    d = dims.pop(0)
    if out[-1] * d <= block_size and len(out) + len(dims) >= 2:
      out[-1] *= d
    else:
      out.append(d)
  return tuple(out)


def blocks_of(merged, axes, block_size):
  """Row-major list of per-block tuples of slices (real parts); only the
  rotated axes are split."""
  ranges = []
  for i, d in enumerate(merged):
    b = block_size if i in axes else d
    ranges.append([slice(s, min(s + b, d)) for s in range(0, d, b)])
  out = [()]
  for r in ranges:
    out = [prefix + (s,) for prefix in out for s in r]
  return out


def mode_product(g, m, axis):
  """``G ×_axis M``: ``y[…, a, …] = Σ_b M[a, b] G[…, b, …]``."""
  return np.moveaxis(np.tensordot(m, g, axes=([1], [axis])), 0, axis)


def mode_gram(g, axis):
  u = np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)
  return u @ u.T


def eigh_descending(a):
  _, q = np.linalg.eigh(0.5 * (a + a.T))
  return q[:, ::-1]


class SoapOracle:
  """``kronopt.scale_by_soap`` (or, with ``learning_rate``, ``kronopt.soap``)
  in float64."""

  def __init__(self, params: dict, *, b1=0.95, b2=0.95, shampoo_b2=None,
               eps=1e-8, block_size=1024, max_precond_dim=10_000,
               precondition_every=10, start_preconditioning_step=0,
               learning_rate=None, weight_decay=0.0):
    self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)
    self.bs = float(b2 if shampoo_b2 is None else shampoo_b2)
    self.every = precondition_every
    self.start = start_preconditioning_step
    self.lr, self.wd = learning_rate, weight_decay
    self.count = 0
    self.orders = []  # every column order a refresh applied (for tests)
    self.leaves = {}
    for name, x in params.items():
      shape = np.shape(x)
      merged = merged_shape(shape, block_size)
      axes = () if merged is None else tuple(
          i for i, d in enumerate(merged)
          if max_precond_dim is None or d <= max_precond_dim)
      if not axes:
        self.leaves[name] = dict(adam=True, m=np.zeros(shape),
                                 v=np.zeros(shape))
        continue
      blocks = []
      for idx in blocks_of(merged, axes, block_size):
        real = tuple(s.stop - s.start for s in idx)
        blocks.append(dict(
            index=idx, stats=[np.zeros((real[a], real[a])) for a in axes],
            bases=[np.eye(real[a]) for a in axes], m=np.zeros(real),
            v=np.zeros(real)))
      self.leaves[name] = dict(adam=False, merged=merged, axes=axes,
                               blocks=blocks)

  def _adam(self, leaf, g, t):
    leaf["m"] = self.b1 * leaf["m"] + (1 - self.b1) * g
    leaf["v"] = self.b2 * leaf["v"] + (1 - self.b2) * g * g
    m_hat = leaf["m"] / (1 - self.b1 ** t)
    v_hat = leaf["v"] / (1 - self.b2 ** t)
    return m_hat / (np.sqrt(v_hat) + self.eps)

  def _block(self, blk, g, axes, t, refresh):
    w = 1.0 if self.bs == 1.0 else 1.0 - self.bs
    blk["stats"] = [self.bs * s + w * mode_gram(g, a)
                    for s, a in zip(blk["stats"], axes)]
    g_rot = g
    for q, a in zip(blk["bases"], axes):
      g_rot = mode_product(g_rot, q.T, a)
    blk["m"] = self.b1 * blk["m"] + (1 - self.b1) * g
    blk["v"] = self.b2 * blk["v"] + (1 - self.b2) * g_rot ** 2
    m_rot = blk["m"]
    for q, a in zip(blk["bases"], axes):
      m_rot = mode_product(m_rot, q.T, a)
    n = (m_rot / (1 - self.b1 ** t)) / (
        np.sqrt(blk["v"] / (1 - self.b2 ** t)) + self.eps)
    for q, a in zip(blk["bases"], axes):
      n = mode_product(n, q, a)
    if refresh is not None:
      bases = []
      for s, q, a in zip(blk["stats"], blk["bases"], axes):
        est = np.einsum("ij,ik,kj->j", q, s, q)
        order = np.argsort(-est, kind="stable")
        self.orders.append(order)
        blk["v"] = np.take(blk["v"], order, axis=a)
        if refresh == "first":
          bases.append(eigh_descending(s))
        else:
          bases.append(np.linalg.qr(s @ q[:, order])[0])
      blk["bases"] = bases
    return n

  def update(self, grads: dict, params: Optional[dict] = None) -> dict:
    if not all(np.all(np.isfinite(g)) for g in grads.values()):
      return {k: np.zeros(np.shape(g)) for k, g in grads.items()}
    c = self.count
    t = c + 1
    refresh = None
    if c >= self.start and c % self.every == 0:
      refresh = "first" if c - self.start < self.every else "warm"
    out = {}
    for name, g in grads.items():
      g = np.asarray(g, np.float64)
      leaf = self.leaves[name]
      if leaf["adam"]:
        out[name] = self._adam(leaf, g, t)
        continue
      gm = g.reshape(leaf["merged"])
      d = np.zeros_like(gm)
      for blk in leaf["blocks"]:
        d[blk["index"]] = self._block(blk, gm[blk["index"]], leaf["axes"], t,
                                      refresh)
      out[name] = d.reshape(g.shape)
    self.count += 1
    if self.lr is None:
      return out
    return {k: -self.lr * (u + self.wd * np.asarray(params[k], np.float64))
            for k, u in out.items()}


def max_rel_err(actual, expected):
  """``max|actual − expected| / max|expected|`` (inf when non-finite)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  if not np.all(np.isfinite(actual)):
    return math.inf
  return float(np.max(np.abs(actual - expected))
               / max(np.max(np.abs(expected)), 1e-30))
