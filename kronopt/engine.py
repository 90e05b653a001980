"""The shared loop of every Kronecker-factored preconditioner.

parameters → :mod:`kronopt.layout` → **engine** → preconditioner → graft.

An algorithm (Shampoo, CASPR, Sketchy, KrADagrad, …) is a small object with
four methods over one *group* of ``N`` stacked blocks ``G`` (``[N, *block]``,
float32):

* ``init_group(block_shape, n)`` → a NamedTuple of ``[n, …]`` arrays;
* ``update_statistics(state, g, count)`` → state, every step;
* ``refresh(state)`` → ``(candidate_state, residual[n])``, the expensive
  part (matrix roots), every ``precondition_every`` steps;
* ``precondition(state, g)`` → the direction ``D`` (``[N, *block]``).

The engine (ALGORITHMS.md §0) lays the gradient out in groups, updates the
statistics, runs the refresh under ``lax.cond`` on the step count, guards it,
applies the preconditioner and lays the direction back out as a tree:

* A step whose gradient has a non-finite entry leaves every statistic
  untouched, returns a zero direction and is counted in ``skipped``.
* A refreshed block whose candidate state is non-finite or whose residual
  exceeds ``inverse_failure_threshold`` is rejected: the block keeps its
  previous state and the rejection is counted in ``failures``.
* Before ``start_preconditioning_step`` the direction is the gradient itself
  (:func:`kronopt.graft` then substitutes the magnitude's own update).
* With ``shard_axis``, every group's ``N`` is padded to a multiple of the mesh
  axis size with identity blocks (``init_group`` at the padded size, zero
  gradient blocks, masked out of the guard, cut off when un-blocking) and the
  group state and gradient blocks are constrained to ``P(shard_axis)``, so
  each device updates and refreshes its ``N / size`` blocks
  (:mod:`kronopt.sharding`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

from kronopt import checks
from kronopt import layout as layout_lib
from kronopt import sharding as sharding_lib


class Preconditioner(Protocol):
  """What an algorithm provides to the engine (see the module docstring)."""

  def init_group(self, block_shape: tuple[int, ...], n: int) -> Any:
    ...

  def update_statistics(self, state: Any, g: jax.Array, count: jax.Array
                        ) -> Any:
    ...

  def refresh(self, state: Any) -> tuple[Any, jax.Array]:
    ...

  def precondition(self, state: Any, g: jax.Array) -> jax.Array:
    ...


class PreconditionerState(NamedTuple):
  """State of every engine-built transform.

  Attributes:
    count: int32 number of updates taken.
    groups: per group of stacked blocks, the algorithm's NamedTuple state.
    preconditioned: bool, whether the last update used the preconditioner
      (``count ≥ start_preconditioning_step``); read by :func:`kronopt.graft`.
    failures: int32 number of block refreshes rejected by the guard.
    skipped: int32 number of steps whose gradient was non-finite.
    residual: float32 largest residual of the last refresh.
  """
  count: chex.Array
  groups: tuple
  preconditioned: chex.Array
  failures: chex.Array
  skipped: chex.Array
  residual: chex.Array


def find_states(tree) -> list[PreconditionerState]:
  """Every :class:`PreconditionerState` inside an optax state, in tree order."""
  is_engine = lambda x: isinstance(x, PreconditionerState)
  return [s for s in jax.tree_util.tree_leaves(tree, is_leaf=is_engine)
          if is_engine(s)]


def _stacks_by_shape(leaves):
  """``(indices, stack)`` per distinct (shape, dtype) among ``leaves``."""
  by_shape: dict = {}
  for i, x in enumerate(leaves):
    by_shape.setdefault((x.shape, x.dtype), []).append(i)
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


def tree_all_finite(tree) -> jax.Array:
  """A scalar bool: every entry of every leaf is finite.

  One reduction per distinct leaf shape. (A flag combined from one value per
  leaf is a chain of scalar ``and``s that XLA copies into every fusion that
  reads the flag, one per parameter: compile time then grows with depth².)
  """
  flags = [jnp.all(jnp.isfinite(stack))
           for _, stack in _stacks_by_shape(jax.tree_util.tree_leaves(tree))]
  return functools.reduce(jnp.logical_and, flags, jnp.asarray(True))


def tree_select(pred, on_true, on_false):
  """``jnp.where(pred, a, b)`` leaf by leaf (pred a scalar or per-block)."""
  def sel(a, b):
    p = jnp.reshape(pred, jnp.shape(pred) + (1,) * (a.ndim - jnp.ndim(pred)))
    return jnp.where(p, a, b)
  return jax.tree_util.tree_map(sel, on_true, on_false)


def _block_ok(candidate, residual, threshold):
  """Per block: every leaf finite and the residual within the threshold."""
  ok = jnp.isfinite(residual) & (residual <= threshold)
  for leaf in jax.tree_util.tree_leaves(candidate):
    ok &= jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim)))
  return ok


def refresh_per_shard(precond: Preconditioner, shard, state):
  """``precond.refresh`` run by each device on its own blocks only.

  The block axis ``N`` (sharded over ``shard.size()`` devices) is split into
  ``[size, N/size]`` and the refresh is vmapped over the sharded axis, so each
  device decomposes its ``N/size`` blocks; the CPU path of
  :mod:`kronopt.linalg.lapack`, which loops over the unsharded axis, then
  stays local too.
  """
  size = shard.size()
  if size == 1:
    return precond.refresh(state)
  split = lambda x: jnp.reshape(x, (size, x.shape[0] // size) + x.shape[1:])
  merge = lambda x: jnp.reshape(x, (-1,) + x.shape[2:])
  parts = shard.constrain_tree(jax.tree_util.tree_map(split, state), size)
  out = jax.vmap(precond.refresh)(parts)
  return jax.tree_util.tree_map(merge, shard.constrain_tree(out, size))


def guarded_refresh(precond: Preconditioner, groups, threshold,
                    real_blocks=None, refresh=None):
  """Refreshes every group, keeping the old state of each rejected block.

  ``real_blocks`` gives, per group, a bool ``[N]`` mask of the real blocks;
  the others are sharding padding (identity blocks), which keep their state
  and count neither as failures nor in the residual. ``None``: all are real.
  ``refresh`` replaces ``precond.refresh`` (e.g. :func:`refresh_per_shard`).

  Returns ``(groups, rejected_count, worst_residual)``.
  """
  refresh = refresh or precond.refresh
  new_groups = []
  rejected = jnp.zeros([], jnp.int32)
  worst = jnp.zeros([], jnp.float32)
  if real_blocks is None:
    real_blocks = [None] * len(groups)
  for state, real in zip(groups, real_blocks):
    candidate, residual = refresh(state)
    ok = _block_ok(candidate, residual, threshold)
    if real is None:
      real = jnp.ones(residual.shape, bool)
    new_groups.append(tree_select(ok & real, candidate, state))
    rejected += jnp.sum(~ok & real).astype(jnp.int32)
    finite_res = jnp.where(jnp.isfinite(residual) & real, residual,
                           jnp.where(real, jnp.inf, 0.0))
    worst = jnp.maximum(
        worst, jnp.max(finite_res, initial=0.0).astype(jnp.float32))
  return tuple(new_groups), rejected, worst


def _pad_blocks(g, n_padded):
  """Appends zero blocks to ``g`` (``[n, *block]``) up to ``n_padded``."""
  if n_padded == g.shape[0]:
    return g
  return jnp.pad(g, [(0, n_padded - g.shape[0])] + [(0, 0)] * (g.ndim - 1))


def preconditioner_transform(
    precond: Preconditioner,
    *,
    block_size: int,
    precondition_every: int,
    start_preconditioning_step: int,
    inverse_failure_threshold: float,
    shard_axis: sharding_lib.ShardAxis = None,
    mesh: Optional[jax.sharding.Mesh] = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optax transform of an algorithm on the shared engine.

  Args:
    precond: the algorithm (see :class:`Preconditioner`).
    block_size: the largest block dimension (see :mod:`kronopt.layout`).
    precondition_every: refresh period in steps.
    start_preconditioning_step: first step at which the preconditioner is
      refreshed and applied.
    inverse_failure_threshold: largest residual a refreshed block may have.
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
  checks.check_int("block_size", block_size, low=2)
  checks.check_int("precondition_every", precondition_every, low=1)
  checks.check_int("start_preconditioning_step", start_preconditioning_step,
                   low=0)
  checks.check_number("inverse_failure_threshold", inverse_failure_threshold,
                      low=0.0, low_open=True)
  sharding_lib.check_shard_axis(shard_axis, mesh)
  shard = sharding_lib.BlockSharding(shard_axis, mesh)

  def init_fn(params):
    lay = layout_lib.make_layout(params, block_size)
    groups = []
    for shape, n in zip(lay.group_shapes, lay.group_sizes):
      n_padded = shard.padded(n)
      groups.append(shard.constrain_tree(precond.init_group(shape, n_padded),
                                         n_padded))
    return PreconditionerState(
        count=jnp.zeros([], jnp.int32),
        groups=tuple(groups),
        preconditioned=jnp.asarray(False),
        failures=jnp.zeros([], jnp.int32),
        skipped=jnp.zeros([], jnp.int32),
        residual=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    lay = layout_lib.make_layout(updates, block_size)
    count = state.count
    finite = tree_all_finite(updates)
    padded = [shard.padded(n) for n in lay.group_sizes]
    constrain_groups = lambda gs: tuple(
        shard.constrain_tree(g, n) for g, n in zip(gs, padded))
    real_blocks = [None if n_pad == n else
                   shard.constrain(jnp.arange(n_pad) < n, n_pad)
                   for n, n_pad in zip(lay.group_sizes, padded)]
    blocks = layout_lib.block(
        lay, jax.tree_util.tree_map(shard.gather, updates))
    blocks = [shard.constrain(_pad_blocks(jnp.where(finite, g, 0.0), n), n)
              for g, n in zip(blocks, padded)]

    stepped = tuple(precond.update_statistics(s, g, count)
                    for s, g in zip(state.groups, blocks))
    groups = constrain_groups(tree_select(finite, stepped, state.groups))

    active = count >= start_preconditioning_step
    due = active & ((count - start_preconditioning_step)
                    % precondition_every == 0)
    groups, rejected, residual = jax.lax.cond(
        due,
        lambda gs: guarded_refresh(
            precond, gs, inverse_failure_threshold, real_blocks,
            refresh=lambda st: refresh_per_shard(precond, shard, st)),
        lambda gs: (gs, jnp.zeros([], jnp.int32), state.residual),
        groups)
    groups = constrain_groups(groups)

    directions = [jnp.where(active, precond.precondition(s, g), g)
                  for s, g in zip(groups, blocks)]
    out = layout_lib.unblock(
        lay, [shard.gather(d) for d in directions], updates)
    out = jax.tree_util.tree_map(shard.restore, out, updates)
    out = jax.tree_util.tree_map(
        lambda u: jnp.where(finite, u, jnp.zeros_like(u)), out)
    new_state = PreconditionerState(
        count=optax.safe_int32_increment(count),
        groups=groups,
        preconditioned=active,
        failures=state.failures + rejected,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        residual=residual.astype(jnp.float32),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
