"""A dense float64 numpy oracle of K-FAC (docs/algorithms.md §0, §6).

Written from the specification with numpy only (no kronopt import). Per
registered layer, from the statistics ``Â`` (``d_a × n``) and ``Γ̂``
(``d_g × n``) and the gradient block ``G`` (``d_a × d_g``: the matricised
kernel with the bias row appended):

    A ← ρ A + (1−ρ) Â Âᵀ,   Γ ← ρ Γ + (1−ρ) Γ̂ Γ̂ᵀ   (from 0, every T_cov)
    A⁻¹, Γ⁻¹ = (A + λ λ_max(A) I)⁻¹, (Γ + λ λ_max(Γ) I)⁻¹   (every T_inv)
    V = A⁻¹ G Γ⁻¹

A factor with no positive eigenvalue (no statistics yet) is inverted as the
identity. :class:`KFACChainOracle` adds the ready-made chain: the direction
is applied to Adam's bias-corrected first moment ``m̂`` (statistics from the
layer statistics, not the gradient), grafted per leaf onto Adam's step, then
decoupled weight decay and the learning rate; leaves that no layer covers
take Adam's step (docs/algorithms.md §0, "One momentum").
"""

import numpy as np

from reference import AdamOracle
from reference import all_finite
from reference import graft_update


def damped_inverse(m, damping, relative=True):
  """``(M + λ' I)⁻¹``, ``λ' = λ·λ_max`` (relative) or ``λ``; ``I`` if M = 0."""
  lam, q = np.linalg.eigh(0.5 * (m + m.T))
  lam = np.maximum(lam, 0.0)
  if lam.max() <= 0.0:
    return np.eye(m.shape[0])
  shift = damping * lam.max() if relative else damping
  return (q / (lam + shift)) @ q.T


def to_block(kernel, bias, in_axes, out_axes):
  """``[∇W_(in, out); ∇bᵀ]`` as a ``d_a × d_g`` float64 matrix."""
  kernel = np.asarray(kernel, np.float64)
  d_in = int(np.prod([kernel.shape[i] for i in in_axes]))
  g = np.transpose(kernel, tuple(in_axes) + tuple(out_axes)).reshape(d_in, -1)
  if bias is None:
    return g
  return np.vstack([g, np.asarray(bias, np.float64).reshape(1, -1)])


def from_block(block, kernel_shape, in_axes, out_axes, has_bias):
  """Inverse of :func:`to_block`: ``(kernel, bias_row or None)``."""
  axes = tuple(in_axes) + tuple(out_axes)
  d_in = int(np.prod([kernel_shape[i] for i in in_axes]))
  permuted = tuple(kernel_shape[i] for i in axes)
  kernel = np.transpose(block[:d_in].reshape(permuted), np.argsort(axes))
  return kernel, (block[d_in] if has_bias else None)


class KFACLayerOracle:
  """Exact K-FAC for one layer (method ``"eigh"``)."""

  def __init__(self, d_a, d_g, *, ema=0.95, damping=1e-3, relative=True):
    self.ema, self.damping, self.relative = ema, damping, relative
    self.a = np.zeros((d_a, d_a))
    self.g = np.zeros((d_g, d_g))
    self.a_inv, self.g_inv = np.eye(d_a), np.eye(d_g)

  def statistics(self, a_hat, g_hat):
    a_hat = np.asarray(a_hat, np.float64)
    g_hat = np.asarray(g_hat, np.float64)
    self.a = self.ema * self.a + (1 - self.ema) * a_hat @ a_hat.T
    self.g = self.ema * self.g + (1 - self.ema) * g_hat @ g_hat.T

  def refresh(self):
    self.a_inv = damped_inverse(self.a, self.damping, self.relative)
    self.g_inv = damped_inverse(self.g, self.damping, self.relative)

  def direction(self, block):
    return self.a_inv @ np.asarray(block, np.float64) @ self.g_inv


def top_eigh(m, r):
  """The top ``r`` eigenpairs ``(U, D)`` of symmetric ``m``, descending."""
  lam, q = np.linalg.eigh(0.5 * (m + m.T))
  return q[:, ::-1][:, :r], np.maximum(lam[::-1][:r], 0.0)


def continued_inverse(u, vals, damping, relative=True):
  """``(U D Uᵀ + d_min (I − U Uᵀ) + λ' I)⁻¹``, ``λ' = λ max D`` (§6).

  The factor's spectrum is continued at its smallest kept eigenvalue; ``I``
  when ``D = 0``.
  """
  d = u.shape[0]
  if vals.max() <= 0.0:
    return np.eye(d)
  shift = damping * vals.max() if relative else damping
  m = (u * vals) @ u.T + vals.min() * (np.eye(d) - u @ u.T)
  return np.linalg.inv(m + shift * np.eye(d))


class BrandLayerOracle(KFACLayerOracle):
  """B-KFAC for one layer: ``U D Uᵀ ← top_r(ρ U D Uᵀ + (1−ρ) Â Âᵀ)``.

  Brand's update before truncation is exactly that eigendecomposition, so
  the oracle forms the ``d×d`` matrix; the inverse is live (no refresh) and
  continued at ``d_min``.
  """

  def __init__(self, d_a, d_g, rank, **kwargs):
    super().__init__(d_a, d_g, **kwargs)
    self.ra, self.rg = min(rank, d_a), min(rank, d_g)
    self.ua, self.da = np.eye(d_a)[:, :self.ra], np.zeros(self.ra)
    self.ug, self.dg = np.eye(d_g)[:, :self.rg], np.zeros(self.rg)

  def statistics(self, a_hat, g_hat):
    rho = self.ema
    for side, cols in (("a", a_hat), ("g", g_hat)):
      u, vals = getattr(self, "u" + side), getattr(self, "d" + side)
      b = np.sqrt(1 - rho) * np.asarray(cols, np.float64)
      m = rho * (u * vals) @ u.T + b @ b.T
      u, vals = top_eigh(m, len(vals))
      setattr(self, "u" + side, u)
      setattr(self, "d" + side, vals)

  def refresh(self):
    pass

  def direction(self, block):
    a_inv = continued_inverse(self.ua, self.da, self.damping, self.relative)
    g_inv = continued_inverse(self.ug, self.dg, self.damping, self.relative)
    return a_inv @ np.asarray(block, np.float64) @ g_inv


class TruncatedLayerOracle(KFACLayerOracle):
  """RS-KFAC's target: the exact EMA, its top ``r`` eigenpairs at each
  refresh, inverted with the spectrum continued at ``d_min``."""

  def __init__(self, d_a, d_g, rank, **kwargs):
    super().__init__(d_a, d_g, **kwargs)
    self.rank = rank

  def refresh(self):
    self.a_inv = continued_inverse(*top_eigh(self.a, self.rank),
                                   self.damping, self.relative)
    self.g_inv = continued_inverse(*top_eigh(self.g, self.rank),
                                   self.damping, self.relative)


class KFACOracle:
  """``scale_by_kfac(method="eigh")`` on a dict of parameters.

  ``layers`` maps a kernel's name to ``(bias name or None, in_axes,
  out_axes)``; ``layer_oracle`` (with ``oracle_kwargs``) is the per-layer
  method, exact K-FAC by default. Step ``t`` (from 0): statistics when ``t % cov_every == 0``,
  refresh when ``t ≥ start`` and ``(t − start) % inverse_every == 0``,
  direction ``V`` from ``t ≥ start`` (before: the input unchanged). Inputs
  that are not covered pass through. A non-finite gradient changes nothing
  and gives zeros.
  """

  def __init__(self, params, layers, *, ema=0.95, damping=1e-3,
               cov_every=1, inverse_every=1, start=0, relative=True,
               layer_oracle=KFACLayerOracle, **oracle_kwargs):
    self.layers = layers
    self.cov_every, self.inverse_every, self.start = (cov_every,
                                                      inverse_every, start)
    self.oracles = {}
    for name, (bias, in_axes, out_axes) in layers.items():
      shape = np.shape(params[name])
      d_a = int(np.prod([shape[i] for i in in_axes])) + (bias is not None)
      d_g = int(np.prod([shape[i] for i in out_axes]))
      self.oracles[name] = layer_oracle(d_a, d_g, ema=ema, damping=damping,
                                        relative=relative, **oracle_kwargs)
    self.count = 0

  def covered(self):
    out = set(self.layers)
    out.update(b for b, _, _ in self.layers.values() if b is not None)
    return out

  @property
  def active(self):
    return self.count >= self.start

  def update(self, grads, stats, updates=None):
    """The direction for ``updates`` (default: ``grads``)."""
    updates = grads if updates is None else updates
    if not all_finite(grads):
      self.count += 1
      return {k: np.zeros(np.shape(v)) for k, v in updates.items()}
    t = self.count
    out = {k: np.asarray(v, np.float64) for k, v in updates.items()}
    for name, (bias, in_axes, out_axes) in self.layers.items():
      oracle = self.oracles[name]
      if t % self.cov_every == 0 and stats.get(name) is not None:
        oracle.statistics(*stats[name])
      if t >= self.start and (t - self.start) % self.inverse_every == 0:
        oracle.refresh()
      if t >= self.start:
        block = to_block(updates[name], None if bias is None
                         else updates[bias], in_axes, out_axes)
        kernel, row = from_block(oracle.direction(block),
                                 np.shape(updates[name]), in_axes, out_axes,
                                 bias is not None)
        out[name] = kernel
        if bias is not None:
          out[bias] = row.reshape(np.shape(updates[bias]))
    self.count += 1
    return out


class KFACChainOracle:
  """``kronopt.kfac`` (method ``"eigh"``): one momentum, Adam graft, AdamW.

  ``m̂`` is Adam's bias-corrected first moment (Nesterov as optax's); the
  K-FAC direction of ``m̂`` is grafted per leaf onto ``m̂/(√v̂+ε)``; then
  ``+ wd·params`` and ``−lr``. Leaves no layer covers, and every leaf before
  the start, take Adam's step, exactly AdamW.
  """

  def __init__(self, params, layers, *, learning_rate, b1=0.9,
               weight_decay=0.0, nesterov=True, graft_b2=0.999,
               graft_eps=1e-8, **kfac_kwargs):
    self.lr, self.wd = learning_rate, weight_decay
    self.kfac = KFACOracle(params, layers, **kfac_kwargs)
    self.adam = AdamOracle(params, b1=b1, b2=graft_b2, eps=graft_eps,
                           nesterov=nesterov)

  def update(self, grads, stats, params):
    finite = all_finite(grads)
    active = self.kfac.active
    m_hat, adam_step = self.adam.moments(grads)
    d = self.kfac.update(grads, stats, m_hat)
    covered = self.kfac.covered()
    u = graft_update(d, adam_step, {k: k in covered for k in grads}, active,
                     finite)
    return {k: -self.lr * (u[k] + (self.wd * np.asarray(params[k], np.float64)
                                   if finite else 0.0)) for k in u}
