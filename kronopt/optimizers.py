"""Ready-made optimizers: each a chain ending in the learning rate.

    graft(scale_by_X(...), graft_type, b1, nesterov)   (one momentum, §0)
      → decoupled weight decay → learning rate (float or optax schedule)

The graft takes the bias-corrected first moment ``m̂`` of the gradient,
preconditions it (statistics from the raw gradient) and rescales it to
Adam's ``m̂/(√v̂+ε)`` per parameter (docs/algorithms.md §0, "One momentum").
So on rank ≤ 1 parameters and on every parameter before
``start_preconditioning_step`` each optimizer here *is*
``optax.adamw(learning_rate, b1, graft_b2, graft_eps,
weight_decay=weight_decay, nesterov=nesterov)``. A step the preconditioner
skips (non-finite gradient or statistics) is a zero update that changes no
state but the skip counter.
"""

import inspect
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronopt import checks
from kronopt import engine
from kronopt import grafting
from kronopt.grafting import graft
from kronopt.preconditioners.caspr import scale_by_caspr
from kronopt.preconditioners.kfac import scale_by_kfac
from kronopt.preconditioners.kradagrad import scale_by_kradagrad
from kronopt.preconditioners.shampoo import scale_by_shampoo
from kronopt.preconditioners.sketchy import scale_by_sketchy
from kronopt.preconditioners.soap import scale_by_soap


def _is_zero(x) -> bool:
  """A Python/numpy zero (an array, e.g. from inject_hyperparams, is not)."""
  return isinstance(x, (int, float, np.number)) and x == 0


def decay_and_learning_rate(learning_rate: optax.ScalarOrSchedule,
                            weight_decay: Any = 0.0, weight_decay_mask=None
                            ) -> optax.GradientTransformation:
  """``u + λ·params`` (decoupled, AdamW's) then ``−learning_rate · u``.

  With ``weight_decay`` exactly 0 the decay is left out, so ``update`` needs
  no ``params``.
  """
  checks.check_number("weight_decay", weight_decay, low=0.0)
  checks.check_number("learning_rate", learning_rate, low=0.0)
  parts = [] if _is_zero(weight_decay) else [
      optax.add_decayed_weights(weight_decay, weight_decay_mask)]
  return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def skipping_with(head: optax.GradientTransformation,
                  tail: optax.GradientTransformation
                  ) -> optax.GradientTransformationExtraArgs:
  """``head`` then ``tail``; ``tail`` skips the steps ``head`` skipped.

  ``head`` holds a kronopt preconditioner (:func:`kronopt.engine.step_taken`
  tells whether it took the step; without one, a step is taken when the
  gradient is finite). On a skipped step ``tail``'s state (e.g. a schedule's
  count) is kept and the update is zero, so weight decay does not move the
  parameters either. The state is the pair ``(head_state, tail_state)``.
  Leaves that are not floating (integer parameters and their ``float0``
  gradients) get zero updates and no state
  (:func:`kronopt.engine.float_leaves_only`).
  """
  head = optax.with_extra_args_support(head)
  tail = optax.with_extra_args_support(tail)

  def init_fn(params):
    return head.init(params), tail.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    head_state, tail_state = state
    u, new_head = head.update(updates, head_state, params, **extra_args)
    taken = engine.step_taken(head_state, new_head)
    if taken is None:
      taken = engine.tree_all_finite(updates)
    u, new_tail = tail.update(u, tail_state, params, **extra_args)
    new_tail = engine.tree_select(taken, new_tail, tail_state)
    u = jax.tree_util.tree_map(lambda x: jnp.where(taken, x, 0).astype(
        x.dtype), u)
    return u, (new_head, new_tail)

  return engine.float_leaves_only(
      optax.GradientTransformationExtraArgs(init_fn, update_fn))


def chain_after_direction(direction, learning_rate, *, b1, nesterov,
                          weight_decay, graft_type, graft_eps=1e-8,
                          graft_b2=0.999, weight_decay_mask=None):
  """graft (one momentum) → weight decay → learning rate, for every alias."""
  grafting.check_graft_args(
      graft_type, b1, graft_b2, graft_eps, nesterov,
      names=("graft_type", "b1", "graft_b2", "graft_eps", "nesterov"))
  return skipping_with(
      graft(direction, graft_type, b1=b1, b2=graft_b2, eps=graft_eps,
            nesterov=nesterov),
      decay_and_learning_rate(learning_rate, weight_decay, weight_decay_mask))


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
    qr_tolerance: float = 0.01,
    qr_iterations: int = 1,
    statistics_every: int = 1,
    staggered_refresh: bool = False,
    max_precond_dim: Optional[int] = None,
    weight_decay_mask: Any = None,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo with Adam grafting, one momentum and decoupled weight decay.

  Gupta et al. 2018; Anil et al. 2020 (docs/algorithms.md §1). See
  :func:`kronopt.scale_by_shampoo` for the preconditioner's arguments.

  Args:
    learning_rate: a float or an optax schedule.
    b1: first-moment decay; the bias-corrected first moment is what is
      preconditioned (and Adam's first moment where nothing is).
    b2: statistics decay of the preconditioner (1: a plain sum).
    weight_decay: decoupled weight decay (AdamW-style, before the learning
      rate).
    nesterov: Nesterov's form of the first moment (as ``optax.adam``).
    graft_type: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or
      ``"none"``.
    graft_eps: ε of the graft optimizer.
    graft_b2: second-moment decay of the adam / rmsprop graft.
    weight_decay_mask: as ``optax.adamw``'s ``mask``.
    shard_axis: mesh axis (or axes) to shard the stacked blocks over.
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, kronopt
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = kronopt.shampoo(1e-3, block_size=128)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((4, 3), 0.1), "b": jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  return _shampoo(**locals())


def _shampoo(*, learning_rate, b1, b2, epsilon, weight_decay, nesterov,
             block_size, precondition_every, start_preconditioning_step,
             root_method, exponent, one_sided, relative_epsilon,
             inverse_failure_threshold, graft_type, graft_eps, graft_b2,
             kronecker_power_iterations, qr_tolerance, qr_iterations,
             statistics_every, staggered_refresh, max_precond_dim,
             weight_decay_mask, shard_axis, mesh, exponent_multiplier=1.0):
  """:func:`shampoo` with Shampoo²'s ``exponent_multiplier``."""
  direction = scale_by_shampoo(
      block_size=block_size, b2=b2, epsilon=epsilon, exponent=exponent,
      exponent_multiplier=exponent_multiplier,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      root_method=root_method, one_sided=one_sided,
      relative_epsilon=relative_epsilon,
      inverse_failure_threshold=inverse_failure_threshold,
      kronecker_power_iterations=kronecker_power_iterations,
      qr_tolerance=qr_tolerance, qr_iterations=qr_iterations,
      statistics_every=statistics_every, staggered_refresh=staggered_refresh,
      max_precond_dim=max_precond_dim, shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2, weight_decay_mask=weight_decay_mask)


def shampoo2(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
  """Shampoo², ``D = L^{-1/2} G R^{-1/2}``, grafted, one momentum.

  Morwani et al., "A New Perspective on Shampoo's Preconditioner", 2024
  (docs/algorithms.md §3): ``L⊗R`` is one power-iteration step towards the
  optimal Kronecker approximation of ``E[g gᵀ]``, so its inverse square root
  uses the exponent ``−1/k`` per factor (``−1/2`` for matrices). Same
  arguments as :func:`shampoo` (``kronecker_power_iterations=True`` adds the
  online power iteration); the exponent multiplier 2 is fixed, so it stays
  static under ``optax.inject_hyperparams``.

  Example:
    >>> import jax.numpy as jnp, kronopt
    >>> tx = kronopt.shampoo2(1e-3, block_size=128)
    >>> state = tx.init({"w": jnp.ones((4, 3))})
  """
  bound = inspect.signature(shampoo).bind(*args, **kwargs)
  bound.apply_defaults()
  return _shampoo(**bound.arguments, exponent_multiplier=2.0)


shampoo2.__signature__ = inspect.signature(shampoo)


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
    qr_tolerance: float = 0.01,
    qr_iterations: int = 1,
    statistics_every: int = 1,
    staggered_refresh: bool = False,
    max_precond_dim: Optional[int] = None,
    weight_decay_mask: Any = None,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """CASPR, ``vec D = ((P_L ⊕ P_R)/2)² g``, grafted, one momentum.

  Duvvuri et al., ICLR 2024 (docs/algorithms.md §4): Shampoo's factors
  combined by a Kronecker sum, with damping relative to each factor's mean
  eigenvalue. See :func:`kronopt.scale_by_caspr` for the preconditioner's
  arguments and :func:`shampoo` for the others.
  """
  direction = scale_by_caspr(
      block_size=block_size, b2=b2, epsilon=epsilon,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      root_method=root_method, relative_epsilon=relative_epsilon,
      inverse_failure_threshold=inverse_failure_threshold,
      qr_tolerance=qr_tolerance, qr_iterations=qr_iterations,
      statistics_every=statistics_every, staggered_refresh=staggered_refresh,
      max_precond_dim=max_precond_dim,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2, weight_decay_mask=weight_decay_mask)


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
    statistics_every: int = 1,
    max_precond_dim: Optional[int] = None,
    fd_method: str = "randomized",
    fd_oversample: Optional[int] = None,
    fd_power_iters: int = 1,
    seed: int = 0,
    weight_decay_mask: Any = None,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """Sketchy, grafted, one momentum, decoupled weight decay.

  Feinberg et al., NeurIPS 2023 (docs/algorithms.md §5): Shampoo whose
  factors are rank-``rank`` Frequent Directions sketches, ``O(d·rank)``
  memory per axis. See :func:`kronopt.scale_by_sketchy` for the
  preconditioner's arguments and :func:`shampoo` for the others.
  """
  # As Shampoo's: the sketches start at 0, whose undamped root is infinite.
  checks.check_number("epsilon", epsilon, low=0.0, low_open=True)
  checks.check_bool("relative_epsilon", relative_epsilon)
  direction = scale_by_sketchy(
      rank=rank, block_size=block_size, b2=b2, epsilon=epsilon,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      relative_epsilon=relative_epsilon,
      inverse_failure_threshold=inverse_failure_threshold,
      statistics_every=statistics_every, max_precond_dim=max_precond_dim,
      fd_method=fd_method, fd_oversample=fd_oversample,
      fd_power_iters=fd_power_iters, seed=seed,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2, weight_decay_mask=weight_decay_mask)


def kradagrad(
    learning_rate: optax.ScalarOrSchedule,
    *,
    variant: str = "star",
    b1: float = 0.9,
    b2: float = 1.0,
    epsilon: float = 1e-6,
    damping: float = 0.0,
    star_update: str = "frobenius",
    weight_decay: float = 0.0,
    nesterov: bool = True,
    block_size: int = 256,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    inverse_failure_threshold: float = 0.1,
    graft_type: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float = 0.999,
    statistics_every: int = 1,
    max_precond_dim: Optional[int] = None,
    weight_decay_mask: Any = None,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """KrADagrad★ / KrADagrad, grafted, one momentum, decoupled weight decay.

  Mei et al. 2023 (docs/algorithms.md §2): inverse-free Kronecker statistics,
  so only positive matrix powers are taken and float32 is enough. See
  :func:`kronopt.scale_by_kradagrad` for the preconditioner's arguments and
  :func:`shampoo` for the others; ``b2`` is the statistics decay of the
  preconditioner's (1 is AdaGrad; ``b2 < 1`` needs ``damping > 0`` for
  KrADagrad★), ``graft_b2`` the graft's.
  """
  direction = scale_by_kradagrad(
      variant=variant, block_size=block_size, b2=b2, epsilon=epsilon,
      damping=damping, star_update=star_update,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      statistics_every=statistics_every, max_precond_dim=max_precond_dim,
      shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2, weight_decay_mask=weight_decay_mask)


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    *,
    method: str = "brand",
    rank: int = 220,
    damping: float = 1e-3,
    ema: float = 0.95,
    cov_every: int = 10,
    inverse_every: int = 100,
    seed: int = 0,
    layers: Any = None,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = True,
    relative_damping: bool = True,
    start_preconditioning_step: int = 0,
    inverse_failure_threshold: float = 0.1,
    oversample: int = 10,
    power_iters: int = 3,
    correction_fraction: float = 0.2,
    rsvd_reset_every: int = 5,
    graft_type: str = "adam",
    graft_eps: float = 1e-8,
    graft_b2: float = 0.999,
    weight_decay_mask: Any = None,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC with online eigendecompositions, grafted, one momentum.

  Martens & Grosse 2015; Puiu, "Brand New K-FACs" (arXiv 2210.08494) and
  "Randomized K-FACs" (arXiv 2206.15397) (docs/algorithms.md §6). ``update``
  needs the layer statistics, ``tx.update(grads, state, params,
  kfac_stats=stats)``, from :mod:`kronopt.flax` (or built with
  :class:`kronopt.KFACStats`); ``layers`` (e.g. ``capture.layers``) says
  which kernels are layers. The K-FAC direction of the bias-corrected first
  moment is grafted per parameter onto Adam's step; parameters no layer
  covers get exactly ``optax.adamw``'s update. See
  :func:`kronopt.scale_by_kfac` for the preconditioner's arguments and
  :func:`shampoo` for the others.

  Example:
    >>> import jax.numpy as jnp, optax, kronopt
    >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> tx = kronopt.kfac(1e-3, method="eigh")
    >>> state = tx.init(params)
    >>> grads = {"dense": {"kernel": jnp.full((4, 3), 0.1),
    ...                    "bias": jnp.ones(3)}}
    >>> x, dy = jnp.ones((8, 4)), jnp.full((8, 3), 0.01)  # inputs, ∂L/∂y
    >>> stats = {"dense": {"kernel": kronopt.KFACStats.dense(x, dy, bias=True),
    ...                    "bias": None}}
    >>> updates, state = tx.update(grads, state, params, kfac_stats=stats)
    >>> params = optax.apply_updates(params, updates)
  """
  direction = scale_by_kfac(
      method=method, rank=rank, damping=damping, ema=ema,
      cov_every=cov_every, inverse_every=inverse_every, seed=seed,
      layers=layers, relative_damping=relative_damping,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      oversample=oversample, power_iters=power_iters,
      correction_fraction=correction_fraction,
      rsvd_reset_every=rsvd_reset_every, shard_axis=shard_axis, mesh=mesh)
  return chain_after_direction(
      direction, learning_rate, b1=b1, nesterov=nesterov,
      weight_decay=weight_decay, graft_type=graft_type, graft_eps=graft_eps,
      graft_b2=graft_b2, weight_decay_mask=weight_decay_mask)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    shampoo_b2: Optional[float] = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    block_size: int = 1024,
    max_precond_dim: Optional[int] = 10_000,
    precondition_every: int = 10,
    start_preconditioning_step: int = 0,
    weight_decay_mask: Any = None,
    shard_axis=None,
    mesh=None,
) -> optax.GradientTransformationExtraArgs:
  """SOAP: Adam in Shampoo's eigenbasis, decoupled weight decay.

  Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", 2024
  (docs/algorithms.md §8). No graft: :func:`kronopt.scale_by_soap` is the
  whole step (its own bias-corrected moments), then ``+ weight_decay ·
  params`` and ``−learning_rate``. Leaves with no rotated axis (rank ≤ 1,
  or every dimension above ``max_precond_dim``), and every leaf while the
  bases are still ``I`` (the first step by default), get exactly
  ``optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay)``'s
  update. See :func:`kronopt.scale_by_soap` for the other arguments.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay (AdamW-style, before the learning
      rate).
    weight_decay_mask: as ``optax.adamw``'s ``mask``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax.numpy as jnp, optax, kronopt
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = kronopt.soap(3e-3)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((4, 3), 0.1), "b": jnp.ones(3)}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
  """
  direction = scale_by_soap(
      b1=b1, b2=b2, shampoo_b2=shampoo_b2, eps=eps, block_size=block_size,
      max_precond_dim=max_precond_dim, precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      shard_axis=shard_axis, mesh=mesh)
  return skipping_with(
      direction,
      decay_and_learning_rate(learning_rate, weight_decay, weight_decay_mask))
