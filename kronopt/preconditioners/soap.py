"""SOAP: Adam in Shampoo's eigenbasis (docs/algorithms.md §8).

Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson & Kakade, "SOAP:
Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321. Per block
``G`` (a matrix here; an order-k tensor rotates every preconditioned axis)
with Shampoo's factors and their eigenbases ``Q_L, Q_R``, at step ``t``:

    statistics  L ← β_s L + (1−β_s) G Gᵀ,   R ← β_s R + (1−β_s) Gᵀ G
    moments     M ← β₁ M + (1−β₁) G                    (original space)
                G' = Q_Lᵀ G Q_R,   V ← β₂ V + (1−β₂) G'⊙G'   (rotated space)
    direction   N' = (Q_Lᵀ M Q_R)/(1−β₁ᵗ) / (√(V/(1−β₂ᵗ)) + ε),
                D = Q_L N' Q_Rᵀ
    refresh     est = diag(Q_Lᵀ L Q_L); sort Q_L's columns by est descending
                and permute V's rows the same way; Q_L ← qr(L Q_L);
                the same for R (every ``precondition_every`` steps)

The direction uses the bases of the previous refresh; the refresh follows it
(the authors' order: the engine's ``refresh_after_precondition``).
Refreshes are at the steps ``c`` with ``c % precondition_every == 0`` from
``start_preconditioning_step`` on. Until the first one ``Q = I`` and the
direction is exactly Adam's (so is the first step of a default run: the
authors skip it, docs/algorithms.md §8 allows either). The first refresh
takes the bases from ``eigh`` (descending) instead of the QR step, after the
same sort (of ``I`` by ``diag L``, so the ``V`` gathered while ``Q = I``
follows the largest statistics; the authors have ``V = 0`` there).

Axes larger than ``max_precond_dim`` get no factor (``Q = I`` there), and
leaves with no preconditioned axis at all (rank ≤ 1, or every dimension too
large) get plain Adam: exactly ``optax.adam``'s update.

Padding (block splits) never mixes with real coordinates: the bases keep it
on the identity (:mod:`kronopt.linalg.eigenbasis`), the column sort keeps it
last, in place, so ``V`` and ``M`` stay exactly 0 there and the direction is
masked to exactly 0 there. No graft is needed (SOAP is what Shampoo with
Adam grafting approximates): the ready-made :func:`kronopt.soap` adds only
decoupled weight decay and the learning rate.
"""

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronopt import checks
from kronopt import engine
from kronopt import grafting
from kronopt import layout as layout_lib
from kronopt.linalg import eigenbasis
from kronopt.linalg import kronecker
from kronopt.preconditioners import shampoo

# The engine's guard compares each refresh's residual (here the off-diagonal
# mass of the old bases, ≤ 1) to a threshold: above any mass, so only
# non-finite bases are rejected. A stale basis is what a refresh is for.
_GUARD_THRESHOLD = 2.0


class SoapGroupState(NamedTuple):
  """Per group of ``N`` stacked blocks.

  Attributes:
    stats: per preconditioned axis i, ``[N, d_i, d_i]`` statistics ``L_i``.
    bases: per preconditioned axis i, ``[N, d_i, d_i]`` eigenbases ``Q_i``
      (columns sorted by eigenvalue, descending; ``I`` before the first
      refresh).
    mu: ``[N, *block]`` first moment ``M``, in the original space.
    nu: ``[N, *block]`` second moment ``V``, in the rotated space.
  """
  stats: tuple
  bases: tuple
  mu: jax.Array
  nu: jax.Array


class SoapState(NamedTuple):
  """State of :func:`scale_by_soap`.

  Attributes:
    preconditioner: the engine's state, of :class:`SoapGroupState` groups.
    mu: Adam's first moment of the leaves the layout does not cover
      (``optax.MaskedNode`` at the others), in the parameters' dtype
      (float32 for float16 parameters, as :func:`kronopt.graft`'s).
    nu: Adam's second moment of the same leaves.
  """
  preconditioner: engine.PreconditionerState
  mu: optax.Updates
  nu: optax.Updates


def rotate(x, bases: dict, back: bool = False):
  """``G ×_i Q_iᵀ`` along every axis in ``bases`` (into the eigenbasis:
  ``Q_Lᵀ G Q_R``), or ``G ×_i Q_i`` with ``back`` (``Q_L N Q_Rᵀ``)."""
  if not back:
    bases = {i: jnp.swapaxes(q, -1, -2) for i, q in bases.items()}
  return kronecker.kron_apply(x, bases)


def real_mask(real, block_shape):
  """``[N, *block]`` bool, True on the real (unpadded) coordinates."""
  k = len(block_shape)
  mask = True
  for axis, (r, d) in enumerate(zip(real, block_shape)):
    m = jnp.arange(d) < jnp.asarray(r)[:, None]
    mask = mask & jnp.reshape(m, (-1,) + (1,) * axis + (d,)
                              + (1,) * (k - axis - 1))
  return mask


def permute_axis(x, order, axis: int):
  """``x`` with block axis ``axis`` reordered per block: position ``k``
  takes ``x[..., order[k], ...]`` (``order`` is ``[N, d]``)."""
  k = x.ndim - 1
  shape = (order.shape[0],) + (1,) * axis + order.shape[1:] + (
      1,) * (k - axis - 1)
  return jnp.take_along_axis(x, jnp.reshape(order, shape), axis=axis + 1)


@dataclasses.dataclass(frozen=True)
class Soap:
  """SOAP on the engine (see :func:`kronopt.scale_by_soap`).

  The engine calls :meth:`refresh` at the steps ``c`` with
  ``c % precondition_every == 0``; those before ``start`` keep ``Q = I``,
  the first one from ``start`` on takes the bases from eigh. The engine
  itself starts at step 0, so the direction is SOAP's (Adam's while
  ``Q = I``) from the first step.
  """
  b1: Any = 0.9
  b2: Any = 0.95
  shampoo_b2: Any = 0.95
  eps: Any = 1e-8
  precondition_every: Any = 10
  start: Any = 0

  refresh_after_precondition = True

  def init_group(self, block_shape, n, axes=None):
    axes = shampoo.preconditioned_axes(block_shape, False, axes)
    dims = [block_shape[i] for i in axes]
    moment = lambda: jnp.zeros((n,) + tuple(block_shape), jnp.float32)
    return SoapGroupState(
        stats=tuple(jnp.zeros((n, d, d), jnp.float32) for d in dims),
        bases=tuple(jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32),
                                     (n, d, d)) for d in dims),
        mu=moment(), nu=moment())

  def update_statistics(self, state, g, ctx):
    """``L_i``, ``M`` and ``V`` (rotated by the current bases) from ``G``."""
    w = shampoo.statistics_weight(self.shampoo_b2)
    stats = tuple(self.shampoo_b2 * s + w * kronecker.mode_gram(g, axis)
                  for axis, s in zip(ctx.axes, state.stats))
    g_rot = rotate(g, dict(zip(ctx.axes, state.bases)))
    return state._replace(
        stats=stats,
        mu=(1 - self.b1) * g + self.b1 * state.mu,
        nu=(1 - self.b2) * jnp.square(g_rot) + self.b2 * state.nu)

  def precondition(self, state, g, ctx):
    """``D = Q N' Qᵀ``, ``N' = m̂'/(√v̂ + ε)``, exactly 0 on padding."""
    bases = dict(zip(ctx.axes, state.bases))
    count = optax.safe_int32_increment(ctx.count)
    m_hat = optax.tree.bias_correction(rotate(state.mu, bases), self.b1,
                                       count)
    v_hat = optax.tree.bias_correction(state.nu, self.b2, count)
    n = m_hat / (jnp.sqrt(v_hat) + self.eps)
    n = jnp.where(real_mask(ctx.real, g.shape[1:]), n, 0.0)
    return rotate(n, bases, back=True)

  def refresh(self, state, ctx):
    """Before ``start``: nothing; the first refresh: sort, then eigh;
    later ones: sort, then one power + QR step. ``V`` follows each sort.

    The residual is the largest relative off-diagonal mass of the old bases
    (``‖QᵀLQ − diag‖_F / ‖L‖_F`` before the refresh): how far they had
    drifted.
    """
    phase = jnp.where(
        ctx.count < self.start, 0,
        jnp.where(ctx.count - self.start < self.precondition_every, 1, 2))
    keep = lambda s: (s, jnp.zeros(s.nu.shape[:1], jnp.float32))
    return jax.lax.switch(
        phase, (keep, lambda s: self._new_bases(s, ctx, first=True),
                lambda s: self._new_bases(s, ctx, first=False)), state)

  def _new_bases(self, state, ctx, first: bool):
    nu, bases = state.nu, []
    residual = jnp.zeros(nu.shape[:1], jnp.float32)
    for axis, s, q in zip(ctx.axes, state.stats, state.bases):
      real = ctx.real[axis]
      s, _ = shampoo.unit_scaled(s)  # bases and masses do not depend on it
      if first:
        _, order, mass = eigenbasis.sort_columns(s, q, real)
        q, _ = eigenbasis.eigenbasis(s, real)
      else:
        q, order, mass = eigenbasis.sorted_power_step(s, q, real)
      bases.append(q)
      nu = permute_axis(nu, order, axis)
      residual = jnp.maximum(residual, mass.astype(jnp.float32))
    return state._replace(bases=tuple(bases), nu=nu), residual


def check_soap_args(*, b1, b2, shampoo_b2, eps, start_preconditioning_step):
  """Validation of :func:`scale_by_soap`'s own arguments (the engine checks
  the layout and refresh arguments)."""
  checks.check_number("b1", b1, low=0.0, high=1.0, high_open=True)
  checks.check_number("b2", b2, low=0.0, high=1.0, high_open=True)
  checks.check_number("shampoo_b2", shampoo_b2, low=0.0, high=1.0,
                      low_open=True, allow_none=True)
  checks.check_number("eps", eps, low=0.0, low_open=True)
  checks.check_int("start_preconditioning_step", start_preconditioning_step,
                   low=0, high=checks.INT32_MAX)


def _takes_adam(x, covered: bool) -> bool:
  """Whether a leaf gets plain Adam: floating, not masked, not covered."""
  dtype = getattr(x, "dtype", None)
  return (not covered and not isinstance(x, optax.MaskedNode)
          and dtype is not None and jnp.issubdtype(dtype, jnp.inexact))


def _adam_leaves(tree, layout):
  """``(leaves, treedef, flags)``: flags say which leaves take plain Adam."""
  leaves, treedef = jax.tree_util.tree_flatten(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  flags = [_takes_adam(x, c) for x, c in zip(leaves, layout.covered())]
  return leaves, treedef, flags


def _adam_step(g, mu, nu, count, b1, b2, eps):
  """``optax.scale_by_adam``'s update of one leaf: ``(u, mu, nu)``."""
  new_mu = optax.tree.update_moment(g, mu, b1, 1)
  new_nu = optax.tree.update_moment_per_elem_norm(g, nu, b2, 2)
  m_hat = optax.tree.bias_correction(new_mu, b1, count)
  v_hat = optax.tree.bias_correction(new_nu, b2, count)
  u = m_hat / (jnp.sqrt(v_hat) + eps)
  return u, new_mu.astype(mu.dtype), new_nu.astype(nu.dtype)


def scale_by_soap(
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    shampoo_b2: Optional[float] = None,
    eps: float = 1e-8,
    block_size: int = 1024,
    max_precond_dim: Optional[int] = 10_000,
    precondition_every: int = 10,
    start_preconditioning_step: int = 0,
    shard_axis: Optional[Any] = None,
    mesh: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """SOAP's direction: Adam in Shampoo's eigenbasis (docs/algorithms.md §8).

  Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", 2024.
  The whole step but the learning rate (as ``optax.scale_by_adam``); see
  the module docstring for the math and :func:`kronopt.soap` for the
  ready-made optimizer.

  The defaults are the paper's language-model settings; ``block_size`` is
  kronopt's (the family's): it bounds a block's per-step cost (three
  rotations, of ``G``, ``M`` and ``N'``, and the two statistics,
  ``≈ 8(m + n)`` flops per entry of an ``m×n`` block) and its refresh to
  QRs of ``block_size × block_size``; the state of a square block is 6
  floats per entry (``L, R, Q_L, Q_R, M, V``). The paper does not split
  dimensions up to ``max_precond_dim``; ``block_size=max_precond_dim`` does
  the same.

  Args:
    b1: first-moment decay ``β₁`` in ``[0, 1)``.
    b2: second-moment decay ``β₂`` in ``[0, 1)``.
    shampoo_b2: statistics decay ``β_s`` in ``(0, 1]`` (1: a plain sum);
      ``None`` (default) is ``b2``, as the paper.
    eps: Adam's ``ε``, added to ``√v̂``; ``> 0``.
    block_size: largest block dimension; larger preconditioned dimensions
      are split into blocks (zero-padded).
    max_precond_dim: merged dimensions larger than this are not rotated and
      not split (e.g. a vocabulary axis); ``None`` rotates every dimension.
    precondition_every: steps between refreshes of the eigenbases.
    start_preconditioning_step: the bases are refreshed at the steps ``c``
      with ``c % precondition_every == 0`` from this step on (the first
      time from eigh, after that step's direction); until then ``Q = I``
      and the update is Adam's. With 0 (default) the first step's gradient
      gives the first bases, as the paper.
    shard_axis: mesh axis name (or tuple) to shard the stacked blocks over;
      ``None`` does not shard (see :mod:`kronopt.sharding`).
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`SoapState`.
    Its engine state's ``residual`` is the largest off-diagonal mass of the
    bases a refresh replaced; the guard rejects (and counts) only
    non-finite bases. The extra argument ``statistics_gradient`` is ignored:
    SOAP's statistics and moments all come from the updates.
  """
  check_soap_args(b1=b1, b2=b2, shampoo_b2=shampoo_b2, eps=eps,
                  start_preconditioning_step=start_preconditioning_step)
  precond = Soap(b1=b1, b2=b2, shampoo_b2=b2 if shampoo_b2 is None
                 else shampoo_b2, eps=eps,
                 precondition_every=precondition_every,
                 start=start_preconditioning_step)
  inner = engine.preconditioner_transform(
      precond, block_size=block_size, max_precond_dim=max_precond_dim,
      precondition_every=precondition_every, start_preconditioning_step=0,
      inverse_failure_threshold=_GUARD_THRESHOLD, shard_axis=shard_axis,
      mesh=mesh)
  layout_of = lambda tree: layout_lib.make_layout(tree, block_size,
                                                  max_precond_dim)

  def init_fn(params):
    leaves, treedef, flags = _adam_leaves(params, layout_of(params))
    zeros = lambda: treedef.unflatten([
        jnp.zeros_like(x, grafting.moment_dtype(x.dtype)) if f
        else optax.MaskedNode() for x, f in zip(leaves, flags)])
    return SoapState(preconditioner=inner.init(params), mu=zeros(),
                     nu=zeros())

  def update_fn(updates, state, params=None, **extra_args):
    extra_args.pop(engine.STATISTICS_GRADIENT, None)
    leaves, treedef, flags = _adam_leaves(updates, layout_of(updates))
    engine.check_tree_matches(
        state.mu, treedef.unflatten([
            x if f else optax.MaskedNode() for x, f in zip(leaves, flags)]),
        "Adam first moment")
    count = optax.safe_int32_increment(state.preconditioner.count)
    mu = treedef.flatten_up_to(state.mu)
    nu = treedef.flatten_up_to(state.nu)
    steps = {i: _adam_step(g.astype(grafting.moment_dtype(g.dtype)), mu[i],
                           nu[i], count, b1, b2, eps)
             for i, (g, f) in enumerate(zip(leaves, flags)) if f}
    # Adam's ν of a finite gradient above ~1.8e19 overflows and would stay
    # inf: the engine skips such a step like its own overflow.
    adam_finite = engine.tree_all_finite([v for _, _, v in steps.values()])
    d, inner_state = inner.update(
        updates, state.preconditioner, params,
        **{**extra_args, engine.STATISTICS_FINITE:
           adam_finite & engine.reported_finite(extra_args)})
    taken = engine.step_taken(state.preconditioner, inner_state)
    out = treedef.flatten_up_to(d)
    for i, (u, m, v) in steps.items():
      out[i] = jnp.where(taken, u, 0.0).astype(leaves[i].dtype)
      mu[i] = jnp.where(taken, m, mu[i])
      nu[i] = jnp.where(taken, v, nu[i])
    return treedef.unflatten(out), SoapState(
        inner_state, treedef.unflatten(mu), treedef.unflatten(nu))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def predicted_state_bytes(params, *, block_size: int = 1024,
                          max_precond_dim: Optional[int] = 10_000,
                          shards: int = 1) -> int:
  """Bytes of the arrays (rank ≥ 1) in :func:`scale_by_soap`'s state.

  Per group of ``N`` blocks of shape ``b`` (``N`` padded to a multiple of
  ``shards``, the size of ``shard_axis``), float32: ``M`` and ``V``
  (``2·∏b``) and, per preconditioned axis i, ``L_i`` and ``Q_i``
  (``2·b_i²``); plus Adam's two moments, in the parameters' dtype (float32
  for float16), of every leaf the layout does not cover. The scalars (counts, flags) are apart.
  """
  lay = layout_lib.make_layout(params, block_size, max_precond_dim)
  groups = sum(
      -(-n // shards) * shards * 4 * (
          2 * math.prod(shape) + 2 * sum(shape[i] ** 2 for i in axes))
      for shape, n, axes in zip(lay.group_shapes, lay.group_sizes,
                                lay.group_axes))
  leaves, _, flags = _adam_leaves(params, lay)
  adam = sum(2 * math.prod(x.shape)
             * np.dtype(grafting.moment_dtype(x.dtype)).itemsize
             for x, f in zip(leaves, flags) if f)
  return groups + adam
