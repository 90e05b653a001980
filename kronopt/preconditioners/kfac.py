"""K-FAC with online eigendecompositions -- docs/algorithms.md §6.

K-FAC (Martens & Grosse, ICML 2015) preconditions each registered layer's
gradient block ``G`` (the kernel matricised by its semantic input/output
axes with the bias row appended, :mod:`kfac_layers`) by two Kronecker
factors, exponential averages of the layer statistics ``Â``, ``Γ̂``:

    A ← ρ A + (1−ρ) Â Âᵀ,   Γ ← ρ Γ + (1−ρ) Γ̂ Γ̂ᵀ     (every T_cov steps)
    V = (A + λ_A I)^{-1} G (Γ + λ_Γ I)^{-1},   λ_M = λ · max eig(M).

Each factor is kept as an eigendecomposition ``U diag(D) Uᵀ`` of rank ``r``
(:mod:`kronopt.linalg.lowrank`) and inverted with its spectrum continued at
the smallest kept eigenvalue. The ``method`` decides how the decomposition
follows the factor (Puiu, "Brand New K-FACs", arXiv 2210.08494; RS-KFAC,
arXiv 2206.15397):

* ``"eigh"`` -- exact K-FAC: the ``d×d`` EMA is kept and ``eigh``-ed every
  ``T_inv`` steps (``r = d``), ``O(d³)``.
* ``"rsvd"`` -- RS-KFAC: the EMA is kept; every ``T_inv`` steps a randomized
  EVD gives its top ``r`` eigenpairs.
* ``"brand"`` -- B-KFAC: the factor is never formed; every ``T_cov`` steps
  Brand's update folds ``B = √(1−ρ) Â`` into ``(U, D)``, linear in ``d``;
  every ``T_inv`` steps ``U`` is re-orthogonalised.
* ``"brand_rsvd"`` -- B-R-KFAC: Brand updates, and every
  ``rsvd_reset_every·T_inv`` steps a reset from an RSVD of the exact EMA
  (which is kept); the other refreshes re-orthogonalise.
* ``"brand_corrected"`` -- B-KFAC-c: Brand updates, and every ``T_inv``
  steps a random 20% of the ``r`` modes is Rayleigh–Ritz-corrected against
  the exact EMA (which is kept).

On the engine (:mod:`kronopt.engine`) a block is one layer, a group the
layers of equal block shape ``(d_a, d_g)``; the statistics are the engine's
auxiliary input (``kfac_stats``), ``statistics_every`` is ``T_cov`` and
``precondition_every`` is ``T_inv``. Randomness is
``fold_in(fold_in(fold_in(key(seed), count), block), factor)``.
"""

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronopt import checks
from kronopt import engine
from kronopt.linalg import lowrank
from kronopt.preconditioners import kfac_layers

METHODS = ("eigh", "rsvd", "brand", "brand_rsvd", "brand_corrected")
STATS_ARG = "kfac_stats"


class KFACFactorState(NamedTuple):
  """One Kronecker factor of each of the ``N`` blocks of a group.

  Attributes:
    ema: ``[N, d, d]`` the exact EMA (``None`` for ``"brand"``, which never
      forms it).
    decomposition: the :class:`kronopt.linalg.lowrank.LowRank`
      ``U [N, d, r]``, ``D [N, r]`` that is inverted.
  """
  ema: Optional[jax.Array]
  decomposition: lowrank.LowRank


class KFACGroupState(NamedTuple):
  """Per group of ``N`` stacked layers.

  Attributes:
    factors: ``(A, Γ)``: the :class:`KFACFactorState` of the input-side factor
      (block axis 0, ``d_a``) and of the output-side one (axis 1, ``d_g``).
  """
  factors: tuple


class KFACAux(NamedTuple):
  """The statistics of a group, stacked (the engine's auxiliary input).

  Attributes:
    a: ``[N, d_a, n]`` activations ``Â`` (zero columns pad ``n``).
    g: ``[N, d_g, n]`` output gradients ``Γ̂``.
    present: bool ``[N]``, whether the layer has statistics this step.
  """
  a: jax.Array
  g: jax.Array
  present: jax.Array


@dataclasses.dataclass(frozen=True)
class KFACLayout:
  """Registered layers → groups of ``[N, d_a, d_g]`` blocks (see engine).

  Attributes:
    treedef: tree structure of the parameters (``MaskedNode`` a leaf).
    flat: ``(key path, is MaskedNode)`` of every leaf.
    layers: the registered kernels (:class:`kfac_layers.ResolvedLayer`).
    slots: per layer, ``(group, index in the group)``.
    group_shapes: per group, ``(d_a, d_g)``.
    group_sizes: per group, the number of layers ``N``.
    group_axes: per group, the preconditioned block axes ``(0, 1)``.
  """
  treedef: Any
  flat: tuple
  layers: tuple
  slots: tuple
  group_shapes: tuple
  group_sizes: tuple
  group_axes: tuple

  def _members(self):
    members = [[] for _ in self.group_shapes]
    for layer, (group, _) in zip(self.layers, self.slots):
      members[group].append(layer)
    return members

  def block(self, tree) -> list:
    leaves = self.treedef.flatten_up_to(tree)
    return [jnp.stack([kfac_layers.to_block(
        layer, leaves[layer.kernel],
        None if layer.bias is None else leaves[layer.bias])
                       for layer in members])
            for members in self._members()]

  def unblock(self, groups, like):
    leaves = list(self.treedef.flatten_up_to(like))
    for layer, (group, i) in zip(self.layers, self.slots):
      bias_like = None if layer.bias is None else leaves[layer.bias]
      kernel, bias = kfac_layers.from_block(layer, groups[group][i],
                                            leaves[layer.kernel], bias_like)
      leaves[layer.kernel] = kernel
      if layer.bias is not None:
        leaves[layer.bias] = bias
    return self.treedef.unflatten(leaves)

  def real_sizes(self) -> list:
    return [tuple(np.full((n,), d, np.int32) for d in shape)
            for shape, n in zip(self.group_shapes, self.group_sizes)]

  def covered(self) -> tuple:
    flags = [False] * len(self.flat)
    for layer in self.layers:
      flags[layer.kernel] = True
      if layer.bias is not None:
        flags[layer.bias] = True
    return tuple(flags)

  def block_aux(self, extra_args) -> Optional[list]:
    """Per group a :class:`KFACAux` from ``extra_args["kfac_stats"]``."""
    if not self.layers:
      return None
    stats = kfac_layers.align_stats_flat(self.flat, self.layers,
                                         extra_args.get(STATS_ARG))
    out = []
    for group, (d_a, d_g) in enumerate(self.group_shapes):
      mine = [s for s, (g, _) in zip(stats, self.slots) if g == group]
      n = max([s.a.shape[1] for s in mine if s is not None], default=1)
      pad = lambda x: jnp.pad(x.astype(jnp.float32),
                              [(0, 0), (0, n - x.shape[1])])
      a = [jnp.zeros((d_a, n)) if s is None else pad(s.a) for s in mine]
      g = [jnp.zeros((d_g, n)) if s is None else pad(s.g) for s in mine]
      out.append(KFACAux(jnp.stack(a), jnp.stack(g),
                         jnp.asarray([s is not None for s in mine])))
    return out


def make_layout(tree, layers=None) -> KFACLayout:
  """The :class:`KFACLayout` of a parameter (or update) tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  resolved = tuple(kfac_layers.resolve(tree, layers))
  shapes, sizes, slots = [], [], []
  for layer in resolved:
    shape = (layer.d_a, layer.d_g)
    if shape not in shapes:
      shapes.append(shape)
      sizes.append(0)
    group = shapes.index(shape)
    slots.append((group, sizes[group]))
    sizes[group] += 1
  return KFACLayout(
      treedef=treedef,
      flat=tuple((kfac_layers.path_key(p), isinstance(x, optax.MaskedNode))
                 for p, x in flat),
      layers=resolved, slots=tuple(slots), group_shapes=tuple(shapes),
      group_sizes=tuple(sizes), group_axes=tuple((0, 1) for _ in shapes))


@dataclasses.dataclass(frozen=True)
class KFAC:
  """K-FAC on the engine (see :func:`kronopt.scale_by_kfac`)."""
  method: str = "brand"
  rank: int = 220
  damping: Any = 1e-3
  ema: Any = 0.95
  relative_damping: Any = True
  seed: int = 0
  oversample: int = 10
  power_iters: int = 3
  correction_fraction: float = 0.2
  rsvd_reset_every: int = 5
  inverse_every: int = 100
  start: int = 0

  @property
  def keeps_ema(self) -> bool:
    return self.method != "brand"

  @property
  def online(self) -> bool:
    return self.method.startswith("brand")

  def factor_rank(self, d: int) -> int:
    return d if self.method == "eigh" else lowrank.rank_for(d, self.rank)

  def init_group(self, block_shape, n, axes=(0, 1)):
    del axes
    factors = []
    for d in block_shape:
      ema = jnp.zeros((n, d, d), jnp.float32) if self.keeps_ema else None
      factors.append(KFACFactorState(ema, lowrank.init(n, d,
                                                   self.factor_rank(d))))
    return KFACGroupState(factors=tuple(factors))

  def update_statistics(self, state, g, ctx):
    """EMA and/or Brand update of both factors of the layers present."""
    del g
    aux = ctx.aux
    rho = jnp.asarray(self.ema, jnp.float32)
    factors = []
    for factor, cols in zip(state.factors, (aux.a, aux.g)):
      ema, dec = factor.ema, factor.decomposition
      if ema is not None:
        gram = jnp.matmul(cols, jnp.swapaxes(cols, -1, -2),
                          precision=jax.lax.Precision.HIGHEST)
        ema = jnp.where(aux.present[:, None, None],
                        rho * ema + (1.0 - rho) * gram, ema)
      if self.online:
        new = lowrank.brand_update(dec, jnp.sqrt(1.0 - rho) * cols, rho)
        dec = engine.tree_select(aux.present, new, dec)
      factors.append(KFACFactorState(ema, dec))
    return state._replace(factors=tuple(factors))

  def _keys(self, ctx, factor: int):
    base = jax.random.fold_in(jax.random.key(self.seed), ctx.count)
    return jax.vmap(lambda i: jax.random.fold_in(
        jax.random.fold_in(base, i), factor))(ctx.index)

  def _refresh_factor(self, factor: KFACFactorState, ctx, which: int):
    """The decomposition one factor gets at a refresh (module docstring)."""
    dec, ema = factor.decomposition, factor.ema
    rsvd = lambda: lowrank.randomized_eigh(
        ema, dec.values.shape[-1], self._keys(ctx, which),
        oversample=self.oversample, power_iters=self.power_iters)
    if self.method == "eigh":
      return lowrank.from_eigh(ema)
    if self.method == "rsvd":
      return rsvd()
    if self.method == "brand_rsvd":
      refreshes = (ctx.count - self.start) // self.inverse_every
      return jax.lax.cond(refreshes % self.rsvd_reset_every == 0,
                          lambda _: rsvd(),
                          lambda _: lowrank.reorthogonalize(dec), None)
    dec = lowrank.reorthogonalize(dec)
    if self.method == "brand_corrected":
      return lowrank.rayleigh_ritz(dec, ema, self._keys(ctx, which),
                                   fraction=self.correction_fraction)
    return dec

  def refresh(self, state, ctx):
    """New decompositions; the residual is their loss of orthonormality."""
    factors = tuple(
        KFACFactorState(f.ema, self._refresh_factor(f, ctx, i))
        for i, f in enumerate(state.factors))
    residual = jnp.max(jnp.stack([lowrank.orthogonality_error(
        f.decomposition) for f in factors]), axis=0)
    return state._replace(factors=factors), residual

  def precondition(self, state, g, ctx):
    """``V = (A + λ_A I)^{-1} G (Γ + λ_Γ I)^{-1}`` per block."""
    del ctx
    for axis, factor in enumerate(state.factors):
      g = lowrank.inverse_apply(factor.decomposition, g, axis,
                                damping=self.damping,
                                relative=self.relative_damping)
    return g


def _check_static_fraction(value):
  """``correction_fraction`` sets how many modes are corrected (a shape)."""
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    raise ValueError(
        f"correction_fraction={value!r} is not valid; expected a Python "
        "float in (0, 1]: it sets how many modes are corrected, so it cannot "
        "be an array (with optax.inject_hyperparams, list "
        "'correction_fraction' in static_args).")
  checks.check_number("correction_fraction", value, low=0.0, high=1.0,
                      low_open=True)


def _check_layers(layers):
  if layers is None:
    return
  bad = [x for x in jax.tree_util.tree_leaves(
      layers, is_leaf=lambda x: x is None or isinstance(
          x, kfac_layers.KFACLayer))
         if x is not None and not isinstance(x, kfac_layers.KFACLayer)]
  if bad:
    raise ValueError(
        f"layers has leaves {bad[:3]!r}; expected a tree aligned with the "
        "parameters with a kronopt KFACLayer at each registered kernel and "
        "None elsewhere (e.g. kronopt.flax.nnx.KFACCapture(model).layers).")


def scale_by_kfac(
    *,
    method: str = "brand",
    rank: int = 220,
    damping: float = 1e-3,
    ema: float = 0.95,
    cov_every: int = 10,
    inverse_every: int = 100,
    seed: int = 0,
    layers: Any = None,
    relative_damping: bool = True,
    start_preconditioning_step: int = 0,
    inverse_failure_threshold: float = 0.1,
    oversample: int = 10,
    power_iters: int = 3,
    correction_fraction: float = 0.2,
    rsvd_reset_every: int = 5,
    shard_axis: Optional[Any] = None,
    mesh: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """K-FAC's direction ``V = (A + λI)^{-1} G (Γ + λI)^{-1}`` (§6).

  Martens & Grosse, "Optimizing neural networks with Kronecker-factored
  approximate curvature", ICML 2015, with the factors' inverses kept by the
  online and randomized decompositions of Puiu, "Brand New K-FACs" (arXiv
  2210.08494) and "Randomized K-FACs" (arXiv 2206.15397). Usually wrapped
  in :func:`kronopt.graft` (see :func:`kronopt.kfac`).

  ``update`` needs the layer statistics as the keyword extra argument
  ``kfac_stats`` (a tree like the parameters with a
  :class:`kronopt.KFACStats` per registered kernel, ``None`` elsewhere),
  produced in the same pass as the gradient by :mod:`kronopt.flax`.
  Parameters that no registered layer covers are passed through (the graft
  gives them its AdamW step).

  Args:
    method: ``"eigh"`` (exact K-FAC), ``"rsvd"`` (RS-KFAC), ``"brand"``
      (B-KFAC), ``"brand_rsvd"`` (B-R-KFAC) or ``"brand_corrected"``
      (B-KFAC-c); see the module docstring.
    rank: kept rank ``r`` of each factor (capped at its dimension; ignored
      by ``"eigh"``).
    damping: ``λ``, relative to each factor's largest kept eigenvalue unless
      ``relative_damping`` is False.
    ema: the factors' EMA decay ``ρ`` in ``(0, 1)``.
    cov_every: ``T_cov``, steps between statistics (and Brand) updates.
    inverse_every: ``T_inv``, steps between refreshes (eigh, RSVD,
      re-orthogonalisation, Rayleigh–Ritz correction).
    seed: seed of the randomized EVD and of the corrected modes.
    layers: the registration, a tree aligned with the parameters holding a
      :class:`kronopt.KFACLayer` at each registered kernel (e.g.
      ``kronopt.flax.nnx.KFACCapture(model).layers``); ``None`` registers
      every rank-2 ``kernel`` as dense and every rank-4 one as a 2-D
      convolution, with their sibling ``bias``.
    relative_damping: damping relative to ``max D`` (default) or absolute.
    start_preconditioning_step: first step preconditioned (and refreshed).
    inverse_failure_threshold: largest loss of orthonormality
      ``max|UᵀU − I|`` a refreshed decomposition may have.
    oversample: RSVD oversampling ``p``.
    power_iters: RSVD power iterations ``q``.
    correction_fraction: fraction of the modes B-KFAC-c corrects.
    rsvd_reset_every: B-R-KFAC's RSVD reset period, in refreshes.
    shard_axis: mesh axis name (or tuple) to shard the stacked layers over;
      ``None`` does not shard (see :mod:`kronopt.sharding`).
    mesh: the ``jax.sharding.Mesh``; ``None`` uses the ambient mesh.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`kronopt.PreconditionerState` of :class:`KFACGroupState` groups.

  Raises:
    ValueError: for an argument out of its valid range; at ``update``, for
      missing or mismatched ``kfac_stats``.
  """
  checks.check_choice("method", method, METHODS)
  checks.check_int("rank", rank, low=1, static=True)
  checks.check_number("damping", damping, low=0.0, low_open=True)
  checks.check_number("ema", ema, low=0.0, high=1.0, low_open=True,
                      high_open=True)
  checks.check_int("cov_every", cov_every, low=1, high=checks.INT32_MAX)
  checks.check_int("inverse_every", inverse_every, low=1,
                   high=checks.INT32_MAX)
  checks.check_int("seed", seed, low=0)
  checks.check_bool("relative_damping", relative_damping)
  checks.check_int("oversample", oversample, low=0, static=True)
  checks.check_int("power_iters", power_iters, low=0, static=True)
  _check_static_fraction(correction_fraction)
  checks.check_int("rsvd_reset_every", rsvd_reset_every, low=1,
                   high=checks.INT32_MAX)
  _check_layers(layers)
  precond = KFAC(method=method, rank=rank, damping=damping, ema=ema,
                 relative_damping=relative_damping, seed=seed,
                 oversample=oversample, power_iters=power_iters,
                 correction_fraction=correction_fraction,
                 rsvd_reset_every=rsvd_reset_every,
                 inverse_every=inverse_every,
                 start=start_preconditioning_step)
  return engine.preconditioner_transform(
      precond, layout_fn=lambda tree, extra_args: make_layout(tree, layers),
      statistics_every=cov_every, precondition_every=inverse_every,
      start_preconditioning_step=start_preconditioning_step,
      inverse_failure_threshold=inverse_failure_threshold,
      shard_axis=shard_axis, mesh=mesh)

