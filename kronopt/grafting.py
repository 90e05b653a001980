"""Grafting with one momentum: a direction at a simpler optimizer's step size.

Agarwal et al., "Disentangling adaptive gradient methods from learning rates"
(2020); the filtered gradient of Shi et al., "A distributed data-parallel
PyTorch implementation of the distributed Shampoo optimizer" (2023);
docs/algorithms.md §0. Per parameter, with ``G`` the gradient:

    m ← β₁ m + (1−β₁) G,          m̂ = m / (1−β₁ᵗ)   (Nesterov as optax's adam)
    D = direction(m̂)              (its statistics from the raw G)
    U_g = m̂ / r(ν)                (the magnitude's own step on m̂)
    U = D · ‖U_g‖_F / max(‖D‖_F, tiny)

with, for the string magnitudes, ``ν`` a second moment of the raw gradient:

* ``"adam"``: ``ν ← β₂ ν + (1−β₂) G²``, ``U_g = m̂ / (√(ν/(1−β₂ᵗ)) + ε)``;
* ``"rmsprop"``: ``ν ← β₂ ν + (1−β₂) G²``, ``U_g = m̂ / √(ν + ε)``;
* ``"adagrad"``: ``ν ← ν + G²``, ``U_g = m̂ / √(ν + ε)`` (0 while ``ν = 0``);
* ``"sgd"``: ``U_g = m̂``;  ``"none"``: ``U = D`` (no rescaling);

or any optax transform applied to ``m̂``. Parameters the direction does not
precondition (rank ≤ 1 after squeezing, and any the direction reports as
uncovered) and every parameter before the direction's
``start_preconditioning_step`` take ``U_g`` itself: with ``"adam"`` that is
exactly ``optax.adam``'s update. A step the direction skips (non-finite
gradient or statistics, see :func:`kronopt.engine.step_taken`; a finite
gradient whose ``ν`` would overflow counts as overflowing statistics) leaves
the moments untouched and returns a zero update.
"""

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from kronopt import checks
from kronopt import engine
from kronopt import layout

GRAFT_TYPES = ("adam", "adagrad", "rmsprop", "sgd", "none")
TINY = 1e-30


class GraftState(NamedTuple):
  """State of :func:`graft`.

  Attributes:
    mu: the first moment ``m`` of the gradient, per parameter.
    nu: the magnitude's second moment ``ν`` (``()`` for ``"sgd"``, ``"none"``
      and custom magnitudes).
    direction: the direction's state.
    magnitude: a custom magnitude transform's state (else ``()``).
    graft_count: int32 steps taken, only when the direction has no
      :class:`kronopt.PreconditionerState` to count them (else ``()``): the
      engine's ``count`` is the one count of a kronopt state.
  """
  mu: optax.Updates
  nu: Any
  direction: optax.OptState
  magnitude: Any
  graft_count: Any


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _flatten(tree):
  return jax.tree_util.tree_flatten(tree, is_leaf=_is_masked)


def _norms(x):
  """Frobenius norm of each ``x[i]`` of a stack, without under/overflow.

  ``‖x‖ = s·‖x/s‖`` with ``s = max|x|``, so entries from ``1e-30`` to
  ``1e30`` in float32 keep their norm (a plain sum of squares underflows to 0
  below ~1e-19 and overflows above ~1e19).
  """
  x = x.astype(jnp.float32)
  axes = tuple(range(1, x.ndim))
  s = jnp.max(jnp.abs(x), axis=axes, initial=0.0)  # 0 for empty leaves
  safe = jnp.where(s > 0, s, 1.0)
  scaled = x / jnp.reshape(safe, s.shape + (1,) * (x.ndim - 1))
  return s * jnp.sqrt(jnp.sum(jnp.square(scaled), axis=axes))


def _square_sums(tree):
  """``Σ g²`` per leaf in float32 (inf when it overflows)."""
  return [jnp.sum(jnp.square(x.astype(jnp.float32)))
          for x in jax.tree_util.tree_leaves(tree)]


def _graft_scales(d_leaves, u_leaves):
  """Per leaf ``‖U_g‖_F / max(‖D‖_F, tiny)``, batched over equal shapes."""
  d_norms = engine.per_leaf_reduce(_norms, d_leaves)
  u_norms = engine.per_leaf_reduce(_norms, u_leaves)
  return [u / jnp.maximum(dn, TINY) for dn, u in zip(d_norms, u_norms)]


def moment_dtype(dtype):
  """The dtype the graft keeps moments in and computes in for parameters of
  ``dtype``: float32 for float16 (whose ``ε = 1e-8`` is 0 and whose squares
  of gradients below ~2.4e-4 underflow, so ``m̂/(√v̂+ε)`` is 0/0 or x/0:
  NaN or inf on the first step, as with ``optax.adam``), else ``dtype``."""
  return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


def _widened(tree):
  """``tree`` with its float16 leaves in float32 (see :func:`moment_dtype`)."""
  return jax.tree_util.tree_map(
      lambda x: x.astype(moment_dtype(x.dtype)), tree)


def _zeros_like(tree, dtype=None):
  """Zeros like ``tree`` in ``dtype``, or per leaf in :func:`moment_dtype`."""
  return jax.tree_util.tree_map(
      lambda x: jnp.zeros_like(x, dtype or moment_dtype(jnp.result_type(x))),
      tree)


def _second_moment(kind, b2):
  """``ν ← update(ν, g)`` of a string magnitude, or ``None`` if it has none."""
  if kind in ("adam", "rmsprop"):
    update = lambda nu, g: optax.tree.update_moment_per_elem_norm(
        g, nu, b2, 2)
  elif kind == "adagrad":
    update = lambda nu, g: jax.tree_util.tree_map(
        lambda n, x: n + jnp.square(x), nu, g)
  else:
    return None
  return update


def _denominator(kind, nu, count, b2, eps):
  """The per-element denominator ``r(ν)`` of a string magnitude."""
  if kind == "adam":
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    return jax.tree_util.tree_map(lambda v: jnp.sqrt(v) + eps, nu_hat)
  if kind == "rmsprop":
    return jax.tree_util.tree_map(lambda v: jnp.sqrt(v + eps), nu)
  return jax.tree_util.tree_map(  # adagrad
      lambda v: jnp.where(v > 0, jnp.sqrt(v + eps), jnp.inf), nu)


def filtered_gradient(updates, mu, count, b1, nesterov: bool):
  """``(m, m̂)``: the first moment and its bias correction at step ``count``.

  ``count`` is the step number (1 on the first step). Nesterov as
  ``optax.scale_by_adam(nesterov=True)``:
  ``m̂ = β₁ m/(1−β₁^{t+1}) + (1−β₁) G/(1−β₁ᵗ)``.
  """
  mu = optax.tree.update_moment(updates, mu, b1, 1)
  if nesterov:
    mu_hat = jax.tree_util.tree_map(
        lambda m, g: b1 * m + (1 - b1) * g,
        optax.tree.bias_correction(mu, b1, optax.safe_int32_increment(count)),
        optax.tree.bias_correction(updates, b1, count))
  else:
    mu_hat = optax.tree.bias_correction(mu, b1, count)
  return mu, mu_hat


def _covered_flags(reports, leaves):
  """Per leaf, whether some engine reported it preconditioned."""
  if not reports:
    return [not _is_masked(x) and layout.is_preconditioned(x.shape)
            for x in leaves]
  flags = [False] * len(leaves)
  for covered in reports:
    flags = [f or c for f, c in zip(flags, covered)]
  return flags


def check_graft_args(magnitude, b1, b2, eps, nesterov, *,
                     names=("magnitude", "b1", "b2", "eps", "nesterov")):
  """Validation of :func:`graft`'s arguments, reported under ``names`` (the
  ready-made optimizers call them ``graft_type``, ``graft_b2``, ...)."""
  n_magnitude, n_b1, n_b2, n_eps, n_nesterov = names
  checks.check_number(n_b1, b1, low=0.0, high=1.0, high_open=True)
  checks.check_bool(n_nesterov, nesterov)
  if isinstance(magnitude, optax.GradientTransformation):
    return
  if not isinstance(magnitude, str) or magnitude not in GRAFT_TYPES:
    raise ValueError(
        f"{n_magnitude}={magnitude!r} is not valid; expected one of "
        f"{', '.join(map(repr, GRAFT_TYPES))} or an optax "
        "GradientTransformation.")
  if magnitude in ("adam", "rmsprop"):
    checks.check_number(n_b2, b2, low=0.0, high=1.0, high_open=True)
  if magnitude != "none":
    checks.check_number(n_eps, eps, low=0.0, low_open=True)


def graft(direction: optax.GradientTransformation,
          magnitude: Union[str, optax.GradientTransformation] = "adam",
          *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          nesterov: bool = False, mu_dtype: Optional[Any] = None,
          ) -> optax.GradientTransformationExtraArgs:
  """Preconditions the filtered gradient and rescales it per parameter.

  See the module docstring for the math. ``direction`` receives ``m̂`` as
  its updates and the raw gradient as the extra argument
  ``statistics_gradient`` (kronopt's engine builds its statistics from it).

  Args:
    direction: the preconditioner, e.g. :func:`kronopt.scale_by_shampoo`.
    magnitude: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"``,
      ``"none"`` (the direction unchanged) or any optax transform (applied to
      ``m̂``).
    b1: first-moment decay ``β₁`` in ``[0, 1)``; 0 preconditions the
      gradient itself.
    b2: second-moment decay of ``"adam"`` / ``"rmsprop"``, in ``[0, 1)``.
    eps: ``ε`` of the string magnitudes, ``> 0``.
    nesterov: Nesterov's form of ``m̂`` (as optax's adam).
    mu_dtype: dtype of the first moment (``None``: the parameters', float32
      for float16 parameters). Float16 parameters are computed on in float32
      and their moments kept in float32 (:func:`moment_dtype`); their
      updates are float16.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`GraftState`.
  """
  direction = optax.with_extra_args_support(direction)
  check_graft_args(magnitude, b1, b2, eps, nesterov)
  custom = None
  if isinstance(magnitude, optax.GradientTransformation):
    custom = optax.with_extra_args_support(magnitude)
  kind = None if custom is not None else magnitude
  nu_update = _second_moment(kind, b2)

  def init_fn(params):
    d_state = direction.init(params)
    own_count = () if engine.find_states(d_state) else jnp.zeros([], jnp.int32)
    return GraftState(
        mu=_zeros_like(params, mu_dtype),
        nu=_zeros_like(params) if nu_update else (),
        direction=d_state,
        magnitude=custom.init(params) if custom else (),
        graft_count=own_count)

  def update_fn(updates, state, params=None, **extra_args):
    engine.check_tree_matches(state.mu, updates, "first moment")
    given = updates
    updates = _widened(updates)
    engines = engine.find_states(state.direction)
    count = engines[0].count if engines else state.graft_count
    count = optax.safe_int32_increment(jnp.asarray(count, jnp.int32))
    mu, mu_hat = filtered_gradient(updates, state.mu, count, b1, nesterov)

    # A finite gradient whose squares overflow float32 (an entry above
    # ~1.8e19, or a leaf's Σg², the scale of every Gram statistic, above
    # 3.4e38) is skipped like one whose preconditioner statistics overflow,
    # whatever the direction computes from it (Sketchy's sketches and
    # K-FAC's low-rank factors never square it): ν would hold it for
    # thousands of steps and freeze the run.
    nu = () if nu_update is None else nu_update(state.nu, updates)
    own_finite = (engine.tree_all_finite(nu)
                  & engine.tree_all_finite(_square_sums(updates))
                  & engine.reported_finite(extra_args))
    reports = []
    d, d_state = direction.update(
        mu_hat, state.direction, params,
        **{**extra_args, engine.STATISTICS_GRADIENT: updates,
           engine.STATISTICS_FINITE: own_finite,
           engine.REPORT_COVERED: lambda _, covered: reports.append(covered)})
    taken = engine.step_taken(state.direction, d_state)
    if taken is None:
      taken = engine.tree_all_finite(updates) & own_finite

    if nu_update is not None:
      u = jax.tree_util.tree_map(
          lambda m, r: m / r, mu_hat, _denominator(kind, nu, count, b2, eps))
      m_state = ()
    elif custom is not None:
      nu = ()
      u, m_state = custom.update(mu_hat, state.magnitude, params,
                                 **extra_args)
      m_state = engine.tree_select(taken, m_state, state.magnitude)
    else:
      nu, u, m_state = (), mu_hat, ()
    # The moments keep the dtypes they were given (mu_dtype, float32 for
    # float16 parameters, or a cast state's), so a jitted step never retraces.
    new_state = GraftState(
        mu=engine.cast_like(engine.tree_select(taken, mu, state.mu), state.mu),
        nu=engine.cast_like(engine.tree_select(taken, nu, state.nu), state.nu),
        direction=d_state, magnitude=m_state,
        graft_count=(() if engines else
                     jnp.where(taken, count, state.graft_count)))
    out = _combine(d, u, d_state, reports, taken, kind == "none")
    out = jax.tree_util.tree_map(lambda o, g: o.astype(g.dtype), out, given)
    return out, new_state

  return engine.float_leaves_only(
      optax.GradientTransformationExtraArgs(init_fn, update_fn))


def _combine(d, u, d_state, reports, taken, ungrafted: bool):
  """Per leaf: the grafted direction, or ``U_g`` where nothing is
  preconditioned; zero on a skipped step."""
  found = engine.find_states(d_state)
  active = found[0].preconditioned if found else jnp.asarray(True)
  d_leaves, treedef = _flatten(d)
  u_leaves = treedef.flatten_up_to(u)
  flags = _covered_flags(reports, d_leaves)
  live = [i for i, x in enumerate(d_leaves) if not _is_masked(x)]
  scales = dict(zip(live, _graft_scales([d_leaves[i] for i in live],
                                        [u_leaves[i] for i in live])))
  out = []
  for i, (d_leaf, u_leaf) in enumerate(zip(d_leaves, u_leaves)):
    if _is_masked(d_leaf):
      out.append(d_leaf)
      continue
    if flags[i]:
      grafted = d_leaf.astype(jnp.float32)
      if not ungrafted:
        grafted = grafted * scales[i]
      leaf = jnp.where(active, grafted, u_leaf.astype(jnp.float32))
    else:
      leaf = u_leaf
    out.append(jnp.where(taken, leaf, 0.0).astype(d_leaf.dtype))
  return treedef.unflatten(out)
