"""The shared loop of every Kronecker-factored preconditioner.

parameters → layout → **engine** → preconditioner → graft → rest of the chain.

**Layouts.** A layout (:class:`kronopt.layout.Layout` by default; K-FAC brings
its own) cuts a tree into *groups* of ``N`` stacked blocks of one shape. It
has ``treedef``, ``group_shapes``, ``group_sizes``, ``group_axes`` (per group,
the block axes that may be preconditioned), ``block(tree)`` (a list of
float32 ``[N, *shape]`` arrays), ``unblock(groups, like)`` (the inverse;
leaves it does not cover are copied from ``like``), ``real_sizes()`` (per
group and axis, the unpadded extent of each block, int ``[N]``),
``block_aux(extra_args)`` (per group a pytree of ``[N, …]`` arrays taken from
the update's extra arguments, or ``None``) and ``covered()`` (per leaf,
whether it is preconditioned). It is a pure function of shapes, the config
and which extra arguments are present, recomputed at trace time and never
stored.

**Algorithms.** An algorithm (Shampoo, CASPR, Sketchy, KrADagrad, SOAP, K-FAC)
is a small object with four methods over one group:

* ``init_group(block_shape, n, axes)`` → a NamedTuple of ``[n, …]`` arrays;
* ``update_statistics(state, g, ctx)`` → state, every ``statistics_every``
  steps (``g`` is the blocked statistics gradient);
* ``refresh(state, ctx)`` → ``(candidate_state, residual[n])``, the expensive
  part (matrix roots, bases), every ``precondition_every`` steps;
* ``precondition(state, g, ctx)`` → the direction ``D`` (``[N, *block]``),
  after the refresh (or before it, for an algorithm whose attribute
  ``refresh_after_precondition`` is True: SOAP's step uses the bases of the
  previous refresh, as its authors' code does).

``ctx`` is a :class:`GroupContext`: the step count, each block's global index
(randomness is ``fold_in(fold_in(key(seed), count), index)``), the real
extents, the group's auxiliary input and its preconditioned axes.

**The loop** (docs/algorithms.md §0) lays the update out in groups, updates
the statistics, runs the refresh under ``lax.cond`` on the step count,
guards it, applies the preconditioner and lays the direction back out:

* The direction is applied to ``updates``; the statistics come from the
  extra argument ``statistics_gradient`` when given (the graft passes the raw
  gradient there while it preconditions the bias-corrected first moment,
  docs/algorithms.md §0 "One momentum"), else from ``updates``.
* A step whose gradient (or auxiliary input) has a non-finite entry, or whose
  statistics would become non-finite (the algorithm's, or those of the
  transform around the engine, reported as :data:`STATISTICS_FINITE`), is
  *skipped*: no state changes except its counter (``skipped`` or
  ``overflows``), ``count`` does not advance and the direction is zero.
  :func:`step_taken` tells the rest of a chain.
* A refreshed block whose candidate state is non-finite or whose residual
  exceeds ``inverse_failure_threshold`` is rejected: the block keeps its
  previous state and the rejection is counted in ``failures``.
* Before ``start_preconditioning_step`` the direction is ``updates`` itself
  (:func:`kronopt.graft` then substitutes the magnitude's own update).
* With ``shard_axis``, every group's ``N`` is padded to a multiple of the mesh
  axis size with identity blocks (``init_group`` at the padded size, zero
  blocks, real extent 0, masked out of the guard, cut off when un-blocking)
  and the group state and blocks are constrained to ``P(shard_axis)``, so
  each device updates and refreshes its ``N / size`` blocks
  (:mod:`kronopt.sharding`).
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

from kronopt import checks
from kronopt import layout as layout_lib
from kronopt import sharding as sharding_lib

STATISTICS_GRADIENT = "statistics_gradient"
"""Extra-argument name of the tree the statistics are computed from."""

STATISTICS_FINITE = "kronopt_statistics_finite"
"""Extra-argument name of a scalar bool from a transform around the engine
(the graft's second moment, SOAP's Adam moments): False when its own
statistics would become non-finite this step, which then counts as an
overflow and is skipped like the engine's own."""


def reported_finite(extra_args) -> jax.Array:
  """The :data:`STATISTICS_FINITE` flag of ``extra_args`` (True if absent)."""
  return jnp.asarray(extra_args.get(STATISTICS_FINITE, True))


REPORT_COVERED = "kronopt_report_covered"
"""Extra-argument name of a callback ``f(treedef, covered)`` called at trace
time with the layout's :meth:`covered` flags (used by :func:`kronopt.graft`)."""


class GroupContext(NamedTuple):
  """What an algorithm is told about one group, besides its state.

  Attributes:
    count: int32 scalar, steps taken before this one (skipped steps do not
      count).
    index: int32 ``[N]``, each block's index in the whole layout (unique
      across groups), for ``jax.random.fold_in``.
    real: per block axis, int32 ``[N]``: the block's unpadded extent along it
      (0 for sharding-padding blocks).
    aux: the group's auxiliary input (see ``Layout.block_aux``) or ``None``.
    axes: static tuple of the block axes that may be preconditioned.
  """
  count: Any
  index: Any
  real: tuple
  aux: Any
  axes: tuple


class Preconditioner(Protocol):
  """What an algorithm provides to the engine (see the module docstring)."""

  def init_group(self, block_shape: tuple[int, ...], n: int,
                 axes: tuple[int, ...]) -> Any:
    ...

  def update_statistics(self, state: Any, g: jax.Array, ctx: GroupContext
                        ) -> Any:
    ...

  def refresh(self, state: Any, ctx: GroupContext
              ) -> tuple[Any, jax.Array]:
    ...

  def precondition(self, state: Any, g: jax.Array, ctx: GroupContext
                   ) -> jax.Array:
    ...


class PreconditionerState(NamedTuple):
  """State of every engine-built transform.

  Attributes:
    count: int32 number of updates taken (skipped steps not counted).
    groups: per group of stacked blocks, the algorithm's NamedTuple state.
    preconditioned: bool, whether the last update used the preconditioner
      (``count ≥ start_preconditioning_step``); read by :func:`kronopt.graft`.
    failures: int32 number of block refreshes rejected by the guard.
    skipped: int32 number of steps skipped for a non-finite gradient.
    overflows: int32 number of steps skipped because a finite gradient would
      have made the statistics non-finite (e.g. entries of 1e19 squared).
    residual: float32 largest residual of the last refresh.
  """
  count: chex.Array
  groups: tuple
  preconditioned: chex.Array
  failures: chex.Array
  skipped: chex.Array
  overflows: chex.Array
  residual: chex.Array


def find_states(tree) -> list[PreconditionerState]:
  """Every :class:`PreconditionerState` inside an optax state, in tree order."""
  is_engine = lambda x: isinstance(x, PreconditionerState)
  return [s for s in jax.tree_util.tree_leaves(tree, is_leaf=is_engine)
          if is_engine(s)]


def step_taken(old_state, new_state) -> Optional[jax.Array]:
  """Whether the engine inside ``new_state`` took the step (``None``: none).

  A skipped step (non-finite gradient or statistics) leaves ``count`` as it
  was; the graft and the ready-made chains use this to skip the same steps.
  """
  old, new = find_states(old_state), find_states(new_state)
  if not old or not new:
    return None
  return new[0].count != old[0].count


def _type_spec(x):
  """The partition spec in ``x``'s type (Explicit mesh axes), or ``None``."""
  return getattr(sharding_lib.type_sharding(x), "spec", None)


def _stacks_by_shape(leaves):
  """``(indices, stack)`` per distinct (shape, dtype, type sharding) among
  ``leaves`` (leaves sharded differently over Explicit mesh axes cannot be
  stacked)."""
  by_shape: dict = {}
  for i, x in enumerate(leaves):
    by_shape.setdefault((x.shape, x.dtype, _type_spec(x)), []).append(i)
  return [(idx, jnp.stack([leaves[i] for i in idx]))
          for idx in by_shape.values()]


def per_leaf_reduce(fn, leaves) -> list:
  """``[fn(x) for x in leaves]`` with one batched call per leaf shape.

  ``fn`` maps a stack ``[k, *shape]`` to ``[k]``. Leaves of equal shape and
  dtype are stacked, so a model of many equal layers costs a few reductions
  instead of one per leaf (each reduction is a kernel of its own for XLA).
  """
  out = [None] * len(leaves)
  for idx, stack in _stacks_by_shape(leaves):
    values = fn(stack)
    for j, i in enumerate(idx):
      out[i] = values[j]
  return out


def is_float_leaf(x) -> bool:
  """Whether ``x`` is a floating (or complex) array: not an integer, bool or
  ``float0`` one (the gradient of an integer, ``jax.grad(allow_int=True)``)."""
  if isinstance(x, optax.MaskedNode):
    return False
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    dtype = jnp.result_type(x)  # a Python number
  return dtype != jax.dtypes.float0 and jnp.issubdtype(dtype, jnp.inexact)


def _inexact_leaves(tree) -> list:
  return [x for x in jax.tree_util.tree_leaves(tree) if is_float_leaf(x)]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _masked_where(tree, keep):
  """``tree`` with ``optax.MaskedNode`` wherever ``keep`` (per leaf) is
  False."""
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_masked)
  return treedef.unflatten([x if k else optax.MaskedNode()
                            for x, k in zip(leaves, keep)])


def _float_flags(*trees) -> list:
  """Per leaf of the first tree: whether it, and the matching leaf of every
  other tree given (``None`` skipped), is a floating array."""
  first, treedef = jax.tree_util.tree_flatten(trees[0], is_leaf=_is_masked)
  flags = [_is_masked(x) or is_float_leaf(x) for x in first]
  for other in trees[1:]:
    if other is None:
      continue
    try:
      leaves = treedef.flatten_up_to(other)
    except (ValueError, TypeError):
      continue  # another tree: the transform itself reports it
    flags = [f and (_is_masked(y) or is_float_leaf(y))
             for f, y in zip(flags, leaves)]
  return flags


def _zero_update(u, p):
  """The update of a leaf that is not floating: zeros like ``u``, in the
  parameter's dtype for a ``float0`` gradient (``optax.apply_updates`` can
  add that, not a ``float0``)."""
  if u.dtype == jax.dtypes.float0 and p is not None and not _is_masked(p):
    return jnp.zeros(u.shape, jnp.result_type(p))
  return jnp.zeros_like(u)


def float_leaves_only(inner: optax.GradientTransformation
                      ) -> optax.GradientTransformationExtraArgs:
  """``inner`` on the floating leaves only; the others get zero updates.

  Integer and bool parameters, and the ``float0`` gradients
  ``jax.grad(..., allow_int=True)`` gives them, reach ``inner`` as
  ``optax.MaskedNode`` (so they have no state there) and come back as zeros
  (:func:`_zero_update`). A tree of floating leaves only passes through
  unchanged, so nesting this wrapper costs nothing.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return inner.init(_masked_where(params, _float_flags(params)))

  def update_fn(updates, state, params=None, **extra_args):
    flags = _float_flags(updates, params)
    if all(flags):
      return inner.update(updates, state, params, **extra_args)
    masked_params = None if params is None else _masked_where(params, flags)
    out, state = inner.update(_masked_where(updates, flags), state,
                              masked_params, **extra_args)
    u_leaves, treedef = jax.tree_util.tree_flatten(updates,
                                                   is_leaf=_is_masked)
    p_leaves = ([None] * len(u_leaves) if params is None
                else treedef.flatten_up_to(params))
    o_leaves = treedef.flatten_up_to(out)
    return treedef.unflatten([
        o if f else _zero_update(u, p)
        for o, u, p, f in zip(o_leaves, u_leaves, p_leaves, flags)]), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_real(tree, what: str):
  """A clear error for complex leaves of the ``what`` (parameters, updates).

  Kronecker statistics here are real (``G Gᵀ``, not ``G Gᴴ``): a complex
  parameter would silently lose its imaginary part.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  bad = [f"{jax.tree_util.keystr(path) or '<root>'} "
         f"({jnp.result_type(x).name})"
         for path, x in leaves if is_float_leaf(x)
         and jnp.issubdtype(jnp.result_type(x), jnp.complexfloating)]
  if bad:
    raise ValueError(
        f"The {what} have complex leaves: {', '.join(bad)}. kronopt's "
        "preconditioners support real floating dtypes only (float32, "
        "bfloat16, float16, float64); optimise the real and imaginary parts "
        "as separate real parameters, or give complex leaves another "
        "optimizer with optax.partition.")


def tree_all_finite(tree) -> jax.Array:
  """A scalar bool: every entry of every floating leaf is finite.

  One reduction per distinct leaf shape. (A flag combined from one value per
  leaf is a chain of scalar ``and``s that XLA copies into every fusion that
  reads the flag, one per parameter: compile time then grows with depth².)
  """
  flags = [jnp.all(jnp.isfinite(stack))
           for _, stack in _stacks_by_shape(_inexact_leaves(tree))]
  return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def tree_select(pred, on_true, on_false):
  """``jnp.where(pred, a, b)`` leaf by leaf (pred a scalar or per-block)."""
  def sel(a, b):
    p = jnp.reshape(pred, jnp.shape(pred) + (1,) * (a.ndim - jnp.ndim(pred)))
    return jnp.where(p, a, b)
  return jax.tree_util.tree_map(sel, on_true, on_false)


def _changed_leaves(new, old) -> list:
  """The leaves of ``new`` that are not the very arrays of ``old``.

  An algorithm's ``update_statistics`` typically replaces some fields
  (``state._replace(stats=...)``) and passes the others through; only the
  replaced ones need a finiteness check.
  """
  olds = {id(x) for x in jax.tree_util.tree_leaves(old)}
  return [x for x in jax.tree_util.tree_leaves(new) if id(x) not in olds]


def _block_ok(candidate, residual, threshold):
  """Per block: every leaf finite and the residual within the threshold."""
  ok = jnp.isfinite(residual) & (residual <= threshold)
  for leaf in jax.tree_util.tree_leaves(candidate):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok &= jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim)))
  return ok


def refresh_chunk(refresh, state, ctx: GroupContext, phase, chunks: int):
  """``refresh`` of the ``phase``-th of ``chunks`` contiguous block chunks.

  The ``n`` blocks are cut into chunks of ``c = ⌈n/chunks⌉``; the chunk is
  refreshed (``lax.dynamic_slice``, so the cost is ``c`` blocks), every other
  block comes back as it was with residual 0. A phase past the last chunk
  refreshes nothing. Returns ``(candidate, residual)`` for all ``n`` blocks.
  """
  n = ctx.index.shape[0]
  c = -(-n // chunks)
  lo = phase * c
  start = jnp.clip(lo, 0, n - c)
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=0)
  sub_state = jax.tree_util.tree_map(take, state)
  sub_ctx = ctx._replace(index=take(ctx.index),
                         real=jax.tree_util.tree_map(take, ctx.real),
                         aux=jax.tree_util.tree_map(take, ctx.aux))
  no_change = (state, jnp.zeros([n], jnp.float32))

  def run(_):
    candidate, residual = refresh(sub_state, sub_ctx)
    pos = start + jnp.arange(c)
    mine = (pos >= lo) & (pos < lo + c)
    candidate = tree_select(mine, candidate, sub_state)
    residual = jnp.where(mine, residual, 0.0).astype(jnp.float32)
    put = lambda full, part: jax.lax.dynamic_update_slice_in_dim(
        full, part.astype(full.dtype), start, axis=0)
    return (jax.tree_util.tree_map(put, state, candidate),
            put(no_change[1], residual))

  return jax.lax.cond(lo < n, run, lambda _: no_change, None)


def on_local_blocks(shard, fn, state, ctx: GroupContext, *arrays):
  """``fn(state, ctx, *arrays)`` run by each device on its own blocks only.

  The block axis ``N`` of ``state``, ``ctx`` and ``arrays`` (sharded over
  ``shard.size()`` devices) is split into ``[size, N/size]`` and ``fn`` is
  vmapped over the sharded axis, so each device computes on its ``N/size``
  blocks. The CPU path of :mod:`kronopt.linalg.lapack`, which loops over the
  unsharded axis, then stays local too (and a loop over an axis sharded over
  Explicit mesh axes, which JAX refuses, never happens). Without sharding
  this is ``fn`` itself.
  """
  size = shard.size()
  if size == 1:
    return fn(state, ctx, *arrays)
  split = lambda x: jnp.reshape(x, (size, x.shape[0] // size) + x.shape[1:])
  merge = lambda x: jnp.reshape(x, (-1,) + x.shape[2:])
  blocked = (state, ctx.index, ctx.real, ctx.aux, arrays)
  parts = shard.constrain_tree(jax.tree_util.tree_map(split, blocked), size)

  def one_device(st, index, real, aux, arrs):
    return fn(st, ctx._replace(index=index, real=real, aux=aux), *arrs)

  out = jax.vmap(one_device)(*parts)
  return jax.tree_util.tree_map(merge, shard.constrain_tree(out, size))


def refresh_per_shard(precond: Preconditioner, shard, state,
                      ctx: GroupContext, phase=None, chunks: int = 1):
  """``precond.refresh`` run by each device on its own blocks only
  (:func:`on_local_blocks`). With ``chunks > 1`` (the staggered refresh)
  each device refreshes only the ``phase``-th chunk of its blocks
  (:func:`refresh_chunk`).
  """
  local = precond.refresh
  if chunks > 1:
    local = lambda st, c: refresh_chunk(precond.refresh, st, c, phase, chunks)
  return on_local_blocks(shard, local, state, ctx)


def guarded_refresh(precond: Preconditioner, groups, ctxs, threshold,
                    refresh=None):
  """Refreshes every group, keeping the old state of each rejected block.

  Blocks whose real extent is 0 (sharding padding, identity blocks) keep
  their state and count neither as failures nor in the residual.
  ``refresh(state, ctx, group_index)`` replaces ``precond.refresh`` (e.g.
  :func:`refresh_per_shard`).

  Returns ``(groups, rejected_count, worst_residual)``.
  """
  refresh = refresh or (lambda st, c, _: precond.refresh(st, c))
  new_groups = []
  rejected = jnp.zeros([], jnp.int32)
  worst = jnp.zeros([], jnp.float32)
  for i, (state, ctx) in enumerate(zip(groups, ctxs)):
    candidate, residual = refresh(state, ctx, i)
    ok = _block_ok(candidate, residual, threshold)
    real = ctx.real[0] > 0
    new_groups.append(tree_select(ok & real, candidate, state))
    rejected += jnp.sum(~ok & real).astype(jnp.int32)
    finite_res = jnp.where(jnp.isfinite(residual) & real, residual,
                           jnp.where(real, jnp.inf, 0.0))
    worst = jnp.maximum(
        worst, jnp.max(finite_res, initial=0.0).astype(jnp.float32))
  return tuple(new_groups), rejected, worst


def _pad_blocks(x, n_padded):
  """Appends zero blocks to ``x`` (``[n, …]``) up to ``n_padded``."""
  if n_padded == x.shape[0]:
    return x
  return jnp.pad(x, [(0, n_padded - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def default_layout_fn(block_size: int, max_precond_dim: Optional[int] = None
                      ) -> Callable:
  """Shampoo's layout (:func:`kronopt.layout.make_layout`) as a layout_fn."""
  def layout_fn(tree, extra_args):
    del extra_args
    return layout_lib.make_layout(tree, block_size, max_precond_dim)
  return layout_fn


def cast_like(tree, like):
  """``tree`` with every leaf cast to the dtype of ``like``'s leaf."""
  return jax.tree_util.tree_map(lambda x, e: jnp.asarray(x).astype(e.dtype),
                                tree, like)


def keep_float_dtypes(new, given):
  """Floating leaves of ``new`` in the dtype they had in ``given``.

  A state whose leaves were cast (e.g. ``optax.tree_utils.tree_cast(state,
  jnp.bfloat16)``) is computed on in its own dtypes (:func:`cast_like`) and
  handed back with its floating leaves in the given dtypes, so a jitted step
  does not retrace; integer and bool leaves (counters, flags) stay exact.
  """
  def restore(x, g):
    g_dtype = jnp.result_type(g)
    if jnp.issubdtype(g_dtype, jnp.floating) and jnp.issubdtype(
        x.dtype, jnp.floating):
      return x.astype(g_dtype)
    return x
  return jax.tree_util.tree_map(restore, new, given)


def check_tree_matches(state_tree, updates, what: str):
  """A clear error when a per-parameter state leaf does not match updates."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  got = jax.tree_util.tree_flatten(state_tree, is_leaf=is_masked)
  want = jax.tree_util.tree_flatten(updates, is_leaf=is_masked)
  shapes = lambda leaves: [getattr(x, "shape", None) for x in leaves]
  if got[1] == want[1] and shapes(got[0]) == shapes(want[0]):
    return
  raise ValueError(
      f"The optimizer state does not match the updates: its {what} has "
      f"structure {got[1]} with shapes {shapes(got[0])}, the updates "
      f"{want[1]} with shapes {shapes(want[0])}. The state was initialised "
      "for another parameter tree; call tx.init(params) with the tree you "
      "update.")


def _check_state_matches(lay, groups, expected):
  """A clear error when the state was initialised for another tree."""
  if len(groups) == len(expected):
    same = all(
        jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(e)
        and all(a.shape == b.shape for a, b in zip(
            jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(e)))
        for g, e in zip(groups, expected))
    if same:
      return
  want = [f"{n}×{s}" for n, s in zip(lay.group_sizes, lay.group_shapes)]
  raise ValueError(
      "The optimizer state does not match the updates: these updates lay out "
      f"as block groups {want}, but the state holds {len(groups)} group(s) "
      "of other shapes. The state was initialised for another parameter tree "
      "or another layout configuration (block_size, max_precond_dim, ...); "
      "call tx.init(params) with the tree you update.")


def preconditioner_transform(
    precond: Preconditioner,
    *,
    precondition_every: int,
    start_preconditioning_step: int,
    inverse_failure_threshold: float,
    block_size: Optional[int] = None,
    max_precond_dim: Optional[int] = None,
    layout_fn: Optional[Callable] = None,
    statistics_every: int = 1,
    staggered_refresh: bool = False,
    shard_axis: sharding_lib.ShardAxis = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optax transform of an algorithm on the shared engine.

  Args:
    precond: the algorithm (see :class:`Preconditioner`).
    precondition_every: refresh period in steps.
    start_preconditioning_step: first step at which the preconditioner is
      refreshed and applied.
    inverse_failure_threshold: largest residual a refreshed block may have.
    block_size: the largest block dimension of the default layout (see
      :mod:`kronopt.layout`); required unless ``layout_fn`` is given.
    max_precond_dim: dimensions larger than this get no factor in the
      default layout; ``None`` preconditions every dimension.
    layout_fn: ``layout_fn(tree, extra_args) -> layout`` (see the module
      docstring); default :func:`default_layout_fn`.
    statistics_every: the statistics are updated at steps ``count`` with
      ``count % statistics_every == 0`` (as distributed Shampoo's
      ``statistics_compute_steps``).
    staggered_refresh: spread each refresh over the ``precondition_every``
      steps of its period: at phase ``j`` of a period every group refreshes
      its ``j``-th chunk of ``⌈N/precondition_every⌉`` blocks (groups offset
      by their index, so small groups do not all land on the same step).
      Every block is refreshed once per period, and the slowest step costs
      about one ``precondition_every``-th of a full refresh.
    shard_axis: mesh axis name (or tuple of names) to shard the stacked block
      axis ``N`` of every group over; ``None`` (default) does not shard. ``N``
      is padded to a multiple of the axis size with identity blocks, and each
      device stores and refreshes ``N / size`` blocks (see
      :mod:`kronopt.sharding`).
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh
      (``with jax.set_mesh(mesh):``) at trace time.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`PreconditionerState`. Unknown extra arguments are ignored.

  Raises:
    ValueError: for an argument out of its valid range.
  """
  if layout_fn is None:
    checks.check_int("block_size", block_size, low=2, static=True)
    checks.check_int("max_precond_dim", max_precond_dim, low=1,
                     allow_none=True, static=True)
    layout_fn = default_layout_fn(block_size, max_precond_dim)
  checks.check_int("precondition_every", precondition_every, low=1,
                   high=checks.INT32_MAX)
  checks.check_int("statistics_every", statistics_every, low=1,
                   high=checks.INT32_MAX)
  checks.check_bool("staggered_refresh", staggered_refresh)
  if staggered_refresh:
    checks.check_int("precondition_every", precondition_every, low=1,
                     high=checks.INT32_MAX, static=True)
  checks.check_int("start_preconditioning_step", start_preconditioning_step,
                   low=0, high=checks.INT32_MAX)
  checks.check_number("inverse_failure_threshold", inverse_failure_threshold,
                      low=0.0, low_open=True)
  sharding_lib.check_shard_axis(shard_axis, mesh)
  shard = sharding_lib.BlockSharding(shard_axis, mesh)
  refresh_last = getattr(precond, "refresh_after_precondition", False)

  def init_groups(lay):
    return tuple(
        shard.constrain_tree(precond.init_group(shape, shard.padded(n), axes),
                             shard.padded(n))
        for shape, n, axes in zip(lay.group_shapes, lay.group_sizes,
                                  lay.group_axes))

  def init_state(lay):
    zero = jnp.zeros([], jnp.int32)
    return PreconditionerState(
        count=zero, groups=init_groups(lay), preconditioned=jnp.asarray(False),
        failures=zero, skipped=zero, overflows=zero,
        residual=jnp.zeros([], jnp.float32))

  def init_fn(params):
    check_real(params, "parameters given to init")
    return init_state(layout_fn(params, {}))

  def contexts(lay, count, aux):
    """One :class:`GroupContext` per group (padded for sharding)."""
    ctxs, offset = [], 0
    aux = aux if aux is not None else [None] * len(lay.group_sizes)
    for n, axes, real, a in zip(lay.group_sizes, lay.group_axes,
                                lay.real_sizes(), aux):
      n_pad = shard.padded(n)
      pad = lambda x: shard.constrain(_pad_blocks(x, n_pad), n_pad)
      ctxs.append(GroupContext(
          count=count,
          index=pad(jnp.arange(offset, offset + n, dtype=jnp.int32)),
          real=tuple(pad(jnp.asarray(r, jnp.int32)) for r in real),
          aux=jax.tree_util.tree_map(pad, a), axes=tuple(axes)))
      offset += n_pad
    return ctxs

  def blocks_of(lay, tree, ok):
    out = lay.block(jax.tree_util.tree_map(shard.gather, tree))
    return [shard.constrain(_pad_blocks(jnp.where(ok, g, 0.0), shard.padded(n)),
                            shard.padded(n))
            for g, n in zip(out, lay.group_sizes)]

  def update_fn(updates, state, params=None, **extra_args):
    del params
    check_real(updates, "updates given to update")
    lay = layout_fn(updates, extra_args)
    expected = jax.eval_shape(lambda: init_state(lay))
    _check_state_matches(lay, state.groups, expected.groups)
    given = state
    state = cast_like(state, expected)
    old_groups = state.groups
    report = extra_args.get(REPORT_COVERED)
    if callable(report):
      report(lay.treedef, lay.covered())
    source = extra_args.get(STATISTICS_GRADIENT)
    aux = lay.block_aux(extra_args)
    count = state.count
    finite = tree_all_finite((updates, source, aux))
    ctxs = contexts(lay, count, aux)
    blocks = blocks_of(lay, updates, finite)
    stat_blocks = blocks if source is None else blocks_of(lay, source, finite)
    constrain_groups = lambda gs: tuple(
        shard.constrain_tree(g, shard.padded(n))
        for g, n in zip(gs, lay.group_sizes))

    def stepped_statistics(gs):
      local = lambda st, c, g: precond.update_statistics(st, g, c)
      return tuple(on_local_blocks(shard, local, s, c, g)
                   for s, g, c in zip(gs, stat_blocks, ctxs))

    if isinstance(statistics_every, int) and statistics_every == 1:
      stepped = stepped_statistics(old_groups)
    else:
      stepped = jax.lax.cond(count % statistics_every == 0,
                             stepped_statistics, lambda gs: gs, old_groups)
    stats_finite = tree_all_finite(_changed_leaves(stepped, old_groups))
    stats_finite &= reported_finite(extra_args)
    taken = finite & stats_finite
    groups = constrain_groups(tree_select(taken, stepped, old_groups))

    active = count >= start_preconditioning_step
    phase = (count - start_preconditioning_step) % precondition_every
    due = taken & active & (staggered_refresh | (phase == 0))
    chunks = precondition_every if staggered_refresh else 1

    def refresh(st, c, i):
      return refresh_per_shard(precond, shard, st, c,
                               (phase + i) % precondition_every, chunks)

    def apply(gs):
      return [jnp.where(active, precond.precondition(s, g, c), g)
              for s, g, c in zip(gs, blocks, ctxs)]

    if refresh_last:
      directions = apply(groups)
    groups, rejected, residual = jax.lax.cond(
        due,
        lambda gs: guarded_refresh(precond, gs, ctxs,
                                   inverse_failure_threshold, refresh),
        lambda gs: (gs, jnp.zeros([], jnp.int32),
                    state.residual.astype(jnp.float32)),
        groups)
    groups = constrain_groups(groups)
    if not refresh_last:
      directions = apply(groups)
    out = lay.unblock([shard.gather(d) for d in directions], updates)
    out = jax.tree_util.tree_map(shard.restore, out, updates)
    out = jax.tree_util.tree_map(
        lambda u: jnp.where(taken, u, jnp.zeros_like(u)), out)
    new_state = PreconditionerState(
        count=jnp.where(taken, optax.safe_int32_increment(count), count),
        groups=groups,
        preconditioned=active,
        failures=state.failures + rejected,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        overflows=state.overflows + (finite & ~stats_finite).astype(jnp.int32),
        residual=residual.astype(jnp.float32),
    )
    return out, keep_float_dtypes(new_state, given)

  return float_leaves_only(
      optax.GradientTransformationExtraArgs(init_fn, update_fn))
