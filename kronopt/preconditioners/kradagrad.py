"""KrADagrad★ and KrADagrad (Mei et al. 2023), docs/algorithms.md §2.

Mei, Moreno & Walters, "KrADagrad: Kronecker Approximation-Domination
Gradient Preconditioned Stochastic Optimization", UAI 2023.

Inverse-free Shampoo: per block ``G`` (an order-k tensor) and axis i the state
holds ``X_i ≈ (statistic_i)^{-1}`` itself, so only *positive* matrix powers are
ever taken and float32 is enough. Each statistics update is an
*approximation-domination* step: for ``M ⪰ 0`` and ``c ≥ λ_max(XM)``,

    X' = X − X M X / (1 + c)   satisfies   (X⁻¹ + M)⁻¹ ⪯ X' ⪯ X,  X' ≻ 0,

a rank-free, inverse-free replacement of Woodbury's exact
``(X⁻¹ + M)⁻¹`` that can never lose positive definiteness. With
``c = ‖MX‖_F`` it is Sherman–Morrison-exact for a rank-1 ``M`` along an
eigenvector of ``X``.

``variant="star"`` (KrADagrad★, the variant of the paper's experiments; the
authors' ``KradagradPP``), every step and every axis i of the block, with the
plain Gram ``M = G_(i) G_(i)ᵀ`` (not preconditioned along the other axes):

    X_i ← X_i / β₂  (β₂ < 1);   X_i ← X_i − δ X_i X_iᵀ
    X_i ← sym(X_i − X_i M X_i / (1 + ‖M X_i‖_F))      X_i init (1/ε) I
    refresh:    P_i = (X_i + 10⁻⁸ I)^{1/(2k)}          P_i init ε^{-1/(2k)} I
    direction:  D = G ×_1 P_1 ×_2 … ×_k P_k            (P_L G P_R for k = 2)

``ε`` plays the part of Shampoo's initial statistic ``εI`` and ``δ``
(``damping``) adds ``δI`` to the statistic every step (to first order); the
two are separate because ``X − δX²`` at ``X = I/ε`` is ``0`` for ``δ = ε``
(as in the authors' batched code path, which starts ``X`` at ``I/ε`` and
damps with the same ``ε``), so ``δ < ε``. With
``star_update="trace"`` the step is instead the authors' serial code path
(their ``KrADPreconditioner.add_statistics``, which their synthetic notebook
ran): ``X_i ← sym(X_i − X_i M X_i / (d_i (1 + tr(M X_i))))``, no damping step.
It dominates too, but shrinks ``X`` by at most ``1 − 1/d_i`` per step.

``variant="single_axis"`` (KrADagrad, the authors' ``KradagradMM``), one axis
i per step, chosen by :func:`single_axis_schedule`:

    Ĝ = G ×_{j≠i} P_j  (P_j = X_j^{1/2}, the stored roots);  M = Ĝ_(i) Ĝ_(i)ᵀ
    X_i ← X_i / β₂ (β₂ < 1);  X_i ← X_i − ε X_i X_iᵀ
    X_i ← sym(X_i − X_i M X_i / (1 + ‖M X_i‖_F))       X_i init I
    refresh:    P_i = (X_i + 10⁻⁸ I)^{1/2};  direction D = G ×_i P_i

so that ``⊗_i P_i ≈ Σ^{-1/2}``, full-matrix AdaGrad's preconditioner.

Boundedness with ``β₂ < 1``: along a direction no gradient reaches (zero
padding included) an eigenvalue ``x`` of ``X`` evolves as
``x ← x/β₂ − δ (x/β₂)²``, which for ``β₂ ≥ 2/3`` and ``δ x₀ ≤ β₂²/2`` stays in
``(0, β₂²/(2δ)]`` and tends to ``β₂(1 − β₂)/δ`` (the inverse of the
stationary statistic); the gradient step only lowers ``X``. Without the
damping step ``X`` grows as ``β₂⁻ᵗ`` and overflows float32, so ``β₂ < 1``
requires ``δ > 0`` (ε for KrADagrad) and is refused for
``star_update="trace"``.

Cost per block of ``n`` entries, *every step*: ``2n Σ_i d_i`` flops for the
Gram matrices (as Shampoo) plus ``4 Σ_i d_i³`` for the two ``d_i×d_i``
products per axis (``6 Σ_i d_i³`` with the damping step; KrADagrad: one
axis, plus the mode products of ``Ĝ``). For a square ``b×b`` block that is
three (four) times Shampoo's statistics; for a thin ``b×r`` block the ``b³``
term dominates: keep ``block_size`` moderate.
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
STAR_UPDATES = ("frobenius", "trace")
ROOT_DAMPING = 1e-8  # added to X before its positive root (docs §2)
MIN_DECAY = 2.0 / 3.0  # smallest β₂ < 1 for which the damped X is bounded


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


def krad_step(x, m, b2=1.0, damping=0.0):
  """The KrAD update of a stack ``X`` (``[N, d, d]``) with ``M ⪰ 0``.

  ``X ← X/β₂`` (β₂ < 1); ``X ← X − δ X Xᵀ``;
  ``X ← sym(X − X M X / (1 + ‖M X‖_F))``. Since ``‖MX‖_F ≥ λ_max(XM)``,
  the last step satisfies ``(X⁻¹ + M)⁻¹ ⪯ X' ⪯ X``, with equality
  (Sherman–Morrison) for ``M = v vᵀ`` and ``v`` an eigenvector of ``X``.
  KrADagrad★'s step (``δ`` = ``damping``) and KrADagrad's (``δ`` = ``ε``).
  """
  x = _undo_decay(x, b2)
  if not (isinstance(damping, (int, float)) and damping == 0):
    x = x - damping * _bmm(x, jnp.swapaxes(x, -1, -2))
  mx = _bmm(m, x)
  norm = jnp.sqrt(jnp.sum(jnp.square(mx), axis=(-2, -1)))
  x = x - _bmm(x, mx) / _per_block(1.0 + norm)
  return roots_lib.symmetrize(x)


def trace_step(x, m):
  """KrADagrad★'s step of the authors' serial code path (``X`` ``[N, d, d]``).

  ``c = tr(M X)``; ``X ← sym(X − X M X / (d (1 + c)))``. Since
  ``c ≥ λ_max(XM)``, it satisfies ``(X⁻¹ + M)⁻¹ ⪯ X' ⪯ X``; the ``1/d``
  factor makes it shrink ``X`` by at most ``1 − 1/d`` per step.
  """
  c = jnp.einsum("nij,nji->n", m, x, precision=roots_lib.HIGHEST)
  xmx = _bmm(_bmm(x, m), x)
  x = x - xmx / _per_block(x.shape[-1] * (1.0 + c))
  return roots_lib.symmetrize(x)


def isqrt(s):
  """``⌊√s⌋`` of a non-negative int32 array, exact (no int32 overflow)."""
  q = jnp.floor(jnp.sqrt(s.astype(jnp.float32))).astype(s.dtype)
  q = jnp.where(s // (q + 1) >= q + 1, q + 1, q)
  return jnp.where((q > 0) & (s // jnp.maximum(q, 1) < q), q - 1, q)


def single_axis_schedule(count, block_shape):
  """The axis KrADagrad updates at step ``s = count`` (docs §2).

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
  damping: Any = 0.0
  star_update: str = "frobenius"

  def root_power(self, order: int) -> float:
    """``1/(2k)`` for KrADagrad★ (Shampoo's exponent), ``1/2`` otherwise."""
    return 1.0 / (2 * order) if self.variant == "star" else 0.5

  def init_group(self, block_shape, n, axes=None):
    axes = shampoo.preconditioned_axes(block_shape, False, axes)
    x0 = 1.0 / self.epsilon if self.variant == "star" else 1.0
    p0 = x0 ** self.root_power(len(axes))
    eyes = [jnp.broadcast_to(jnp.eye(block_shape[i], dtype=jnp.float32),
                             (n, block_shape[i], block_shape[i]))
            for i in axes]
    return KradagradGroupState(inverses=tuple(x0 * e for e in eyes),
                               roots=tuple(p0 * e for e in eyes))

  def update_statistics(self, state, g, ctx=None):
    axes = shampoo.context_axes(ctx, g.shape[1:])
    if self.variant == "star":
      if self.star_update == "trace":
        step = trace_step
      else:
        step = lambda x, m: krad_step(x, m, self.b2, self.damping)
      inverses = tuple(step(x, kronecker.mode_gram(g, i))
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
    x = krad_step(state.inverses[k], m, self.b2, self.epsilon)
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


def _known(value) -> Optional[float]:
  """``float(value)``, or ``None`` for a traced value (inject_hyperparams)."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return None
  return float(value)


def check_bounded(variant, star_update, b2, epsilon, damping):
  """The cross-argument ranges under which ``X`` stays positive definite
  and bounded (module docstring); traced values are let through."""
  b2_, eps_, damp_ = _known(b2), _known(epsilon), _known(damping)
  if variant == "star" and star_update == "trace":
    if damp_ is not None and damp_ != 0.0:
      raise ValueError(
          f"damping={damping!r} is not valid with star_update='trace' (the "
          "authors' serial step has no damping step); expected 0.")
    if b2_ is not None and b2_ < 1.0:
      raise ValueError(
          f"b2={b2!r} is out of range for star_update='trace'; expected 1: "
          "without a damping step X ← X/β₂ grows X as β₂⁻ᵗ along directions "
          "no gradient reaches until it overflows (use star_update="
          "'frobenius' with damping > 0).")
    return
  if variant == "star":
    name, value, delta = "damping", damping, damp_
    x0 = None if eps_ is None else 1.0 / eps_
  else:
    name, value, delta, x0 = "epsilon", epsilon, eps_, 1.0
  if b2_ is None or delta is None or x0 is None:
    return
  if b2_ < 1.0 and b2_ < MIN_DECAY:
    raise ValueError(
        f"b2={b2!r} is out of range; expected 1 or a value in "
        f"[{MIN_DECAY:.4g}, 1): for smaller β₂ the damped X ← X/β₂ "
        "oscillates and can lose positive definiteness.")
  if b2_ < 1.0 and not delta > 0.0:
    raise ValueError(
        f"{name}={value!r} is out of range for b2={b2!r} < 1; expected "
        f"{name} > 0: without it X ← X/β₂ grows X as β₂⁻ᵗ along directions "
        "no gradient reaches until it overflows.")
  high = b2_ ** 2 / (2.0 * x0) if b2_ < 1.0 else 1.0 / x0
  if delta > high or (b2_ == 1.0 and delta == high):
    bracket = "]" if b2_ < 1.0 else ")"
    raise ValueError(
        f"{name}={value!r} is out of range; expected a value in "
        f"[0, {high:.4g}{bracket} so that X − {name}·X² stays positive "
        f"(X starts at {x0:.4g}·I).")


def scale_by_kradagrad(
    *,
    variant: str = "star",
    block_size: int = 256,
    b2: float = 1.0,
    epsilon: float = 1e-6,
    damping: float = 0.0,
    star_update: str = "frobenius",
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    inverse_failure_threshold: float = 0.1,
    statistics_every: int = 1,
    max_precond_dim: Optional[int] = None,
    shard_axis: Optional[Any] = None,
    mesh: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """KrADagrad★ / KrADagrad's direction ``D = G ×_i P_i`` (docs §2).

  Mei, Moreno & Walters, "KrADagrad: Kronecker Approximation-Domination
  Gradient Preconditioned Stochastic Optimization", UAI 2023. Usually
  wrapped in :func:`kronopt.graft`.

  Args:
    variant: ``"star"`` (KrADagrad★: every axis every step, roots
      ``X^{1/(2k)}``) or ``"single_axis"`` (KrADagrad: one axis per step,
      roots ``X^{1/2}``).
    block_size: largest block dimension; larger dimensions are split. The
      statistics cost is cubic in it *every step*: keep it moderate.
    b2: statistics decay ``β₂`` (``X ← X/β₂``): 1 (AdaGrad's plain sum, the
      default and the paper's choice) or in ``[2/3, 1)``, which needs the
      damping step (``damping > 0``, or ``epsilon > 0`` for
      ``single_axis``) to keep ``X`` bounded.
    epsilon: ``ε``. KrADagrad★: ``X`` starts at ``(1/ε) I``, the inverse of
      Shampoo's initial statistic ``εI``. KrADagrad: ``X`` starts at ``I``
      and ``X ← X − ε X Xᵀ`` every step, ``ε`` in ``[0, 1)`` (``[0, β₂²/2]``
      for ``β₂ < 1``).
    damping: KrADagrad★'s ``δ`` of ``X ← X − δ X Xᵀ`` every step (``δI``
      added to the statistic, to first order), in ``[0, ε)`` (``[0,
      β₂²ε/2]`` for ``β₂ < 1``, where it must be positive). Only for
      ``variant="star"`` with ``star_update="frobenius"``.
    star_update: KrADagrad★'s step: ``"frobenius"`` (default,
      ``X − XMX/(1 + ‖MX‖_F)``, docs §2) or ``"trace"`` (the authors' serial
      code path, ``X − XMX/(d(1 + tr(MX)))``, β₂ = 1 only).
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
  checks.check_choice("star_update", star_update, STAR_UPDATES)
  checks.check_number("b2", b2, low=0.0, high=1.0, low_open=True)
  if variant == "star":
    checks.check_number("epsilon", epsilon, low=0.0, low_open=True)
    checks.check_number("damping", damping, low=0.0)
  else:
    checks.check_number("epsilon", epsilon, low=0.0, high=1.0, high_open=True)
    if _known(damping) not in (0.0, None):
      raise ValueError(
          f"damping={damping!r} is not valid for variant='single_axis' "
          "(its damping is epsilon); expected 0.")
    if star_update != "frobenius":
      raise ValueError(f"star_update={star_update!r} is not valid for "
                       "variant='single_axis'; expected 'frobenius'.")
  check_bounded(variant, star_update, b2, epsilon, damping)
  precond = Kradagrad(variant=variant, b2=b2, epsilon=epsilon,
                      damping=damping, star_update=star_update)
  return engine.preconditioner_transform(
      precond, block_size=block_size, max_precond_dim=max_precond_dim,
      statistics_every=statistics_every,
      precondition_every=precondition_every,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
