"""Ready-made optimizers: each a chain ending in the learning rate.

    graft(scale_by_X(...), magnitude) → momentum (β₁ EMA, optional Nesterov)
      → decoupled weight decay → learning rate (float or optax schedule)

(ALGORITHMS.md §0, "After the preconditioner").
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import optax

from kronopt import checks
from kronopt.grafting import graft
from kronopt.preconditioners.caspr import scale_by_caspr
from kronopt.preconditioners.kradagrad import scale_by_kradagrad
from kronopt.preconditioners.shampoo import scale_by_shampoo
from kronopt.preconditioners.sketchy import scale_by_sketchy


class EmaMomentumState(NamedTuple):
  momentum: optax.Updates


def ema_momentum(b1: float = 0.9, nesterov: bool = True
                 ) -> optax.GradientTransformation:
  """``m ← β₁ m + (1−β₁) u``; returns ``m`` or, with Nesterov, ``β₁ m + (1−β₁) u``.

  The momentum is kept in each update's dtype.
  """
  checks.check_number("b1", b1, low=0.0, high=1.0, high_open=True)

  def init_fn(params):
    return EmaMomentumState(optax.tree.zeros_like(params))

  def ema(m, updates):
    return jax.tree_util.tree_map(
        lambda mu, u: (b1 * mu + (1.0 - b1) * u).astype(u.dtype), m, updates)

  def update_fn(updates, state, params=None):
    del params
    m = ema(state.momentum, updates)
    return (ema(m, updates) if nesterov else m), EmaMomentumState(m)

  return optax.GradientTransformation(init_fn, update_fn)


def chain_after_direction(direction, learning_rate, *, b1, nesterov,
                          weight_decay, graft_type, graft_eps=1e-8,
                          graft_b2=0.999):
  """graft → momentum → weight decay → learning rate, shared by every alias."""
  checks.check_number("weight_decay", weight_decay, low=0.0)
  if not callable(learning_rate):
    checks.check_number("learning_rate", learning_rate, low=0.0)
  return optax.chain(
      graft(direction, graft_type, b2=graft_b2, eps=graft_eps),
      ema_momentum(b1, nesterov),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    epsilon: float = 1e-6,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    block_size: int = 1024,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    root_method: str = "eigh",
    exponent: Optional[float] = None,
    one_sided: bool = False,
    relative_epsilon: bool = True,
    inverse_failure_threshold: float = 0.1,
    graft_type: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float = 0.999,
    kronecker_power_iterations: bool = False,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo with Adam grafting, momentum and decoupled weight decay.

  Gupta et al. 2018; Anil et al. 2020 (ALGORITHMS.md §1). See
  :func:`kronopt.scale_by_shampoo` for the preconditioner's arguments.

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum EMA decay applied after grafting.
    b2: statistics decay of the preconditioner (1: a plain sum).
    weight_decay: decoupled weight decay (AdamW-style, before the learning
      rate).
    nesterov: Nesterov form of the momentum.
    graft_type: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or
      ``"none"``.
    graft_eps: ε of the graft optimizer.
    graft_b2: second-moment decay of the adam / rmsprop graft.
    shard_axis: mesh axis (or axes) to shard the stacked blocks over.
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.
  """
  direction = scale_by_shampoo(
      block_size=block_size, b2=b2, epsilon=epsilon, exponent=exponent,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      root_method=root_method, one_sided=one_sided,
      relative_epsilon=relative_epsilon,
      inverse_failure_threshold=inverse_failure_threshold,
      kronecker_power_iterations=kronecker_power_iterations,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2)


def shampoo2(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    epsilon: float = 1e-6,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    block_size: int = 1024,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    root_method: str = "eigh",
    relative_epsilon: bool = True,
    inverse_failure_threshold: float = 0.1,
    graft_type: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float = 0.999,
    kronecker_power_iterations: bool = False,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo², ``D = L^{-1/2} G R^{-1/2}``, with grafting and momentum.

  Morwani et al., "A New Perspective on Shampoo's Preconditioner", 2024
  (ALGORITHMS.md §3): ``L⊗R`` is one power-iteration step towards the optimal
  Kronecker approximation of ``E[g gᵀ]``, so its inverse square root uses the
  exponent ``−1/k`` per factor (``−1/2`` for matrices). Shampoo with
  ``exponent_multiplier=2``; see :func:`kronopt.scale_by_shampoo` for the
  preconditioner's arguments and :func:`shampoo` for the others.
  """
  direction = scale_by_shampoo(
      block_size=block_size, b2=b2, epsilon=epsilon, exponent_multiplier=2.0,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      root_method=root_method, relative_epsilon=relative_epsilon,
      inverse_failure_threshold=inverse_failure_threshold,
      kronecker_power_iterations=kronecker_power_iterations,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2)


def caspr(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    epsilon: float = 1e-6,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    block_size: int = 1024,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    root_method: str = "eigh",
    relative_epsilon: bool = True,
    inverse_failure_threshold: float = 0.1,
    graft_type: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float = 0.999,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """CASPR, ``vec D = ((P_L ⊕ P_R)/2)² g``, with grafting and momentum.

  Duvvuri et al., ICLR 2024 (ALGORITHMS.md §4): Shampoo's factors combined by
  a Kronecker sum, with damping relative to each factor's mean eigenvalue.
  See :func:`kronopt.scale_by_caspr` for the preconditioner's arguments and
  :func:`shampoo` for the others.
  """
  direction = scale_by_caspr(
      block_size=block_size, b2=b2, epsilon=epsilon,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      root_method=root_method, relative_epsilon=relative_epsilon,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2)


def sketchy(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    epsilon: float = 1e-6,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    rank: int = 256,
    block_size: int = 1024,
    precondition_every: int = 1,
    start_preconditioning_step: int = 10,
    relative_epsilon: bool = True,
    inverse_failure_threshold: float = 0.1,
    graft_type: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float = 0.999,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """Sketchy with Adam grafting, momentum and decoupled weight decay.

  Feinberg et al., NeurIPS 2023 (ALGORITHMS.md §5): Shampoo whose factors are
  rank-``rank`` Frequent Directions sketches, ``O(d·rank)`` memory per axis.
  See :func:`kronopt.scale_by_sketchy` for the preconditioner's arguments
  (``rank``, ``b2``, ``epsilon``, …) and :func:`shampoo` for the others.
  """
  direction = scale_by_sketchy(
      rank=rank, block_size=block_size, b2=b2, epsilon=epsilon,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      relative_epsilon=relative_epsilon,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2)


def kradagrad(
    learning_rate: optax.ScalarOrSchedule,
    *,
    variant: str = "star",
    b1: float = 0.9,
    b2: float = 1.0,
    epsilon: float = 1e-6,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    block_size: int = 256,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    inverse_failure_threshold: float = 0.1,
    graft_type: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float = 0.999,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """KrADagrad★ / KrADagrad with grafting, momentum and weight decay.

  Mei et al. 2023 (ALGORITHMS.md §2): inverse-free Kronecker statistics, so
  only positive matrix powers are taken and float32 is enough. See
  :func:`kronopt.scale_by_kradagrad` for the preconditioner's arguments and
  :func:`shampoo` for the others; ``b2`` is the statistics decay of the
  preconditioner's (1 is AdaGrad), ``graft_b2`` the graft's; ``shard_axis``
  and ``mesh`` shard the stacked blocks (see :mod:`kronopt.sharding`).
  """
  direction = scale_by_kradagrad(
      variant=variant, block_size=block_size, b2=b2, epsilon=epsilon,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2)
