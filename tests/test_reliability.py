"""Reliability of every registered optimizer (docs/contracts.md).

What a careful user tries: hostile configuration, extreme but finite
gradients, a state of another tree, complex, integer, ``float0``, empty and
float16 leaves, cast states, ``optax.tree.get(state, "count")``, an
embedding too large to precondition. Every check is parameterised over
``test_conformance.CASES``; those that compile more than one program per
case run over one case per optimizer (``optimizer_cases.representatives``).
Programs are compiled with XLA's cheapest options (tests/fast_jit.py).
"""

import inspect
import math
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronopt
from kronopt import engine

sys.path.insert(0, os.path.dirname(__file__))
from fast_jit import jit  # noqa: E402
from optimizer_cases import build_for  # noqa: E402
from optimizer_cases import is_kfac  # noqa: E402
from optimizer_cases import kfac_layers  # noqa: E402
from optimizer_cases import kfac_stats  # noqa: E402
from optimizer_cases import representatives  # noqa: E402
import test_conformance as conf  # noqa: E402

ALL = sorted(conf.CASES)
REPS = representatives()


def signature(name):
  return inspect.signature(conf.CASES[name].fn).parameters


def engine_state(state):
  return engine.find_states(state)[0]


# ---------------------------------------------------------------- arguments

# Integers that shape the computation: Python integers only.
STATIC_INTS = {"block_size", "rank", "max_precond_dim", "oversample",
               "power_iters", "fd_oversample"}
# Step counts: compared with an int32 count, so at most 2**31 - 1.
STEP_INTS = {"precondition_every", "statistics_every",
             "start_preconditioning_step", "cov_every", "inverse_every",
             "rsvd_reset_every"}
FLOATS_DEFAULT_NONE = {"exponent", "shampoo_b2"}
NOT_SCALARS = {"weight_decay_mask", "shard_axis", "mesh", "layers"}


def hostile_values(arg, default):
  """Values every optimizer must reject for ``arg`` (by its default)."""
  if arg in NOT_SCALARS:
    return []
  if isinstance(default, bool):
    return ["no", None, 0.5, 1]
  if isinstance(default, str):
    return [None, 3, "bogus"]
  if arg in STATIC_INTS or (isinstance(default, int) and default is not None):
    values = ["8", 8.5, True]
    if arg in STATIC_INTS:
      values.append(jnp.array(16))
    if arg in STEP_INTS:
      values.append(2**31)
    return values
  if isinstance(default, float) or arg in FLOATS_DEFAULT_NONE or (
      arg == "learning_rate"):
    return ["0.5", True, math.inf, -math.inf, math.nan]
  return []


@pytest.mark.parametrize("name", ALL)
def test_hostile_arguments_raise_value_errors_naming_them(name):
  """Numeric strings, bools for numbers, ±inf, NaN, non-bools for flags,
  arrays for static integers, int32 overflow and unknown choices: each a
  ValueError at construction whose message names the argument, the value
  and the valid range."""
  case = conf.CASES[name]
  wrong = []
  for arg, p in signature(name).items():
    default = p.default if p.default is not p.empty else case.kwargs.get(arg)
    for value in hostile_values(arg, default):
      try:
        case.fn(**{**case.kwargs, arg: value})
      except ValueError as err:
        msg = str(err)
        if f"{arg}={value!r}" not in msg or "expected" not in msg:
          wrong.append(f"{arg}={value!r}: message {msg!r}")
        if arg in STATIC_INTS and isinstance(value, jax.Array) and (
            "static_args" not in msg):
          wrong.append(f"{arg}={value!r}: no static_args hint in {msg!r}")
      except Exception as err:  # pylint: disable=broad-except
        wrong.append(f"{arg}={value!r}: {type(err).__name__}: {err}")
      else:
        wrong.append(f"{arg}={value!r}: accepted")
  assert not wrong, "\n".join(wrong)


# (argument, value): reported as themselves, not as the graft's b2, eps, ...
OUT_OF_RANGE = [("graft_b2", 1.0), ("graft_eps", 0.0), ("graft_type", None),
                ("graft_type", 3), ("b1", 1.0), ("eps", 0.0),
                ("learning_rate", -1.0), ("weight_decay", -0.1)]


@pytest.mark.parametrize("name", ALL)
def test_errors_name_the_argument_given(name):
  case, wrong = conf.CASES[name], []
  for arg, value in OUT_OF_RANGE:
    if arg not in signature(name):
      continue
    with pytest.raises(ValueError) as err:
      case.fn(**{**case.kwargs, arg: value})
    if not str(err.value).startswith(f"{arg}={value!r} "):
      wrong.append(f"{arg}={value!r}: {err.value}")
  assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", [n for n in ALL
                                  if "relative_epsilon" in signature(n)])
@pytest.mark.parametrize("relative", [True, False])
def test_zero_epsilon_is_rejected(name, relative):
  """The statistics start at 0 (and padding keeps zero eigenvalues): an
  undamped inverse root is infinite with relative and absolute damping."""
  case = conf.CASES[name]
  with pytest.raises(ValueError, match=r"epsilon=0.0 .*\(0.0, inf\)"):
    case.fn(**{**case.kwargs, "epsilon": 0.0, "relative_epsilon": relative})


@pytest.mark.parametrize("kwargs", [
    dict(block_size=-3), dict(block_size=1), dict(block_size=2.5),
    dict(block_size=True), dict(block_size=jnp.array(4)),
    dict(block_size=4, max_precond_dim=0),
    dict(block_size=4, max_precond_dim=2.5)])
def test_make_layout_rejects_bad_sizes(kwargs):
  arg = [k for k in kwargs if k != "block_size"] or ["block_size"]
  with pytest.raises(ValueError, match=f"{arg[0]}=.*expected"):
    kronopt.make_layout(conf.make_params(), **kwargs)


# ---------------------------------------------------------------- misuse

def _trace_update(tx, state, grads, extra):
  """Traces (never runs) one update."""
  return jax.eval_shape(lambda g, s: tx.update(g, s, None, **extra), grads,
                        state)


@pytest.mark.parametrize("name", ALL)
def test_complex_leaves_raise_at_init_and_update(name):
  params = conf.make_params()
  tx, extra = build_for(name, params)
  complex_params = dict(params, w=params["w"].astype(jnp.complex64))
  with pytest.raises(ValueError, match=r"complex leaves: \['w'\] \(complex64"):
    tx.init(complex_params)
  grads = conf.grads_at(params, 0)
  complex_grads = dict(grads, b=grads["b"] * (1 + 1j))
  with pytest.raises(ValueError, match=r"complex leaves: \['b'\]"):
    _trace_update(tx, tx.init(params), complex_grads, extra(grads))


def _tree(w_shape):
  keys = jax.random.split(jax.random.PRNGKey(5), 2)
  return {"w": jax.random.normal(keys[0], w_shape),
          "b": jax.random.normal(keys[1], (6,))}


def _misuses(name):
  """``(label, init_tx, update_tx, update_tree)``: a state initialised by
  ``init_tx`` on ``_tree((12, 20))`` updated by ``update_tx`` with
  ``update_tree``'s gradients."""
  base = _tree((12, 20))
  tx, _ = build_for(name, base)
  out = [("extra leaf", tx, None, dict(base, extra=jnp.ones((4, 4)))),
         ("other shape (12, 20) -> (12, 24)", tx, None, _tree((12, 24))),
         ("missing leaf", tx, None, {"w": base["w"]})]
  if "block_size" in signature(name):
    other, _ = build_for(name, base, block_size=8)
    out.append(("block_size 4 -> 8", tx, other, base))
  else:  # K-FAC: another registration of the same tree
    other, _ = build_for(name, base, register=False)
    out.append(("registration", other, tx, base))
  return base, out


@pytest.mark.parametrize("name", ALL)
def test_state_of_another_tree_or_layout_is_a_clear_error(name):
  base, misuses = _misuses(name)
  wrong = []
  for label, init_tx, update_tx, tree in misuses:
    update_tx = update_tx or init_tx
    state = init_tx.init(base)
    if update_tx is not init_tx and conf.structure(state) == conf.structure(
        jax.eval_shape(update_tx.init, base)):
      continue  # both configurations lay the tree out alike: compatible
    grads = jax.tree_util.tree_map(jnp.ones_like, tree)
    extra = ({"kfac_stats": kfac_stats(kfac_layers(tree), grads)}
             if is_kfac(name) else {})
    try:
      _trace_update(update_tx, state, grads, extra)
    except ValueError as err:
      if "tx.init" not in str(err):
        wrong.append(f"{label}: {err}")
    except Exception as err:  # pylint: disable=broad-except
      wrong.append(f"{label}: {type(err).__name__}: {err}")
    else:
      wrong.append(f"{label}: accepted")
  assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- counts

@pytest.mark.parametrize("name", ALL)
def test_tree_get_count_is_the_engines(name):
  """A float learning rate: exactly one ``count``, the engine's; a schedule
  adds optax's own, as it does to ``optax.adamw``'s."""
  params = conf.make_params()
  tx, _ = build_for(name, params)
  state = tx.init(params)
  assert optax.tree.get(state, "count") is engine_state(state).count
  schedule = optax.linear_schedule(1e-2, 0.0, 100)
  tx, _ = build_for(name, params, learning_rate=schedule)
  found = optax.tree.get_all_with_path(tx.init(params), "count")
  adamw = optax.tree.get_all_with_path(
      optax.adamw(schedule).init(params), "count")
  assert len(found) == len(adamw) == 2, found
  assert [path[-1].tuple_name for path, _ in found] == [
      "PreconditionerState", "ScaleByScheduleState"], found


# ---------------------------------------------------------------- memory

def _bytes(tree):
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", ALL)
def test_a_huge_embedding_can_be_left_unpreconditioned(name):
  """50,000×64: with ``max_precond_dim`` (K-FAC: by not registering it) the
  state is Adam's two moments plus 64×64 factors, not 1024² ones."""
  params = {"emb": jax.ShapeDtypeStruct((50_000, 64), jnp.float32)}
  size = _bytes(params)
  if "max_precond_dim" in signature(name):
    big = dict(block_size=1024, max_precond_dim=None)
    default, _ = build_for(name, params, **big)
    tx, _ = build_for(name, params, **dict(big, max_precond_dim=1024))
    # Shampoo's default: 49 blocks of 1024×64 with 1024² factors, ~35×.
    assert _bytes(jax.eval_shape(tx.init, params)) <= _bytes(
        jax.eval_shape(default.init, params))
  else:
    tx, _ = build_for(name, params, register=False)
  assert _bytes(jax.eval_shape(tx.init, params)) <= 2.05 * size


# ---------------------------------------------------------------- extremes

def _scaled(tree, factor, only=None):
  return {k: v * factor if only in (None, k) else v for k, v in tree.items()}


@pytest.fixture(scope="module")
def adam_updates():
  """``f(case_name, grads_list) -> updates``: optax.adamw with the case's
  graft settings, one compiled update per distinct setting."""
  cache = {}

  def run(name, grads_list):
    kwargs = conf._adamw_kwargs(conf.CASES[name], 0.0)  # pylint: disable=protected-access
    key = tuple(sorted(kwargs.items()))
    if key not in cache:
      tx = optax.adamw(**kwargs)
      cache[key] = (tx, jit(tx.update))
    tx, update = cache[key]
    state, out = tx.init(grads_list[0]), []
    for g in grads_list:
      u, state = update(g, state, g)  # params: any tree (no weight decay)
      out.append(u)
    return out

  return run


def _norm(x):
  return float(np.linalg.norm(np.asarray(x, np.float64)))


# Gradient scales whose statistics (squares) are finite in float32, and
# scales whose squares overflow: those steps are skipped and counted.
TAKEN = (1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e15)
OVERFLOWING = (1e20, 1e30)


@pytest.mark.parametrize("name", ALL)
def test_extreme_but_finite_gradients(name, adam_updates):
  """One jitted update (without params: weight_decay is 0) for all of it.

  * A 1e19 spike in one step is skipped: a zero update, no state change
    but ``overflows``, and the run goes on preconditioned. So is a 1e20
    spike in the bias alone, which no preconditioner statistic sees but
    Adam's ν (the graft's, SOAP's) would hold as inf for good.
  * From 1e-30 to 1e15 every step is taken, no refresh is rejected and
    each leaf's update is within a factor 2 of Adam's (the graft makes it
    Adam's norm; SOAP is Adam in a rotated basis).
  * Above, every step overflows: zero updates, each counted, ``count``
    stays 0.
  """
  params = conf.make_params()
  tx, extra = build_for(name, params)
  update = jit(lambda g, s, e: tx.update(g, s, None, **e))

  def run(grads_list):
    states, out = [tx.init(params)], []
    for g in grads_list:
      u, s = update(g, states[-1], extra(g))
      out.append(u)
      states.append(s)
    return out, states

  grads = [conf.grads_at(params, t) for t in range(6)]
  spikes = {2: ("w", 1e19), 4: ("b", 1e20)}
  got, states = run([_scaled(g, spikes[t][1], spikes[t][0]) if t in spikes
                     else g for t, g in enumerate(grads)])
  for t in spikes:
    for leaf in jax.tree_util.tree_leaves(got[t]):
      np.testing.assert_array_equal(leaf, 0.0)
    chex.assert_trees_all_equal(conf._counters_cleared(states[t + 1]),  # pylint: disable=protected-access
                                conf._counters_cleared(states[t]))  # pylint: disable=protected-access
  diag = kronopt.diagnostics(states[-1])
  assert (int(diag["overflowed_statistics"]), int(diag["skipped_gradients"]),
          int(diag["count"]), bool(diag["preconditioned"])) == (2, 0, 4, True)
  for t in (3, 5):
    chex.assert_tree_all_finite(got[t])
    assert all(_norm(x) > 0 for x in jax.tree_util.tree_leaves(got[t]))

  wrong = []
  for scale in TAKEN + OVERFLOWING:
    scaled = [_scaled(g, scale) for g in grads[:3]]
    got, states = run(scaled)
    diag = kronopt.diagnostics(states[-1])
    counters = (int(diag["overflowed_statistics"]),
                int(diag["skipped_gradients"]), int(diag["refresh_failures"]))
    if scale in OVERFLOWING:
      zero = all(_norm(x) == 0 for u in got
                 for x in jax.tree_util.tree_leaves(u))
      if counters != (3, 0, 0) or not zero or int(diag["count"]) != 0:
        wrong.append(f"{scale:g}: counters {counters}, zero updates {zero}")
      continue
    if counters != (0, 0, 0):
      wrong.append(f"{scale:g}: (overflowed, skipped, failures) {counters}")
    want = adam_updates(name, scaled)
    for key in params:
      ratio = _norm(got[-1][key]) / _norm(want[-1][key])
      if not 0.5 <= ratio <= 2.0:
        wrong.append(f"{scale:g}: {key} update / Adam's = {ratio:.3g}")
  assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------- dtypes

def _odd_tree():
  """Float32 leaves, float16 twins of them, empty leaves and integers."""
  w = jax.random.normal(jax.random.PRNGKey(7), (6, 5))
  return {"w": w, "w16": w.astype(jnp.float16), "b": jnp.ones((5,)),
          "b16": jnp.ones((5,), jnp.float16), "e0": jnp.zeros((0, 5)),
          "e1": jnp.zeros((5, 0, 3)), "i": jnp.arange(3),
          "j": jnp.ones((4, 4), jnp.int32)}


def _odd_grads(params, t):
  """Small gradients (1e-4: squares below float16's range) with a zero
  row, representable in float16 so that the twins see the same values;
  ``float0`` for the integers, as ``jax.grad(..., allow_int=True)``
  gives."""
  g = 1e-4 * jax.random.normal(jax.random.PRNGKey(20 + t), (6, 5))
  g = g.at[0].set(0.0).astype(jnp.float16).astype(jnp.float32)
  gb = jnp.zeros((5,))
  float0 = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return {"w": g, "w16": g.astype(jnp.float16), "b": gb,
          "b16": gb.astype(jnp.float16), "e0": jnp.zeros((0, 5)),
          "e1": jnp.zeros((5, 0, 3)), "i": float0(params["i"]),
          "j": float0(params["j"])}


@pytest.mark.parametrize("name", REPS)
def test_float16_empty_integer_and_float0_leaves(name):
  """Float16 leaves are updated as their float32 twins (the graft keeps
  their moments in float32); empty leaves get empty updates; integer
  leaves with ``float0`` gradients get zero updates in their own dtype and
  no state; one compile for all steps."""
  params = _odd_tree()
  tx, extra = build_for(name, params)
  traces = []

  def step(g, s, e):
    traces.append(1)
    return tx.update(g, s, params, **e)

  update = jit(step)
  state = tx.init(params)
  for t in range(4):
    grads = _odd_grads(params, t)
    u, state = update(grads, state, extra(grads))
    chex.assert_tree_all_finite(u)
    for k, x in u.items():
      assert (x.shape, x.dtype) == (params[k].shape, params[k].dtype), k
    np.testing.assert_allclose(np.asarray(u["w16"], np.float32),
                               u["w"].astype(jnp.float16), rtol=2e-3)
    np.testing.assert_array_equal(u["b16"], np.zeros(5))
    np.testing.assert_array_equal(u["i"], np.zeros(3))
    np.testing.assert_array_equal(u["j"], np.zeros((4, 4)))
  assert len(traces) == 1
  moved = optax.apply_updates(params, u)
  assert {k: v.dtype for k, v in moved.items()} == {
      k: v.dtype for k, v in params.items()}
  int_leaves = [x for x in jax.tree_util.tree_leaves(state)
                if x.shape in ((3,), (4, 4)) and x.dtype == jnp.int32]
  assert not int_leaves, "integer leaves have state"
  assert int(engine_state(state).count) == 4


@pytest.mark.parametrize("name", REPS)
def test_cast_state_is_computed_on_and_handed_back(name):
  """``optax.tree_utils.tree_cast(state, jnp.bfloat16)`` (which casts the
  counters too): the step is computed, the floating leaves come back in
  bfloat16, the counters and flags as int32 and bool again (a bfloat16
  count is exact only to 256), and from there the state's dtypes are
  stable. The update is close to the float32 state's."""
  params = conf.make_params()
  tx, extra = build_for(name, params)
  update = jit(lambda g, s, e: tx.update(g, s, params, **e))
  state = tx.init(params)
  g = conf.grads_at(params, 0)
  want, want_state = update(g, state, extra(g))
  cast = optax.tree_utils.tree_cast(state, jnp.bfloat16)
  got, new = update(g, cast, extra(g))
  for given, back, like in zip(*map(jax.tree_util.tree_leaves,
                                    (cast, new, want_state))):
    floating = jnp.issubdtype(like.dtype, jnp.floating)
    assert back.dtype == (given.dtype if floating else like.dtype)
  g = conf.grads_at(params, 1)
  _, again = update(g, new, extra(g))
  assert conf.structure(again) == conf.structure(new)
  assert int(engine_state(again).count) == 2
  for key in params:
    err = _norm(got[key] - want[key]) / _norm(want[key])
    assert err < 0.05, (key, err)
