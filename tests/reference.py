"""A dense float64 numpy oracle of Shampoo (docs/algorithms.md §0, §1).

Written from the math, independently of kronopt: numpy only, no jax and no
import from kronopt. Parameters are dicts ``name -> np.ndarray``.

Conventions:

* ``vec`` is row-major, so ``kron(A, B) @ vec(G) == vec(A @ G @ B.T)``.
* Layout: squeeze size-1 dims; rank <= 1 is not preconditioned; adjacent dims
  are merged left to right while the product stays <= ``block_size`` and at
  least two dims remain; every merged dim larger than ``block_size`` is cut
  into blocks of ``block_size`` (the last one shorter). The oracle works on each
  block's real (unpadded) sub-block: zero padding must not change anything.
  Blocks are visited in row-major grid order.
* Per block and preconditioned axis: ``L_i <- b2 L_i + w G_(i) G_(i)^T`` with
  ``w = 1`` if ``b2 == 1`` else ``1 - b2`` (only when the whole gradient tree
  is finite); at ``t >= start`` with ``(t - start) % every == 0`` the root
  ``P_i = L_i^(-1/p)`` is refreshed by a float64 eigendecomposition (a
  non-finite root is rejected and the previous one kept); the direction is
  ``G`` (or the tensor given to precondition) multiplied along every
  preconditioned mode by ``P_i`` (itself before ``start``; zero for a
  non-finite step, which does not advance the step count ``t``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

TINY = 1e-30


# ---------------------------------------------------------------- Kronecker --

def vec(g):
  """Row-major vectorisation."""
  return np.asarray(g, np.float64).reshape(-1)


def kron(*mats):
  """``M_1 ⊗ M_2 ⊗ …`` (np.kron, matching row-major ``vec``)."""
  out = np.ones((1, 1))
  for m in mats:
    out = np.kron(out, np.asarray(m, np.float64))
  return out


def mode_product(g, m, axis):
  """``G ×_axis M``: ``y[…, a, …] = Σ_b M[a, b] G[…, b, …]``."""
  y = np.tensordot(np.asarray(m, np.float64), g, axes=([1], [axis]))
  return np.moveaxis(y, 0, axis)


def unfold(g, axis):
  """Mode-``axis`` matricization ``G_(i)`` (``d_i × N/d_i``)."""
  return np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)


def mode_gram(g, axis):
  """``G_(i) G_(i)ᵀ``."""
  u = unfold(g, axis)
  return u @ u.T


# ------------------------------------------------------------- matrix roots --

def sym_power(a, power):
  """``A^power`` of a symmetric positive definite matrix (float64 eigh)."""
  a = np.asarray(a, np.float64)
  a = 0.5 * (a + a.T)
  lam, q = np.linalg.eigh(a)
  return (q * lam ** power) @ q.T


def inverse_root(a, p, epsilon, relative_epsilon=True):
  """Damped ``A^{-1/p}`` in float64.

  relative: ``λ <- max(λ, 0) + ε·max(λ_max, 1e-30)``; absolute: ``λ <- λ + ε``
  (a negative damped eigenvalue gives NaN).
  """
  a = np.asarray(a, np.float64)
  a = 0.5 * (a + a.T)
  lam, q = np.linalg.eigh(a)
  if relative_epsilon:
    lam = np.maximum(lam, 0.0) + epsilon * max(lam.max(), TINY)
  else:
    lam = lam + epsilon
  with np.errstate(invalid="ignore", divide="ignore"):
    powered = lam ** (-1.0 / p)
  return (q * powered) @ q.T


# ------------------------------------------------------------------- layout --

def squeeze(shape):
  return tuple(int(d) for d in shape if d != 1)


def merged_shape(shape, block_size) -> Optional[tuple]:
  """The merged shape of a parameter, ``None`` when it is not preconditioned."""
  dims = list(squeeze(shape))
  if len(dims) <= 1:
    return None
  out = [dims.pop(0)]
  while dims:
    d = dims.pop(0)
    # Merging d into the last dim leaves len(out) + len(dims) dims in total.
    if out[-1] * d <= block_size and len(out) + len(dims) >= 2:
      out[-1] *= d
    else:
      out.append(d)
  return tuple(out)


def block_shape(merged, block_size):
  """The (padded) shape shared by every block of a parameter."""
  return tuple(min(d, block_size) for d in merged)


def block_index(merged, block_size):
  """Row-major list of per-block tuples of slices (real, unpadded parts)."""
  ranges = [[slice(s, min(s + block_size, d)) for s in range(0, d, block_size)]
            for d in merged]
  out = [()]
  for r in ranges:
    out = [prefix + (s,) for prefix in out for s in r]
  return out


def preconditioned_axes(bshape, one_sided):
  """All axes, or the (first) smallest axis of the padded block shape."""
  if not one_sided:
    return tuple(range(len(bshape)))
  smallest = min(bshape)
  return (list(bshape).index(smallest),)


def all_finite(tree: dict) -> bool:
  return all(np.all(np.isfinite(v)) for v in tree.values())


# ------------------------------------------------------------------ shampoo --

class ShampooOracle:
  """Shampoo's direction (kronopt.scale_by_shampoo's semantics), float64."""

  def __init__(self, params: dict, *, block_size=1024, b2=0.999,
               epsilon=1e-6, exponent=None, precondition_every=10,
               start_preconditioning_step=10, one_sided=False,
               relative_epsilon=True):
    self.block_size = block_size
    self.b2 = float(b2)
    self.epsilon = float(epsilon)
    self.exponent = exponent
    self.every = precondition_every
    self.start = start_preconditioning_step
    self.one_sided = one_sided
    self.relative_epsilon = relative_epsilon
    self.count = 0
    self.layout = {}
    self.blocks = {}
    for name, x in params.items():
      shape = np.shape(x)
      merged = merged_shape(shape, block_size)
      self.layout[name] = merged
      if merged is None:
        continue
      bshape = block_shape(merged, block_size)
      axes = preconditioned_axes(bshape, one_sided)
      blocks = []
      for idx in block_index(merged, block_size):
        real = tuple(s.stop - s.start for s in idx)
        blocks.append(dict(
            index=idx, axes=axes,
            stats=[np.zeros((real[a], real[a])) for a in axes],
            roots=[np.eye(real[a]) for a in axes]))
      self.blocks[name] = blocks

  def power(self, num_axes):
    if self.exponent is None:
      return 2.0 * num_axes
    return -1.0 / self.exponent

  def is_preconditioned(self, name):
    return self.layout[name] is not None

  @property
  def active(self):
    """Whether the step about to be taken uses the preconditioner."""
    return self.count >= self.start

  def update(self, grads: dict, inputs: Optional[dict] = None) -> dict:
    """Statistics from ``grads``; the roots applied to ``inputs`` (default
    ``grads``)."""
    inputs = grads if inputs is None else inputs
    t = self.count
    finite = all_finite(grads)
    w = 1.0 if self.b2 == 1.0 else 1.0 - self.b2
    due = t >= self.start and (t - self.start) % self.every == 0
    out = {}
    for name, g in grads.items():
      g = np.asarray(g, np.float64)
      x = np.asarray(inputs[name], np.float64)
      merged = self.layout[name]
      if merged is None:
        out[name] = x.copy() if finite else np.zeros_like(x)
        continue
      gm, xm = g.reshape(merged), x.reshape(merged)
      d = np.zeros_like(gm)
      for blk in self.blocks[name]:
        gb = gm[blk["index"]] if finite else np.zeros_like(gm[blk["index"]])
        xb = xm[blk["index"]] if finite else np.zeros_like(xm[blk["index"]])
        if finite:
          blk["stats"] = [self.b2 * s + w * mode_gram(gb, a)
                          for s, a in zip(blk["stats"], blk["axes"])]
        if due and finite:
          p = self.power(len(blk["axes"]))
          new = [inverse_root(s, p, self.epsilon, self.relative_epsilon)
                 for s in blk["stats"]]
          if all(np.all(np.isfinite(r)) for r in new):  # the refresh guard
            blk["roots"] = new
        db = xb
        if t >= self.start:
          for r, a in zip(blk["roots"], blk["axes"]):
            db = mode_product(db, r, a)
        d[blk["index"]] = db
      out[name] = d.reshape(g.shape)
    self.count += int(finite)
    return out


# -------------------------------------------------------------------- adam --

class AdamOracle:
  """Bias-corrected Adam (optax.scale_by_adam, eps_root = 0), float64.

  :meth:`moments` gives the filtered gradient ``m̂`` (Nesterov as optax's)
  and Adam's step ``m̂/(√v̂+ε)``; a non-finite step changes nothing.
  """

  def __init__(self, params: dict, b1=0.9, b2=0.999, eps=1e-8,
               nesterov=False):
    self.b1, self.b2, self.eps, self.nesterov = b1, b2, eps, nesterov
    self.m = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    self.v = {k: np.zeros(np.shape(v)) for k, v in params.items()}
    self.count = 0

  def moments(self, grads: dict) -> tuple[dict, dict]:
    """``(m̂, m̂/(√v̂+ε))`` per leaf (zeros for a non-finite step)."""
    if not all_finite(grads):
      zeros = {k: np.zeros(np.shape(g)) for k, g in grads.items()}
      return zeros, dict(zeros)
    self.count += 1
    t, b1 = self.count, self.b1
    m_hat, out = {}, {}
    for k, g in grads.items():
      g = np.asarray(g, np.float64)
      self.m[k] = b1 * self.m[k] + (1 - b1) * g
      self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
      if self.nesterov:
        m_hat[k] = (b1 * self.m[k] / (1 - b1 ** (t + 1))
                    + (1 - b1) * g / (1 - b1 ** t))
      else:
        m_hat[k] = self.m[k] / (1 - b1 ** t)
      v_hat = self.v[k] / (1 - self.b2 ** t)
      out[k] = m_hat[k] / (np.sqrt(v_hat) + self.eps)
    return m_hat, out

  def update(self, grads: dict) -> dict:
    """Adam's update; the state is left untouched by a non-finite step."""
    return self.moments(grads)[1]


def graft_update(direction: dict, magnitude: dict, preconditioned: dict,
                 active: bool, finite: bool) -> dict:
  """``U = D ‖U_g‖_F / max(‖D‖_F, tiny)``, or ``U_g`` (rank ≤ 1, before start)."""
  out = {}
  for k in direction:
    if not finite:
      out[k] = np.zeros(np.shape(direction[k]))
    elif preconditioned[k] and active:
      d = direction[k]
      out[k] = d * np.linalg.norm(magnitude[k]) / max(np.linalg.norm(d), TINY)
    else:
      out[k] = magnitude[k]
  return out


class ShampooChainOracle:
  """kronopt.shampoo with one momentum (docs/algorithms.md §0).

  ``m̂`` = Adam's bias-corrected first moment of the gradient (``b1``,
  Nesterov as optax); Shampoo's statistics from the raw gradient, its roots
  applied to ``m̂``; grafted per parameter onto ``m̂/(√v̂+ε)`` (adam, with
  ``graft_b2``, ``graft_eps``) or onto ``m̂`` (sgd); then ``+ wd·params``
  and ``−lr``. Rank ≤ 1 parameters and steps before the start take the
  graft's own step: exactly AdamW. A non-finite step is a zero update.
  """

  def __init__(self, params: dict, *, learning_rate, b1=0.9, b2=0.999,
               epsilon=1e-6, weight_decay=0.0, nesterov=True,
               graft_type="adam", graft_b2=0.999, graft_eps=1e-8,
               **shampoo_kwargs):
    self.lr = learning_rate
    self.wd = weight_decay
    self.shampoo = ShampooOracle(params, b2=b2, epsilon=epsilon,
                                 **shampoo_kwargs)
    if graft_type not in ("adam", "sgd"):
      raise ValueError(f"graft_type={graft_type!r}: the oracle has adam, sgd")
    self.graft_type = graft_type
    self.adam = AdamOracle(params, b1=b1, b2=graft_b2, eps=graft_eps,
                           nesterov=nesterov)

  def update(self, grads: dict, params: dict) -> dict:
    finite = all_finite(grads)
    active = self.shampoo.active
    m_hat, adam_step = self.adam.moments(grads)
    d = self.shampoo.update(grads, m_hat)
    ug = adam_step if self.graft_type == "adam" else m_hat
    pre = {k: self.shampoo.is_preconditioned(k) for k in grads}
    u = graft_update(d, ug, pre, active, finite)
    out = {}
    for k in u:
      v = u[k] + self.wd * np.asarray(params[k], np.float64) if finite else u[k]
      out[k] = -self.lr * v
    return out


# ----------------------------------------------------------- test helpers --

def random_psd(rng, d, condition, n=None):
  """PSD matrices with eigenvalues log-spaced from 1 down to ``1/condition``.

  Returns ``(a, lam)`` of shapes ``[n, d, d]`` and ``[n, d]`` (``n`` None:
  a single matrix).
  """
  shape = () if n is None else (n,)
  mats, lams = [], []
  for _ in range(1 if n is None else n):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.logspace(0.0, -math.log10(condition), d)
    mats.append((q * lam) @ q.T)
    lams.append(lam)
  a, lam = np.stack(mats), np.stack(lams)
  return (a.reshape(shape + (d, d)), lam.reshape(shape + (d,)))


def max_rel_err(actual, expected):
  """``max|actual − expected| / max|expected|`` (inf when non-finite)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  if not np.all(np.isfinite(actual)):
    return math.inf
  return float(np.max(np.abs(actual - expected)) /
               max(np.max(np.abs(expected)), TINY))
