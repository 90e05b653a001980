"""KrADagrad★ and KrADagrad (Mei et al. 2023) -- ALGORITHMS.md §2.

Mei et al., "KrADagrad: Kronecker Approximation-Domination Gradient
Preconditioned Stochastic Optimization", 2023 (shared/seeds/000).

Inverse-free Shampoo: per block ``G`` (an order-k tensor) and axis i the state
holds ``X_i ≈ (statistic_i)^{-1}`` itself, so only *positive* matrix powers are
ever taken and float32 is enough. Each statistics update is an
*approximation-domination* step: for ``M ⪰ 0`` and ``c ≥ λ_max(XM)``,

    X' = X − X M X / (1 + c)   satisfies   (X⁻¹ + M)⁻¹ ⪯ X' ⪯ X,  X' ≻ 0,

a rank-free, inverse-free replacement of Woodbury's exact
``(X⁻¹ + M)⁻¹`` that can never lose positive definiteness.

``variant="star"`` (KrADagrad★, the variant of the paper's experiments), every
step and every axis i of the block (``d_i`` its size):

    X_i ← X_i / β₂  (β₂ < 1);  M = G_(i) G_(i)ᵀ;  c = tr(M X_i)
    X_i ← sym(X_i − X_i M X_i / (d_i (1 + c)))         X_i init (1/ε) I
    refresh:    P_i = (X_i + 10⁻⁸ I)^{1/(2k)}          P_i init I
    direction:  D = G ×_1 P_1 ×_2 … ×_k P_k            (P_L G P_R for k = 2)

``variant="single_axis"`` (KrADagrad), one axis i per step, chosen by
:func:`single_axis_schedule`:

    Ĝ = G ×_{j≠i} P_j  (P_j = X_j^{1/2}, the stored roots);  M = Ĝ_(i) Ĝ_(i)ᵀ
    X_i ← X_i / β₂ (β₂ < 1);  X_i ← X_i − ε X_i X_iᵀ
    X_i ← sym(X_i − X_i M X_i / (1 + ‖X_i M‖_F))       X_i init I
    refresh:    P_i = (X_i + 10⁻⁸ I)^{1/2};  direction D = G ×_i P_i

so that ``⊗_i P_i ≈ Σ^{-1/2}``, full-matrix AdaGrad's preconditioner.

Cost per block of ``n`` entries, *every step*: ``2n Σ_i d_i`` flops for the
Gram matrices (as Shampoo) plus ``4 Σ_i d_i³`` for the two ``d_i×d_i``
products per axis (KrADagrad: one axis, plus the mode products of ``Ĝ``).
For a square ``b×b`` block that is ``12b³``, three times Shampoo's
statistics; for a thin ``b×r`` block the ``b³`` term dominates
(``≈ b/(2r)`` times Shampoo): keep ``block_size`` moderate. With ``β₂ < 1``, ``X`` grows by ``1/β₂`` per
step along directions that receive no gradient (zero padding included) and
overflows float32 after about ``ln(3·10³⁸ ε)/(−ln β₂)`` steps; ``β₂ = 1``
(AdaGrad, the paper's choice) is the default.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from kronopt import checks
from kronopt import engine
from kronopt.linalg import kronecker
from kronopt.linalg import roots as roots_lib
from kronopt.preconditioners import shampoo

VARIANTS = ("star", "single_axis")
ROOT_DAMPING = 1e-8  # added to X before its positive root (ALGORITHMS §2)


class KradagradGroupState(NamedTuple):
  """Per group of ``N`` stacked blocks, per axis i.

  Attributes:
    inverses: tuple of ``[N, d_i, d_i]`` matrices ``X_i`` (inverse statistics).
    roots: tuple of ``[N, d_i, d_i]`` positive roots ``P_i`` of ``X_i``.
  """
  inverses: tuple
  roots: tuple


def _bmm(a, b):
  return jnp.matmul(a, b, precision=roots_lib.HIGHEST)


def _per_block(v):
  """``[N]`` -> ``[N, 1, 1]`` for broadcasting against ``[N, d, d]``."""
  return v[:, None, None]


def _undo_decay(x, b2):
  """``X ← X/β₂`` when ``β₂ < 1``: the inverse of ``L ← β₂ L``."""
  return jnp.where(b2 < 1.0, x / b2, x)


def star_step(x, m, b2=1.0):
  """KrADagrad★'s update of a stack ``X`` (``[N, d, d]``) with ``M ⪰ 0``.

  ``X ← X/β₂`` (β₂ < 1); ``c = tr(M X)``;
  ``X ← sym(X − X M X / (d (1 + c)))``. Since ``c ≥ λ_max(XM)``, the result
  satisfies ``(X⁻¹ + M)⁻¹ ⪯ X' ⪯ X`` (for β₂ = 1).
  """
  x = _undo_decay(x, b2)
  c = jnp.einsum("nij,nji->n", m, x, precision=roots_lib.HIGHEST)
  xmx = _bmm(_bmm(x, m), x)
  x = x - xmx / _per_block(x.shape[-1] * (1.0 + c))
  return roots_lib.symmetrize(x)


def single_axis_step(x, m, b2=1.0, epsilon=0.0):
  """KrADagrad's update of a stack ``X`` (``[N, d, d]``) with ``M ⪰ 0``.

  ``X ← X/β₂`` (β₂ < 1); ``X ← X − ε X Xᵀ``;
  ``X ← sym(X − X M X / (1 + ‖X M‖_F))``. Since ``‖XM‖_F ≥ λ_max(XM)``, the
  last step satisfies ``(X⁻¹ + M)⁻¹ ⪯ X' ⪯ X``, with equality
  (Sherman–Morrison) for ``M = v vᵀ`` and ``v`` an eigenvector of ``X``.
  """
  x = _undo_decay(x, b2)
  x = x - epsilon * _bmm(x, jnp.swapaxes(x, -1, -2))
  xm = _bmm(x, m)
  norm = jnp.sqrt(jnp.sum(jnp.square(xm), axis=(-2, -1)))
  x = x - _bmm(xm, x) / _per_block(1.0 + norm)
  return roots_lib.symmetrize(x)


def isqrt(s):
  """``⌊√s⌋`` of a non-negative int32 array, exact (no int32 overflow)."""
  q = jnp.floor(jnp.sqrt(s.astype(jnp.float32))).astype(s.dtype)
  q = jnp.where(s // (q + 1) >= q + 1, q + 1, q)
  return jnp.where((q > 0) & (s // jnp.maximum(q, 1) < q), q - 1, q)


def single_axis_schedule(count, block_shape):
  """The axis KrADagrad updates at step ``s = count`` (ALGORITHMS §2).

  For ``s < k²``, axis ``s mod k``; afterwards, with ``q = ⌊√s⌋`` and
  ``e = s − q²``, axis ``e`` if ``e < k``, else the largest axis (the first
  one on ties). Every axis is thus visited ``O(√s)`` times and the largest
  axis all the other steps.
  """
  k = len(block_shape)
  largest = max(range(k), key=lambda i: (block_shape[i], -i))
  s = jnp.asarray(count, jnp.int32)
  q = isqrt(s)
  e = s - q * q
  late = jnp.where(e < k, e, largest)
  return jnp.where(s < k * k, s % k, late)


@dataclasses.dataclass(frozen=True)
class Kradagrad:
  """KrADagrad★ / KrADagrad on the engine (see :func:`scale_by_kradagrad`)."""
  variant: str = "star"
  b2: Any = 1.0
  epsilon: Any = 1e-6

  def root_power(self, order: int) -> float:
    """``1/(2k)`` for KrADagrad★ (Shampoo's exponent), ``1/2`` otherwise."""
    return 1.0 / (2 * order) if self.variant == "star" else 0.5

  def init_group(self, block_shape, n, axes=None):
    axes = shampoo.preconditioned_axes(block_shape, False, axes)
    scale = 1.0 / self.epsilon if self.variant == "star" else 1.0
    eyes = [jnp.broadcast_to(jnp.eye(block_shape[i], dtype=jnp.float32),
                             (n, block_shape[i], block_shape[i]))
            for i in axes]
    return KradagradGroupState(inverses=tuple(scale * e for e in eyes),
                               roots=tuple(eyes))

  def update_statistics(self, state, g, ctx=None):
    axes = shampoo.context_axes(ctx, g.shape[1:])
    if self.variant == "star":
      inverses = tuple(
          star_step(x, kronecker.mode_gram(g, i), self.b2)
          for i, x in zip(axes, state.inverses))
      return state._replace(inverses=inverses)
    count = 0 if ctx is None else ctx.count
    chosen = single_axis_schedule(count, [g.shape[1 + i] for i in axes])
    branches = [lambda st, k=k: self._single_axis_update(st, g, axes, k)
                for k in range(len(state.inverses))]
    return jax.lax.switch(chosen, branches, state)

  def _single_axis_update(self, state, g, axes, k):
    """Updates ``X`` of ``axes[k]``, the others' roots applied to ``g``."""
    others = {a: p for j, (a, p) in enumerate(zip(axes, state.roots))
              if j != k}
    m = kronecker.mode_gram(kronecker.kron_apply(g, others), axes[k])
    x = single_axis_step(state.inverses[k], m, self.b2, self.epsilon)
    inverses = state.inverses[:k] + (x,) + state.inverses[k + 1:]
    return state._replace(inverses=inverses)

  def refresh(self, state, ctx=None):
    del ctx
    power = self.root_power(len(state.inverses))
    results = [roots_lib.matrix_power_eigh(
        x, power, epsilon=ROOT_DAMPING, relative_epsilon=False)
               for x in state.inverses]
    new_roots = tuple(r[0] for r in results)
    residual = jnp.max(jnp.stack([r[3] for r in results]), axis=0)
    return state._replace(roots=new_roots), residual

  def precondition(self, state, g, ctx=None):
    axes = shampoo.context_axes(ctx, g.shape[1:])
    return kronecker.kron_apply(g, dict(zip(axes, state.roots)))


def scale_by_kradagrad(
    *,
    variant: str = "star",
    block_size: int = 256,
    b2: float = 1.0,
    epsilon: float = 1e-6,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    inverse_failure_threshold: float = 0.1,
    statistics_every: int = 1,
    max_precond_dim: Optional[int] = None,
    shard_axis: Optional[Any] = None,
    mesh: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """KrADagrad★ / KrADagrad's direction ``D = G ×_i P_i`` (ALGORITHMS §2).

  Mei et al., "KrADagrad: Kronecker Approximation-Domination Gradient
  Preconditioned Stochastic Optimization", 2023. Usually wrapped in
  :func:`kronopt.graft`.

  Args:
    variant: ``"star"`` (KrADagrad★: every axis every step, roots
      ``X^{1/(2k)}``) or ``"single_axis"`` (KrADagrad: one axis per step,
      roots ``X^{1/2}``).
    block_size: largest block dimension; larger dimensions are split. The
      statistics cost is cubic in it *every step*: keep it moderate.
    b2: statistics decay ``β₂`` in ``(0, 1]`` (``X ← X/β₂``); 1 is AdaGrad's
      plain sum.
    epsilon: ``ε``: ``X`` starts at ``(1/ε) I`` (star); ``X ← X − ε X Xᵀ``
      every step (single_axis, ``X`` starts at ``I``).
    precondition_every: steps between root refreshes.
    start_preconditioning_step: first step preconditioned.
    inverse_failure_threshold: largest eigh reconstruction error (relative to
      λ_max) a refreshed root may have.
    statistics_every: update the inverse statistics every this many steps.
    max_precond_dim: dimensions larger than this get no factor.
    shard_axis: mesh axis name (or tuple) to shard the stacked blocks over;
      ``None`` does not shard (see :mod:`kronopt.sharding`).
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`kronopt.PreconditionerState` of :class:`KradagradGroupState`
    groups.

  Raises:
    ValueError: for an argument out of its valid range.
  """
  checks.check_choice("variant", variant, VARIANTS)
  checks.check_number("b2", b2, low=0.0, high=1.0, low_open=True)
  if variant == "star":
    checks.check_number("epsilon", epsilon, low=0.0, low_open=True)
  else:  # X ⪯ I, so X − εX² stays positive definite for ε < 1
    checks.check_number("epsilon", epsilon, low=0.0, high=1.0, high_open=True)
  precond = Kradagrad(variant=variant, b2=b2, epsilon=epsilon)
  return engine.preconditioner_transform(
      precond, block_size=block_size, max_precond_dim=max_precond_dim,
      statistics_every=statistics_every,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
