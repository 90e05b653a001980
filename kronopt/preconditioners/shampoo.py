"""Shampoo (Gupta, Koren & Singer 2018; Anil et al. 2020) -- docs/algorithms.md §1.

Per block ``G`` (an order-k tensor) and preconditioned axis i:

    statistic   L_i ← β₂ L_i + (1−β₂) G_(i) G_(i)ᵀ     (β₂ = 1: plain sum)
    root        P_i = L_i^{-1/p},  p = 2k by default    (every refresh)
    direction   D = G ×_1 P_1 ×_2 … ×_k P_k             (D = P_L G P_R for k = 2)

Statistics start at 0 (damping comes from ε relative to λ_max) and roots at
``I``. ``one_sided`` preconditions only the smallest axis of each block.

Shampoo² (Morwani et al., "A New Perspective on Shampoo's Preconditioner",
2024; ALGORITHMS §3) is the same with ``exponent_multiplier=2``: ``p = k``,
``D = L^{-1/2} G R^{-1/2}`` for matrices. With ``kronecker_power_iterations``
each statistic is one online power-iteration step towards the optimal
Kronecker approximation of ``E[g gᵀ]``: the other modes are contracted with
their current normalised statistics ``L̄_j = d_j L_j / tr(L_j)`` (``I`` while
``tr(L_j) = 0``), e.g. ``L ← β₂ L + (1−β₂) G R̄ Gᵀ``,
``R ← β₂ R + (1−β₂) Gᵀ L̄ G``.
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


class ShampooGroupState(NamedTuple):
  """Per group of ``N`` stacked blocks, per preconditioned axis i.

  Attributes:
    stats: tuple of ``[N, d_i, d_i]`` statistics ``L_i``.
    roots: tuple of ``[N, d_i, d_i]`` inverse roots ``P_i``.
    bases: with ``root_method="qr"``, tuple of ``[N, d_i, d_i]`` eigenbases
      of ``L_i`` kept between refreshes; else ``()``.
  """
  stats: tuple
  roots: tuple
  bases: tuple = ()


def statistics_weight(b2):
  """The weight of the new outer product: ``1 − β₂``, or 1 when ``β₂ = 1``."""
  return jnp.where(b2 == 1.0, 1.0, 1.0 - b2)


def preconditioned_axes(block_shape, one_sided: bool, axes=None
                        ) -> tuple[int, ...]:
  """The eligible ``axes`` of a block (default all), or only the smallest of
  them (``one_sided``)."""
  axes = tuple(range(len(block_shape))) if axes is None else tuple(axes)
  if not one_sided:
    return axes
  return (min(axes, key=lambda i: block_shape[i]),)


def context_axes(ctx, block_shape) -> tuple[int, ...]:
  """The eligible axes a :class:`kronopt.engine.GroupContext` names, or all
  axes without one (an algorithm used outside the engine)."""
  return tuple(range(len(block_shape))) if ctx is None else ctx.axes


def default_exponent(num_axes: int) -> float:
  """Shampoo's ``−1/(2k)`` for ``k`` preconditioned axes."""
  return -1.0 / (2 * num_axes)


def normalized_statistic(s):
  """``L̄ = d·L/tr(L)`` per block, or ``I`` while ``tr(L) = 0``.

  ``d`` counts the dimensions the statistic has seen
  (:func:`kronopt.linalg.roots.mean_eigenvalue`), so zero padding does not
  change the scale of ``L̄``.
  """
  mean = roots_lib.mean_eigenvalue(s)[..., None, None]
  eye = jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=s.dtype), s.shape)
  return jnp.where(mean > 0, s / jnp.where(mean > 0, mean, 1.0), eye)


def unit_scaled(s):
  """``(S/c, c)`` per block, ``c = max|S|`` (1 for a zero block).

  Roots and eigenbases are computed on statistics of unit scale: the
  Frobenius norms, power iterations and Newton iterates inside them then
  neither overflow nor underflow in float32 (statistics of 1e-60 and of
  1e38 alike), and every quantity the guard sees (relative residuals,
  off-diagonal masses) is unchanged by the scale.
  """
  c = jnp.max(jnp.abs(s), axis=(-2, -1))
  c = jnp.where(c > 0, c, 1.0)
  return s / c[..., None, None], c


@dataclasses.dataclass(frozen=True)
class Shampoo:
  """Shampoo on the engine (see :func:`kronopt.scale_by_shampoo`)."""
  b2: Any = 0.999
  epsilon: Any = 1e-6
  exponent: Optional[Any] = None
  relative_epsilon: Any = True
  root_method: str = "eigh"
  one_sided: bool = False
  newton_max_iters: int = 100
  newton_tol: float = 1e-6
  exponent_multiplier: Any = 1.0
  kronecker_power_iterations: bool = False
  epsilon_relative_to: str = "max"
  qr_tolerance: Any = 0.01
  qr_iterations: Any = 1
  qr_fallback: Any = 0.1

  def axes(self, block_shape, ctx=None):
    return preconditioned_axes(block_shape, self.one_sided,
                               context_axes(ctx, block_shape))

  def power(self, num_axes: int) -> Any:
    """``p`` of the root ``L^{-1/p}``."""
    exponent = (default_exponent(num_axes) * self.exponent_multiplier
                if self.exponent is None else self.exponent)
    return -1.0 / exponent

  def init_group(self, block_shape, n, axes=None):
    axes = preconditioned_axes(block_shape, self.one_sided, axes)
    dims = [block_shape[i] for i in axes]
    zeros = tuple(jnp.zeros((n, d, d), jnp.float32) for d in dims)
    eyes = tuple(jnp.broadcast_to(jnp.eye(d, dtype=jnp.float32), (n, d, d))
                 for d in dims)
    bases = eyes if self.root_method == "qr" else ()
    return ShampooGroupState(stats=zeros, roots=eyes, bases=bases)

  def update_statistics(self, state, g, ctx=None):
    w = statistics_weight(self.b2)
    stats = tuple(self.b2 * s + w * m
                  for s, m in zip(state.stats, self.grams(state, g, ctx)))
    return state._replace(stats=stats)

  def grams(self, state, g, ctx=None):
    """Per preconditioned axis, the outer product added to its statistic."""
    axes = self.axes(g.shape[1:], ctx)
    if not self.kronecker_power_iterations:
      return [kronecker.mode_gram(g, axis) for axis in axes]
    weights = dict(zip(axes, map(normalized_statistic, state.stats)))
    return [roots_lib.symmetrize(kronecker.weighted_mode_gram(g, axis, weights))
            for axis in axes]

  def _unit(self, s, p):
    """``(S/c, ε', c^{-1/p})`` (:func:`unit_scaled`): ``(S + δI)^{-1/p} =
    c^{-1/p} (S/c + δ/c I)^{-1/p}``, where relative damping is unchanged by
    the scale and absolute damping becomes ``ε/c``."""
    unit, c = unit_scaled(s)
    eps = jnp.where(self.relative_epsilon, self.epsilon, self.epsilon / c)
    return unit, eps, (c ** (-1.0 / p))[..., None, None]

  def refresh(self, state, ctx=None):
    del ctx
    p = self.power(len(state.stats))
    if self.root_method == "qr":
      return self._refresh_qr(state, p)
    if self.root_method == "newton":
      p = int(round(p))
    new_roots, residuals = [], []
    for s in state.stats:
      unit, eps, scale = self._unit(s, p)
      root, res = roots_lib.inverse_root(
          unit, p, method=self.root_method, epsilon=eps,
          relative_epsilon=self.relative_epsilon,
          relative_to=self.epsilon_relative_to, **self._newton_kwargs())
      new_roots.append(root * scale)
      residuals.append(res)
    residual = jnp.max(jnp.stack(residuals), axis=0)
    return state._replace(roots=tuple(new_roots)), residual

  def _refresh_qr(self, state, p):
    """Roots from the warm-started eigenbases (docs/algorithms.md §0)."""
    roots, bases, masses = [], [], []
    for s, q in zip(state.stats, state.bases):
      unit, eps, scale = self._unit(s, p)
      root, basis, mass = roots_lib.inverse_root_qr(
          unit, q, p, epsilon=eps, relative_epsilon=self.relative_epsilon,
          relative_to=self.epsilon_relative_to, tolerance=self.qr_tolerance,
          iterations=self.qr_iterations, fallback=self.qr_fallback)
      roots.append(root * scale)
      bases.append(basis)
      masses.append(mass)
    residual = jnp.max(jnp.stack(masses), axis=0)
    return state._replace(roots=tuple(roots), bases=tuple(bases)), residual

  def _newton_kwargs(self):
    if self.root_method != "newton":
      return {}
    return dict(max_iters=self.newton_max_iters, tol=self.newton_tol)

  def precondition(self, state, g, ctx=None):
    return kronecker.kron_apply(
        g, dict(zip(self.axes(g.shape[1:], ctx), state.roots)))


def check_root_args(*, b2, epsilon, exponent, root_method, newton_max_iters,
                    newton_tol, qr_tolerance=0.01, qr_iterations=1,
                    relative_epsilon=True):
  """Validation shared by the Shampoo-family transforms.

  ``epsilon`` must be positive with relative and with absolute damping
  alike: the statistics start at 0 and padded or rank-deficient blocks keep
  zero eigenvalues, whose undamped inverse root is infinite (every such
  refresh would be rejected by the guard).
  """
  checks.check_int("newton_max_iters", newton_max_iters, low=1)
  checks.check_number("newton_tol", newton_tol, low=0.0, low_open=True)
  checks.check_number("qr_tolerance", qr_tolerance, low=0.0, high=1.0)
  checks.check_int("qr_iterations", qr_iterations, low=1, high=100)
  checks.check_number("b2", b2, low=0.0, high=1.0, low_open=True)
  checks.check_number("epsilon", epsilon, low=0.0, low_open=True)
  checks.check_bool("relative_epsilon", relative_epsilon)
  checks.check_number("exponent", exponent, low=-1.0, high=0.0,
                      high_open=True, allow_none=True)
  checks.check_choice("root_method", root_method, ROOT_METHODS)
  if root_method == "newton" and exponent is not None:
    p = -1.0 / float(exponent)
    if abs(p - round(p)) > 1e-6:
      raise ValueError(
          f"exponent={exponent!r} with root_method='newton' must be -1/p for "
          "an integer p; use root_method='eigh' for other exponents.")


ROOT_METHODS = ("eigh", "newton", "qr")


def check_power_args(*, exponent, exponent_multiplier,
                     kronecker_power_iterations, root_method):
  """Validation of the Shampoo² options of :func:`scale_by_shampoo`."""
  checks.check_number("exponent_multiplier", exponent_multiplier, low=0.0,
                      high=2.0, low_open=True)
  checks.check_bool("kronecker_power_iterations", kronecker_power_iterations)
  if isinstance(exponent_multiplier, jax.core.Tracer):
    return
  if exponent is not None and exponent_multiplier != 1.0:
    raise ValueError(
        f"exponent_multiplier={exponent_multiplier!r} scales the default "
        "exponent -1/(2k) and cannot be combined with exponent="
        f"{exponent!r}; expected exponent_multiplier=1.0 or exponent=None.")
  if root_method == "newton":
    p = 2.0 / float(exponent_multiplier)
    if abs(p - round(p)) > 1e-6:
      raise ValueError(
          f"exponent_multiplier={exponent_multiplier!r} with root_method="
          "'newton' must be 2/q for an integer q (so that -1/p is an integer "
          "root); use root_method='eigh' for other multipliers.")


def scale_by_shampoo(
    *,
    block_size: int = 1024,
    b2: float = 0.999,
    epsilon: float = 1e-6,
    exponent: Optional[float] = None,
    precondition_every: int = 10,
    start_preconditioning_step: int = 10,
    root_method: str = "eigh",
    one_sided: bool = False,
    relative_epsilon: bool = True,
    inverse_failure_threshold: float = 0.1,
    newton_max_iters: int = 100,
    newton_tol: float = 1e-6,
    exponent_multiplier: float = 1.0,
    kronecker_power_iterations: bool = False,
    qr_tolerance: float = 0.01,
    qr_iterations: int = 1,
    statistics_every: int = 1,
    staggered_refresh: bool = False,
    max_precond_dim: Optional[int] = None,
    shard_axis: Optional[Any] = None,
    mesh: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo's preconditioned direction ``D = P_L G P_R`` (ALGORITHMS §1).

  Gupta, Koren & Singer, "Shampoo: Preconditioned stochastic tensor
  optimization", ICML 2018; Anil et al., "Scalable second order optimization
  for deep learning", 2020. Usually wrapped in :func:`kronopt.graft`.

  Args:
    block_size: largest block dimension; larger dimensions are split.
    b2: statistics EMA decay ``β₂`` in ``(0, 1]``; 1 is a plain sum.
    epsilon: damping ``ε > 0``; relative to λ_max unless
      ``relative_epsilon`` is False, in which case it is the papers' absolute
      ``A + εI``.
    exponent: root exponent ``−1/p`` per factor; ``None`` is ``−1/(2k)`` for
      ``k`` preconditioned axes.
    precondition_every: steps between root refreshes.
    start_preconditioning_step: first step preconditioned.
    root_method: ``"eigh"``, ``"newton"`` (coupled Newton, matmul only) or
      ``"qr"`` (warm-started eigenbases: power + QR steps from the previous
      basis, eigh on the first refresh or when the basis is too far off;
      docs/algorithms.md §0).
    one_sided: precondition only the smallest axis of each block.
    relative_epsilon: damping relative to λ_max (default) or absolute.
    inverse_failure_threshold: largest residual a refreshed root may have.
    newton_max_iters: iteration cap of the coupled Newton method.
    newton_tol: convergence tolerance on ``max|M − I|`` for Newton.
    exponent_multiplier: multiplies the default exponent ``−1/(2k)``, in
      ``(0, 2]``; 2 is Shampoo² (``−1/k``, Morwani et al. 2024, ALGORITHMS §3).
    kronecker_power_iterations: accumulate each statistic with the other
      modes weighted by their normalised statistics (an online power
      iteration towards the optimal Kronecker approximation, ALGORITHMS §3),
      ``L ← β₂ L + (1−β₂) G R̄ Gᵀ``; the first step equals Shampoo's.
    qr_tolerance: with ``root_method="qr"``, the relative off-diagonal mass
      of ``QᵀLQ`` below which the basis is kept without a QR step.
    qr_iterations: with ``root_method="qr"``, the most power + QR steps per
      refresh; a basis still off by more than ``inverse_failure_threshold``
      after them is replaced by an eigh.
    statistics_every: update the statistics every this many steps (as
      distributed Shampoo's ``statistics_compute_steps``).
    staggered_refresh: spread each refresh over the steps of its period, a
      ``1/precondition_every`` share of the blocks per step (see
      :func:`kronopt.engine.preconditioner_transform`).
    max_precond_dim: dimensions larger than this get no factor (e.g. the
      vocabulary axis of an embedding); ``None`` preconditions all.
    shard_axis: mesh axis name (or tuple) to shard the stacked blocks over;
      ``None`` does not shard (see :mod:`kronopt.sharding`).
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`kronopt.PreconditionerState` of :class:`ShampooGroupState` groups.
  """
  check_root_args(b2=b2, epsilon=epsilon, exponent=exponent,
                  root_method=root_method, newton_max_iters=newton_max_iters,
                  newton_tol=newton_tol, qr_tolerance=qr_tolerance,
                  qr_iterations=qr_iterations,
                  relative_epsilon=relative_epsilon)
  checks.check_bool("one_sided", one_sided)
  check_power_args(exponent=exponent, exponent_multiplier=exponent_multiplier,
                   kronecker_power_iterations=kronecker_power_iterations,
                   root_method=root_method)
  precond = Shampoo(
      b2=b2, epsilon=epsilon, exponent=exponent,
      relative_epsilon=relative_epsilon, root_method=root_method,
      one_sided=one_sided, newton_max_iters=newton_max_iters,
      newton_tol=newton_tol, exponent_multiplier=exponent_multiplier,
      kronecker_power_iterations=kronecker_power_iterations,
      qr_tolerance=qr_tolerance, qr_iterations=qr_iterations,
      qr_fallback=inverse_failure_threshold)
  return engine.preconditioner_transform(
      precond, block_size=block_size, max_precond_dim=max_precond_dim,
      precondition_every=precondition_every,
      statistics_every=statistics_every, staggered_refresh=staggered_refresh,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)
