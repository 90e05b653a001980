"""Grafting: a preconditioner's direction at a simpler optimizer's step size.

Agarwal et al., "Disentangling adaptive gradient methods from learning rates"
(2020); ALGORITHMS.md §0. For each parameter, with ``D`` the direction and
``U_g`` the magnitude optimizer's update computed from the same gradient,

    U = D · ‖U_g‖_F / max(‖D‖_F, tiny).

Parameters that are not Kronecker-preconditioned (rank ≤ 1 after squeezing)
and every parameter before the direction's ``start_preconditioning_step``
take ``U_g`` itself. A step with a non-finite gradient leaves the magnitude's
state untouched and returns a zero update.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from kronopt import checks
from kronopt import engine
from kronopt import layout

GRAFT_TYPES = ("adam", "adagrad", "rmsprop", "sgd", "none")
TINY = 1e-30


class GraftState(NamedTuple):
  direction: optax.OptState
  magnitude: optax.OptState


def magnitude_transform(kind: str, *, b1=0.9, b2=0.999, eps=1e-8
                        ) -> optax.GradientTransformation:
  """The optimizer whose step size a direction is grafted onto."""
  if kind == "adam":
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  if kind == "adagrad":
    return optax.scale_by_rss(initial_accumulator_value=0.0, eps=eps)
  if kind == "rmsprop":
    return optax.scale_by_rms(decay=b2, eps=eps, initial_scale=0.0)
  if kind == "sgd":
    return optax.identity()
  raise ValueError(f"magnitude={kind!r} is not valid; expected one of "
                   f"{', '.join(map(repr, GRAFT_TYPES))} or an optax "
                   "GradientTransformation.")


def _preconditioned(direction_state) -> jax.Array:
  """Whether the direction preconditioned its last update.

  Read from the :class:`kronopt.engine.PreconditionerState` inside the
  direction's state; a direction without one always counts as preconditioned.
  """
  found = engine.find_states(direction_state)
  return found[0].preconditioned if found else jnp.asarray(True)


def _norms(x):
  """Frobenius norm of each ``x[i]`` of a stack, in float32."""
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def _graft_scales(d_leaves, u_leaves):
  """Per leaf ``‖U_g‖_F / max(‖D‖_F, tiny)``, batched over equal shapes."""
  d_norms = engine.per_leaf_reduce(_norms, d_leaves)
  u_norms = engine.per_leaf_reduce(_norms, u_leaves)
  return [u / jnp.maximum(dn, TINY) for dn, u in zip(d_norms, u_norms)]


def graft(direction: optax.GradientTransformation,
          magnitude: Union[str, optax.GradientTransformation] = "adam",
          *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
          ) -> optax.GradientTransformationExtraArgs:
  """Rescales ``direction``'s update per parameter to ``magnitude``'s norm.

  Args:
    direction: the preconditioner, e.g. :func:`kronopt.scale_by_shampoo`.
    magnitude: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` (the
      gradient's own norm), ``"none"`` (the direction unchanged) or any optax
      transform.
    b1, b2, eps: hyperparameters of the string magnitudes (``b1`` for adam,
      ``b2`` for adam and rmsprop).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`GraftState`.
  """
  direction = optax.with_extra_args_support(direction)
  if isinstance(magnitude, str):
    checks.check_choice("magnitude", magnitude, GRAFT_TYPES)
    if magnitude == "none":
      return direction
    checks.check_number("b1", b1, low=0.0, high=1.0, high_open=True)
    checks.check_number("b2", b2, low=0.0, high=1.0, high_open=True)
    checks.check_number("eps", eps, low=0.0)
    magnitude = magnitude_transform(magnitude, b1=b1, b2=b2, eps=eps)
  magnitude = optax.with_extra_args_support(magnitude)

  def init_fn(params):
    return GraftState(direction.init(params), magnitude.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    d, d_state = direction.update(updates, state.direction, params,
                                  **extra_args)
    u, m_state = magnitude.update(updates, state.magnitude, params,
                                  **extra_args)
    finite = engine.tree_all_finite(updates)
    m_state = engine.tree_select(finite, m_state, state.magnitude)
    active = _preconditioned(d_state)

    d_leaves, treedef = jax.tree_util.tree_flatten(d)
    u_leaves = treedef.flatten_up_to(u)
    scales = _graft_scales(d_leaves, u_leaves)

    def combine(d_leaf, u_leaf, scale):
      if not layout.is_preconditioned(d_leaf.shape):
        out = u_leaf
      else:
        grafted = d_leaf.astype(jnp.float32) * scale
        out = jnp.where(active, grafted, u_leaf.astype(jnp.float32))
      return jnp.where(finite, out, 0.0).astype(d_leaf.dtype)

    out = [combine(*leaf) for leaf in zip(d_leaves, u_leaves, scales)]
    return treedef.unflatten(out), GraftState(d_state, m_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
