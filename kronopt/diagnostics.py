"""Metrics read from an optimizer state.

:func:`diagnostics` walks any optax state (chains, graft, masked, inject_
hyperparams, MultiSteps) for the engine's
:class:`kronopt.engine.PreconditionerState` and returns scalars that are cheap
to log every step.
"""

import jax.numpy as jnp

from kronopt.engine import find_states


def diagnostics(state) -> dict:
  """A flat dict of scalar arrays describing the preconditioners in ``state``.

  Keys:
    ``refresh_failures``: block refreshes rejected by the guard (non-finite
      root or residual above ``inverse_failure_threshold``), summed.
    ``skipped_gradients``: steps whose gradient was non-finite (the largest
      count over the preconditioners found).
    ``overflowed_statistics``: steps skipped because a finite gradient would
      have made the statistics non-finite (largest count).
    ``worst_residual``: largest residual of the last refresh.
    ``preconditioned``: whether the last update was preconditioned.
    ``count``: steps taken.

  Raises:
    ValueError: if ``state`` holds no kronopt preconditioner.
  """
  found = find_states(state)
  if not found:
    raise ValueError("diagnostics(state): the state holds no kronopt "
                     "preconditioner state (PreconditionerState).")
  stack = lambda f: jnp.stack([jnp.asarray(f(s)) for s in found])
  return {
      "refresh_failures": jnp.sum(stack(lambda s: s.failures)),
      "skipped_gradients": jnp.max(stack(lambda s: s.skipped)),
      "overflowed_statistics": jnp.max(stack(lambda s: s.overflows)),
      "worst_residual": jnp.max(stack(lambda s: s.residual)),
      "preconditioned": jnp.all(stack(lambda s: s.preconditioned)),
      "count": jnp.max(stack(lambda s: s.count)),
  }
