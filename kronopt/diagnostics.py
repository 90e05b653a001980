"""Metrics read from an optimizer state (docs/diagnostics.md).

:func:`diagnostics` walks any optax state (chains, graft, masked, partition,
inject_hyperparams, MultiSteps) for the engine's
:class:`kronopt.engine.PreconditionerState` and returns scalars that are cheap
to log every step.

It also reads Flax NNX's views of such a state, without importing Flax: an
``nnx.Optimizer`` or its ``opt_state`` (the NamedTuples kept, each array
wrapped in an ``nnx.Variable``), and ``nnx.state(optimizer)`` or the state of
``nnx.split(optimizer)`` (an ``nnx.State``, where every NamedTuple has become
a mapping keyed by its field names), or ``nnx.to_pure_dict`` of it. A mapping
is taken for an engine state when it has every field of
:class:`~kronopt.engine.PreconditionerState` (``count``, ``groups``,
``preconditioned``, ``failures``, ``skipped``, ``overflows``, ``residual``);
each field is read as the single array under it.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from kronopt.engine import PreconditionerState

FIELDS = PreconditionerState._fields
"""The field names by which an engine state is recognised in a mapping."""


def _is_engine_state(x) -> bool:
  """A :class:`PreconditionerState`, or a mapping with all of its fields."""
  if isinstance(x, PreconditionerState):
    return True
  return isinstance(x, Mapping) and all(f in x for f in FIELDS)


def _find(tree) -> list:
  """Every engine state (or mapping view of one) in ``tree``, in tree order.

  An object that holds none but has an ``opt_state`` attribute (an
  ``nnx.Optimizer``) is searched through that attribute.
  """
  found = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_engine_state)
           if _is_engine_state(x)]
  if not found and hasattr(tree, "opt_state"):
    return _find(tree.opt_state)
  return found


def _field(state, name: str) -> jax.Array:
  """Field ``name`` of an engine state or of a mapping view of one.

  The array may be wrapped (an ``nnx.Variable`` is a pytree node holding it):
  the field must hold exactly one array leaf.
  """
  value = state[name] if isinstance(state, Mapping) else getattr(state, name)
  leaves = jax.tree_util.tree_leaves(value)
  if len(leaves) != 1:
    raise ValueError(
        f"diagnostics(state): the preconditioner state's field {name!r} holds "
        f"{len(leaves)} arrays; expected exactly one ({value!r}).")
  return jnp.asarray(leaves[0])


def diagnostics(state) -> dict:
  """A flat dict of scalar arrays describing the preconditioners in ``state``.

  Args:
    state: an optax state holding one or more kronopt preconditioners (as
      returned by ``tx.init`` / ``tx.update``), an ``nnx.Optimizer``, its
      ``opt_state``, ``nnx.state(optimizer)`` or a pure dict of that; works
      under ``jit``.

  Keys (every value a 0-d array):
    ``refresh_failures``: int32, block refreshes rejected by the guard
      (non-finite candidate or residual above ``inverse_failure_threshold``),
      summed over the preconditioners found.
    ``skipped_gradients``: int32, steps whose gradient (or auxiliary input)
      was non-finite (the largest count over the preconditioners found).
    ``overflowed_statistics``: int32, steps skipped because a finite gradient
      would have made the statistics non-finite (largest count).
    ``worst_residual``: float32, largest residual of the last refresh (the
      largest over the preconditioners found).
    ``preconditioned``: bool, whether every preconditioner found was past
      its ``start_preconditioning_step`` at the last update.
    ``count``: int32, steps taken (skipped steps not counted; the largest
      count found).

  Raises:
    ValueError: if ``state`` holds no kronopt preconditioner state.
  """
  found = _find(state)
  if not found:
    raise ValueError(
        "diagnostics(state): the state holds no kronopt preconditioner state "
        f"(PreconditionerState, or a mapping with the fields {FIELDS}); got "
        f"a {type(state).__name__}. Pass the state returned by tx.init / "
        "tx.update; with Flax NNX, the nnx.Optimizer, its opt_state "
        "(optimizer.opt_state) or nnx.state(optimizer).")
  stack = lambda name: jnp.stack([_field(s, name) for s in found])
  return {
      "refresh_failures": jnp.sum(stack("failures"), dtype=jnp.int32),
      "skipped_gradients": jnp.max(stack("skipped")),
      "overflowed_statistics": jnp.max(stack("overflows")),
      "worst_residual": jnp.max(stack("residual")),
      "preconditioned": jnp.all(stack("preconditioned")),
      "count": jnp.max(stack("count")),
  }
