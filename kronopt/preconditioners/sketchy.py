"""Sketchy (Feinberg et al., NeurIPS 2023) -- docs/algorithms.md §5.

Shampoo with every Kronecker factor replaced by a rank-k Frequent Directions
sketch (:mod:`kronopt.linalg.sketch`). Per block ``G`` (an order-q tensor)
and axis i, with ``d = d_i`` and ``k = min(rank, d)``:

    sketch      Z = [√β₂ U diag(σ), G_(i)],  Z = V s Wᵀ,  c = s_{k+1},
                σ_j = √(s_j² − c²),  U = V[:, :k],  ρ ← β₂ ρ + c²  (each step)
    root        P_i = U diag((σ² + ρ + ε')^{-1/(2q)}) Uᵀ
                      + (ρ + ε')^{-1/(2q)} (I − U Uᵀ)           (each refresh)
    direction   D = G ×_1 P_1 ×_2 … ×_q P_q

with ``ε' = ε · max(σ² + ρ)`` (or ``ε`` when ``relative_epsilon`` is False).
With ``fd_method="randomized"`` (the default) the sketch step decomposes
``Z W`` instead of ``Z``, ``W`` a ``(k + m) × (k + oversample)`` orthonormal
basis from a randomized range step warm-started at ``U``, and ``ρ`` grows by
an estimate of the escaped mass (:func:`kronopt.linalg.sketch.fd_update`):
no ``d×d`` decomposition per step. Nothing ``d×d`` is stored: per axis the
state is ``2·d·k + 2·k + 2`` floats (the sketch ``U, σ, √ρ`` and the cached
root ``U, a, t``).

The sketch approximates ``C_t = Σ_s β₂^{t−s} G_(i) G_(i)ᵀ`` (new outer
products enter with weight 1), so with ``rank ≥ d`` it is exactly
``L_i / (1−β₂)`` of Shampoo with the same β₂ (``L_i`` itself when β₂ = 1),
and Sketchy's direction is Shampoo's times the constant ``(1−β₂)^{1/2}``,
which grafting removes. The direction is scale-free: gradients ``s·G`` give
the direction of ``G`` for ``s`` from ``1e-30`` up to where Shampoo's
statistic ``(1−β₂)(σ₁² + ρ)`` overflows float32; there the engine skips the
step and counts it in ``overflows``, as for Shampoo.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from kronopt import checks
from kronopt import engine
from kronopt.linalg import sketch as sketch_lib
from kronopt.preconditioners import shampoo


class SketchyGroupState(NamedTuple):
  """Per group of ``N`` stacked blocks, per axis i (``d = d_i``).

  Attributes:
    sketches: tuple of :class:`kronopt.linalg.sketch.Sketch`
      (``U [N, d, k]``, ``σ [N, k]``, ``√ρ [N]``), updated every step.
    roots: tuple of :class:`kronopt.linalg.sketch.LowRankRoot`
      (``U [N, d, k]``, ``a [N, k]``, ``t [N]``), the inverse roots cached
      at the last refresh.
  """
  sketches: tuple
  roots: tuple


def unfold(g, axis: int):
  """Mode-i matricization per block: ``[N, d_1..d_q] -> [N, d_i, |G|/d_i]``."""
  g = jnp.moveaxis(g, axis + 1, 1)
  return jnp.reshape(g, g.shape[:2] + (-1,))


@dataclasses.dataclass(frozen=True)
class Sketchy:
  """Sketchy on the engine (see :func:`kronopt.scale_by_sketchy`)."""
  rank: int = 256
  b2: Any = 0.999
  epsilon: Any = 1e-6
  relative_epsilon: Any = True
  fd_method: str = "randomized"
  fd_oversample: Optional[int] = None
  fd_power_iters: Any = 1
  seed: Any = 0

  def init_group(self, block_shape, n, axes=None):
    axes = shampoo.preconditioned_axes(block_shape, False, axes)
    dims = [block_shape[i] for i in axes]
    ranks = [min(self.rank, d) for d in dims]
    return SketchyGroupState(
        sketches=tuple(sketch_lib.init_sketch(n, d, k)
                       for d, k in zip(dims, ranks)),
        roots=tuple(sketch_lib.init_root(n, d, k)
                    for d, k in zip(dims, ranks)))

  def _keys(self, ctx, n: int, axis: int):
    """``fold_in(fold_in(fold_in(key(seed), count), block), axis)``."""
    count = 0 if ctx is None else ctx.count
    index = jnp.arange(n) if ctx is None else ctx.index
    base = jax.random.fold_in(jax.random.key(self.seed), count)
    return jax.vmap(lambda i: jax.random.fold_in(
        jax.random.fold_in(base, i), axis))(index)

  def update_statistics(self, state, g, ctx=None):
    axes = shampoo.context_axes(ctx, g.shape[1:])
    sketches = tuple(
        sketch_lib.fd_update(
            s, unfold(g, axis), self.b2, method=self.fd_method,
            keys=self._keys(ctx, g.shape[0], axis),
            oversample=(sketch_lib.OVERSAMPLE if self.fd_oversample is None
                        else self.fd_oversample),
            power_iters=self.fd_power_iters)
        for axis, s in zip(axes, state.sketches))
    return state._replace(sketches=sketches)

  def refresh(self, state, ctx=None):
    del ctx
    p = 2 * len(state.sketches)
    results = [sketch_lib.inverse_root(
        s, p, epsilon=self.epsilon, relative_epsilon=self.relative_epsilon)
               for s in state.sketches]
    residual = jnp.max(jnp.stack([res for _, res in results]), axis=0)
    return state._replace(roots=tuple(r for r, _ in results)), residual

  def precondition(self, state, g, ctx=None):
    axes = shampoo.context_axes(ctx, g.shape[1:])
    for axis, root in zip(axes, state.roots):
      g = sketch_lib.apply_root(root, g, axis)
    return g


def scale_by_sketchy(
    *,
    rank: int = 256,
    block_size: int = 1024,
    b2: float = 0.999,
    epsilon: float = 1e-6,
    precondition_every: int = 1,
    start_preconditioning_step: int = 10,
    relative_epsilon: bool = True,
    inverse_failure_threshold: float = 0.1,
    statistics_every: int = 1,
    max_precond_dim: Optional[int] = None,
    fd_method: str = "randomized",
    fd_oversample: Optional[int] = None,
    fd_power_iters: int = 1,
    seed: int = 0,
    shard_axis: Optional[Any] = None,
    mesh: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Sketchy's preconditioned direction (docs/algorithms.md §5).

  Feinberg, Chen, Sun, Anil & Hazan, "Sketchy: Memory-efficient adaptive
  regularization with Frequent Directions", NeurIPS 2023. Each Kronecker
  factor of Shampoo is a rank-``k`` Frequent Directions sketch, so memory per
  axis of size ``d`` is ``O(d·k)`` instead of ``O(d²)``. Usually wrapped in
  :func:`kronopt.graft`.

  The sketch is updated every step. Per axis, ``fd_method="exact"`` takes
  the left singular pairs of the ``d × (k + |G|/d)`` matrix ``Z`` (a ``d×d``
  eigh for a wide one, a thin SVD for a tall one); ``"randomized"``
  compresses ``Z`` to ``l = k + fd_oversample`` columns by a randomized
  range step warm-started at the sketch's basis and decomposes the ``d×l``
  result (matmuls and QRs, linear in ``d``), where that is at most half as
  wide as ``Z`` (else it takes the exact step). It keeps
  ``0 ⪯ C_t − sketch`` exactly and ``C_t − sketch ⪯ (1+η) ρ I`` with ``η``
  the shortfall of its escaped-mass estimates (see
  :func:`kronopt.linalg.sketch.fd_update`). The refresh only turns the
  sketch into the cached inverse root, which costs ``O(d·k)``, hence the
  default ``precondition_every=1``.

  Args:
    rank: sketch rank ``k`` per axis (an axis of size ``d ≤ rank`` keeps
      ``k = d``, which is exact Shampoo up to scale).
    block_size: largest block dimension; larger dimensions are split.
    b2: decay ``β₂`` in ``(0, 1]`` of the sketched statistics; 1 is a sum.
    epsilon: damping ``ε``; relative to ``max(σ² + ρ)`` unless
      ``relative_epsilon`` is False, in which case it is absolute.
    precondition_every: steps between refreshes of the cached roots.
    start_preconditioning_step: first step preconditioned.
    relative_epsilon: damping relative to the largest eigenvalue (default)
      or absolute.
    inverse_failure_threshold: largest loss of orthonormality ``max|UᵀU − I|``
      a refreshed root basis may have.
    statistics_every: update the sketches every this many steps.
    max_precond_dim: dimensions larger than this get no sketch.
    fd_method: the Frequent Directions step, ``"randomized"`` (default, the
      faster on every axis of the benchmark MLP) or ``"exact"``.
    fd_oversample: columns beyond ``k`` that ``"randomized"`` keeps
      (``None``: 16); static, as ``rank``.
    fd_power_iters: power steps of ``"randomized"``'s range finder.
    seed: seed of ``"randomized"``'s random columns (``fold_in`` by step,
      block and axis).
    shard_axis: mesh axis name (or tuple) to shard the stacked blocks over;
      ``None`` does not shard (see :mod:`kronopt.sharding`).
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`kronopt.PreconditionerState` of :class:`SketchyGroupState` groups.

  Raises:
    ValueError: for an argument out of its valid range.
  """
  checks.check_int("rank", rank, low=1, static=True)
  checks.check_number("b2", b2, low=0.0, high=1.0, low_open=True)
  checks.check_number("epsilon", epsilon, low=0.0)
  checks.check_choice("fd_method", fd_method, sketch_lib.FD_METHODS)
  checks.check_int("fd_oversample", fd_oversample, low=1, allow_none=True,
                   static=True)
  checks.check_int("fd_power_iters", fd_power_iters, low=0,
                   high=checks.INT32_MAX)
  checks.check_int("seed", seed, low=0)
  precond = Sketchy(rank=rank, b2=b2, epsilon=epsilon,
                    relative_epsilon=relative_epsilon, fd_method=fd_method,
                    fd_oversample=fd_oversample,
                    fd_power_iters=fd_power_iters, seed=seed)
  return engine.preconditioner_transform(
      precond, block_size=block_size, max_precond_dim=max_precond_dim,
      statistics_every=statistics_every,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
