"""CASPR (Duvvuri et al., ICLR 2024) -- docs/algorithms.md §4.

"Combining Axes Preconditioners through Kronecker Approximation for Deep
Learning". Shampoo's statistics and roots, combined by a Kronecker *sum*
instead of a product. Per block ``G`` (an order-k tensor) and axis i:

    statistic   L_i ← β₂ L_i + (1−β₂) G_(i) G_(i)ᵀ        (as Shampoo)
    root        P_i = (L_i + ε_r I)^{-1/(2k)},  ε_r = ε·tr(L_i)/d_i
    direction   vec D = ((1/k) Σ_i I⊗…⊗P_i⊗…⊗I)^k vec G

For a matrix, ``J = P_L G + G P_R`` and ``D = (P_L J + J P_R)/4``, i.e.
``vec D = ((P_L ⊕ P_R)/2)² g``. The direction is computed as ``k`` repeated
averages of mode products, never forming a Kronecker product. In the Loewner
order ``P_L⊗P_R ⪯ P_CASPR ⪯ √r S^{-1/2}`` (Shampoo below, full-matrix
Adagrad above; ``r`` the largest gradient rank).
"""

import dataclasses
from typing import Any, Optional

import optax

from kronopt import engine
from kronopt.linalg import kronecker
from kronopt.preconditioners import shampoo


@dataclasses.dataclass(frozen=True)
class Caspr(shampoo.Shampoo):
  """CASPR on the engine (see :func:`kronopt.scale_by_caspr`).

  Statistics, roots (``p = 2k``) and the refresh are Shampoo's; the damping
  is relative to the mean eigenvalue and the combination is a Kronecker sum.
  """
  epsilon_relative_to: str = "mean"

  def precondition(self, state, g, ctx=None):
    axes = self.axes(g.shape[1:], ctx)
    for _ in axes:
      g = kronecker_sum_average(g, dict(zip(axes, state.roots)))
    return g


def kronecker_sum_average(x, mats: dict):
  """``((1/k) Σ_i I⊗…⊗M_i⊗…⊗I) vec(G)``: the mean of the mode products."""
  products = [kronecker.mode_product(x, m, axis) for axis, m in mats.items()]
  return sum(products) / len(products)


def scale_by_caspr(
    *,
    block_size: int = 1024,
    b2: float = 0.999,
    epsilon: float = 1e-6,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    root_method: str = "eigh",
    relative_epsilon: bool = True,
    inverse_failure_threshold: float = 0.1,
    newton_max_iters: int = 100,
    newton_tol: float = 1e-6,
    qr_tolerance: float = 0.01,
    qr_iterations: int = 1,
    statistics_every: int = 1,
    staggered_refresh: bool = False,
    max_precond_dim: Optional[int] = None,
    shard_axis: Optional[Any] = None,
    mesh: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """CASPR's direction ``vec D = ((P_L ⊕ P_R)/2)² g`` (ALGORITHMS §4).

  Duvvuri, Devvrit, Anil, Hsieh & Dhillon, "Combining Axes Preconditioners
  through Kronecker Approximation for Deep Learning", ICLR 2024. Usually
  wrapped in :func:`kronopt.graft`.

  Args:
    block_size: largest block dimension; larger dimensions are split.
    b2: statistics EMA decay ``β₂`` in ``(0, 1]``; 1 is a plain sum.
    epsilon: damping ``ε > 0``; relative to the mean eigenvalue ``tr(L)/d`` of
      each statistic (``d`` counting the dimensions that have received
      gradient, so that padding does not change it) unless
      ``relative_epsilon`` is False, in which case it is the paper's
      absolute ``L + εI``.
    precondition_every: steps between root refreshes.
    start_preconditioning_step: first step preconditioned.
    root_method: ``"eigh"``, ``"newton"`` (coupled Newton, matmul only) or
      ``"qr"`` (warm-started eigenbases, see :func:`kronopt.scale_by_shampoo`).
    relative_epsilon: damping relative to the mean eigenvalue (default) or
      absolute.
    inverse_failure_threshold: largest residual a refreshed root may have.
    newton_max_iters: iteration cap of the coupled Newton method.
    newton_tol: convergence tolerance on ``max|M − I|`` for Newton.
    qr_tolerance: see :func:`kronopt.scale_by_shampoo`.
    qr_iterations: see :func:`kronopt.scale_by_shampoo`.
    statistics_every: update the statistics every this many steps.
    staggered_refresh: spread each refresh over the steps of its period
      (see :func:`kronopt.scale_by_shampoo`).
    max_precond_dim: dimensions larger than this get no factor.
    shard_axis: mesh axis name (or tuple) to shard the stacked blocks over;
      ``None`` does not shard (see :mod:`kronopt.sharding`).
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`kronopt.PreconditionerState` of :class:`ShampooGroupState` groups.
  """
  shampoo.check_root_args(b2=b2, epsilon=epsilon, exponent=None,
                          root_method=root_method,
                          newton_max_iters=newton_max_iters,
                          newton_tol=newton_tol, qr_tolerance=qr_tolerance,
                          qr_iterations=qr_iterations,
                          relative_epsilon=relative_epsilon)
  precond = Caspr(
      b2=b2, epsilon=epsilon, relative_epsilon=relative_epsilon,
      root_method=root_method, newton_max_iters=newton_max_iters,
      newton_tol=newton_tol, qr_tolerance=qr_tolerance,
      qr_iterations=qr_iterations, qr_fallback=inverse_failure_threshold)
  return engine.preconditioner_transform(
      precond, block_size=block_size, max_precond_dim=max_precond_dim,
      statistics_every=statistics_every, staggered_refresh=staggered_refresh,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
