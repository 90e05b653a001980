"""Optax conformance of every kronopt optimizer (docs/contracts.md).

Each optimizer is registered once in ``CASES``. The checks of a case's own
updates and state (structure, arrays only, no recompilation, finite and
preconditioned updates, ``eval_shape``, ``inject_hyperparams``) run for all
of them; the checks that compile another program around the transform
(wrappers, bfloat16, the NaN step, the AdamW equivalences, extra args) run
once per optimizer and algorithm (:func:`representatives`): root-method
variants and K-FAC's decomposition methods share the code they exercise. Shapes are tiny and ``block_size`` small so that the layout has
merging, splitting, padding, a rank-1 parameter and an order-3 block.
"""

import inspect
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronopt
import kronopt.engine

LAYOUT_STATIC = ("block_size", "precondition_every",
                 "start_preconditioning_step")
COMMON = dict(learning_rate=1e-2, block_size=4, precondition_every=2,
              start_preconditioning_step=1)


class Case(NamedTuple):
  """A registered optimizer.

  Attributes:
    fn: the ready-made optimizer.
    kwargs: its keyword arguments here.
    static: static args for ``optax.inject_hyperparams``.
    extra: ``extra(params, step) -> dict`` of extra arguments every update
      needs (K-FAC's statistics), or ``None``.
    unpreconditioned: keyword overrides under which nothing is
      preconditioned for a whole run (the optimizer is then AdamW).
    adamw_names: the optimizer's arguments that are ``optax.adamw``'s
      ``b2`` and ``eps`` where nothing is preconditioned.
  """
  fn: Callable
  kwargs: dict
  static: tuple = LAYOUT_STATIC
  extra: Optional[Callable] = None
  unpreconditioned: Any = dict(start_preconditioning_step=10**6)
  adamw_names: tuple = ("graft_b2", "graft_eps")


# K-FAC: w (8×6) is a dense layer registered without bias, so that b stays
# AdamW's as for every optimizer here; conv is not registered (AdamW too),
# which keeps each K-FAC case one group of two factors (compile time).
# Rank 3 with 4 statistics columns: w's 8-dimensional factor takes Brand's
# QR path, the 6-dimensional one the direct path; oversampling 2 keeps the
# RSVD's sketch (5 columns) below d. Damping 0.1 keeps the damped inverses'
# amplification of float32 rounding below 10.
KFAC_LAYERS = {"w": kronopt.KFACLayer.dense(None), "b": None, "conv": None}
KFAC_COMMON = dict(learning_rate=1e-2, layers=KFAC_LAYERS, rank=3,
                   oversample=2, damping=0.1, cov_every=1, inverse_every=2,
                   start_preconditioning_step=1)
KFAC_STATIC = ("rank", "oversample", "power_iters", "correction_fraction")


def kfac_stats_at(params, step):
  """Deterministic statistics of w (4 columns) that differ per step."""
  del params
  k1, k2 = jax.random.split(jax.random.PRNGKey(200 + step))
  stats = kronopt.KFACStats(jax.random.normal(k1, (8, 4)),
                            jax.random.normal(k2, (6, 4)))
  return {"kfac_stats": {"w": stats, "b": None, "conv": None}}


CASES = {
    "shampoo": Case(kronopt.shampoo, dict(COMMON)),
    "shampoo_newton": Case(kronopt.shampoo,
                           dict(COMMON, root_method="newton")),
    "shampoo_qr": Case(kronopt.shampoo, dict(COMMON, root_method="qr")),
    "kradagrad_star": Case(kronopt.kradagrad, dict(COMMON, epsilon=0.1)),
    "kradagrad_single_axis": Case(
        kronopt.kradagrad, dict(COMMON, variant="single_axis", epsilon=0.01)),
    "shampoo2": Case(kronopt.shampoo2, dict(COMMON)),
    "caspr": Case(kronopt.caspr, dict(COMMON)),
    "sketchy": Case(kronopt.sketchy, dict(COMMON, rank=2),
                    LAYOUT_STATIC + ("rank",)),
    **{f"kfac_{method}": Case(kronopt.kfac, dict(KFAC_COMMON, method=method),
                              KFAC_STATIC, extra=kfac_stats_at)
       for method in ("eigh", "rsvd", "brand", "brand_rsvd",
                      "brand_corrected")},
    # SOAP: no graft (its own Adam moments). Bases from eigh at count 1 (two
    # gradients: full-rank factors, so unique bases), QR at counts 2 and 3.
    # With max_precond_dim=6, w = 8×6 rotates only its columns (split 4+2).
    "soap": Case(kronopt.soap, dict(COMMON, precondition_every=1),
                 LAYOUT_STATIC + ("max_precond_dim",),
                 adamw_names=("b2", "eps")),
    "soap_max_precond_dim": Case(
        kronopt.soap, dict(COMMON, precondition_every=1, max_precond_dim=6),
        LAYOUT_STATIC + ("max_precond_dim",), adamw_names=("b2", "eps")),
}

STEPS = 4


def representatives() -> list[str]:
  """One case per (optimizer, ``variant``), the first in sorted order.

  For the checks of how a transform composes (wrappers, other trees):
  root-method variants and K-FAC's decomposition methods share the code
  those checks exercise (the engine, the graft, the chain), and every case
  still runs every check of its own updates and state.
  """
  seen, out = set(), []
  for name in sorted(CASES):
    key = (CASES[name].fn, CASES[name].kwargs.get("variant"))
    if key not in seen:
      seen.add(key)
      out.append(name)
  return out


def make_params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "w": jax.random.normal(keys[0], (8, 6), dtype),
      "b": jnp.zeros((6,), dtype),
      "conv": jax.random.normal(keys[1], (2, 2, 3, 4), dtype),
  }


def grads_at(params, step):
  """Deterministic pseudo-gradients that differ from step to step."""
  key = jax.random.PRNGKey(100 + step)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      (jax.random.normal(k, p.shape) + 0.1 * p).astype(p.dtype)
      for k, p in zip(keys, leaves)])


def build(name, **overrides):
  case = CASES[name]
  return case.fn(**{**case.kwargs, **overrides})


def extra_at(name, params, step, **more):
  """The extra arguments case ``name`` needs at ``step`` (plus ``more``)."""
  extra = CASES[name].extra
  return {**(extra(params, step) if extra else {}), **more}


def run(tx, params, steps=STEPS, grads_fn=grads_at, jit=True, name=None,
        **more):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for t in range(steps):
    extra = extra_at(name, params, t, **more) if name else more
    updates, state = update(grads_fn(params, t), state, params, **extra)
    out.append(updates)
  return out, state


def structure(tree):
  return (jax.tree_util.tree_structure(tree),
          [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  """Per optimizer: the transform, its jitted update and a few steps' states."""
  name = request.param
  tx = build(name)
  params = make_params()
  trace_count = []

  def counted_update(g, s, p, extra):
    trace_count.append(1)
    return tx.update(g, s, p, **extra)

  update = jax.jit(counted_update)
  states, updates = [tx.init(params)], []
  for t in range(STEPS):
    u, s = update(grads_at(params, t), states[-1], params,
                  extra_at(name, params, t))
    states.append(s)
    updates.append(u)
  return dict(name=name, tx=tx, params=params, states=states,
              updates=updates, traces=len(trace_count))


def test_state_structure_is_stable(case):
  ref = structure(case["states"][0])
  for s in case["states"][1:]:
    assert structure(s) == ref
  if case["name"] not in representatives():
    return  # the eager step below exercises no variant-specific code
  eager_updates, eager_state = case["tx"].update(
      grads_at(case["params"], 0), case["states"][0], case["params"],
      **extra_at(case["name"], case["params"], 0))
  assert structure(eager_state) == ref
  assert structure(eager_updates) == structure(case["params"])


def test_state_holds_only_arrays(case):
  for leaf in jax.tree_util.tree_leaves(case["states"][-1]):
    assert isinstance(leaf, jax.Array), type(leaf)


def test_jitted_step_does_not_recompile(case):
  assert case["traces"] == 1


def test_updates_finite_and_preconditioned(case):
  for u in case["updates"]:
    chex.assert_tree_all_finite(u)
  diag = kronopt.diagnostics(case["states"][-1])
  assert int(diag["count"]) == STEPS
  assert bool(diag["preconditioned"])
  assert int(diag["refresh_failures"]) == 0
  assert int(diag["skipped_gradients"]) == 0


def test_eval_shape_init_matches_init(case):
  abstract = jax.eval_shape(case["tx"].init, case["params"])
  assert structure(abstract) == structure(case["states"][0])


@pytest.mark.parametrize("case", representatives(), indirect=True)
def test_unknown_extra_args_are_ignored(case):
  tx, params = case["tx"], case["params"]
  state = case["states"][1]
  g = grads_at(params, 1)
  with_extra, _ = tx.update(
      g, state, params,
      **extra_at(case["name"], params, 1, some_unknown_arg=3.0))
  chex.assert_trees_all_close(with_extra, case["updates"][1], rtol=1e-5,
                              atol=1e-7)


@pytest.mark.parametrize("case", representatives(), indirect=True)
def test_inside_chain_and_multisteps(case):
  name, params = case["name"], case["params"]
  chained = optax.chain(optax.clip_by_global_norm(1e6), build(name))
  got, _ = run(chained, params, name=name)
  for a, b in zip(got, case["updates"]):
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)
  multi = optax.MultiSteps(build(name), every_k_schedule=2)
  got, state = run(multi, params, name=name)
  chex.assert_tree_all_finite(got)
  # Updates are emitted only on every second step.
  assert all(float(jnp.abs(u["w"]).max()) == 0.0 for u in got[0::2])
  assert all(float(jnp.abs(u["w"]).max()) > 0.0 for u in got[1::2])
  assert int(kronopt.diagnostics(state)["count"]) == STEPS // 2


@pytest.mark.parametrize("case", representatives(), indirect=True)
def test_inside_masked_and_partition(case):
  name, params = case["name"], case["params"]
  mask = {"w": True, "b": False, "conv": True}
  got, _ = run(optax.masked(build(name), mask), params, name=name)
  ref = case["updates"]
  for a, b, t in zip(got, ref, range(STEPS)):
    chex.assert_trees_all_close(a["w"], b["w"], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(a["b"], grads_at(params, t)["b"])
  labels = {"w": "kron", "b": "adam", "conv": "kron"}
  part = optax.partition({"kron": build(name), "adam": optax.adam(1e-2)},
                         labels)
  got, _ = run(part, params, name=name)
  for a, b in zip(got, ref):
    chex.assert_trees_all_close(a["w"], b["w"], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(a["conv"], b["conv"], rtol=1e-4, atol=1e-6)


def test_inject_hyperparams_matches_plain(case):
  name = case["name"]
  fn, kwargs, static = CASES[name][:3]
  injected = optax.inject_hyperparams(fn, static_args=static)(**kwargs)
  got, state = run(injected, case["params"], name=name)
  for a, b in zip(got, case["updates"]):
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)
  # The learning rate can be changed through the injected state.
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  zero, _ = injected.update(grads_at(case["params"], STEPS), state,
                            case["params"],
                            **extra_at(name, case["params"], STEPS))
  assert all(float(jnp.abs(x).max()) == 0.0
             for x in jax.tree_util.tree_leaves(zero))


@pytest.mark.parametrize("case", representatives(), indirect=True)
def test_bf16_params_get_bf16_updates(case):
  params = make_params(jnp.bfloat16)
  got, state = run(build(case["name"]), params, steps=3, name=case["name"])
  for u in got:
    for leaf in jax.tree_util.tree_leaves(u):
      assert leaf.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(u)
  # Statistics stay in float32.
  for group in kronopt.engine.find_states(state)[0].groups:
    for leaf in jax.tree_util.tree_leaves(group):
      assert leaf.dtype == jnp.float32


def _counters_cleared(state):
  """``state`` with every engine's skip counters set to 0."""
  is_engine = lambda x: isinstance(x, kronopt.PreconditionerState)
  return jax.tree_util.tree_map(
      lambda x: x._replace(skipped=0, overflows=0) if is_engine(x) else x,
      state, is_leaf=is_engine)


@pytest.mark.parametrize("case", representatives(), indirect=True)
def test_nan_gradient_is_a_zero_update_that_changes_no_state(case):
  name, params = case["name"], case["params"]
  tx = build(name)
  nan_step = 2  # not a refresh step: refreshes run at counts 1 and 3.

  def grads_fn(p, t):
    g = grads_at(p, t)
    return dict(g, w=g["w"].at[0, 0].set(jnp.nan)) if t == nan_step else g

  update = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e))
  states, got = [tx.init(params)], []
  for t in range(STEPS):
    u, s = update(grads_fn(params, t), states[-1], params,
                  extra_at(name, params, t))
    states.append(s)
    got.append(u)
  chex.assert_tree_all_finite(states[-1])
  for leaf in jax.tree_util.tree_leaves(got[nan_step]):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  for t in range(STEPS):
    chex.assert_tree_all_finite(got[t])
  # Every state leaf (moments, statistics, roots, schedule counts) is
  # bit-identical across the NaN step, but the skip counter.
  chex.assert_trees_all_equal(_counters_cleared(states[nan_step + 1]),
                              _counters_cleared(states[nan_step]))
  diag = kronopt.diagnostics(states[-1])
  assert int(diag["skipped_gradients"]) == 1
  assert int(diag["refresh_failures"]) == 0


def _adamw_kwargs(case, weight_decay):
  """``optax.adamw``'s arguments equal to the case's graft and momentum."""
  params = inspect.signature(case.fn).parameters
  get = lambda k, default: case.kwargs.get(
      k, params[k].default if k in params else default)
  b2_name, eps_name = case.adamw_names
  return dict(learning_rate=case.kwargs["learning_rate"], b1=get("b1", 0.9),
              b2=get(b2_name, 0.999), eps=get(eps_name, 1e-8),
              weight_decay=weight_decay, nesterov=get("nesterov", False))


@pytest.mark.parametrize("case", representatives(), indirect=True)
def test_unpreconditioned_run_is_adamw(case):
  """Preconditioning never started: exactly ``optax.adamw`` for 20 steps."""
  name, params = case["name"], case["params"]
  spec = CASES[name]
  tx = build(name, weight_decay=0.01, **spec.unpreconditioned)
  adamw = optax.adamw(**_adamw_kwargs(spec, 0.01))
  got, _ = run(tx, params, steps=20, name=name)
  want, _ = run(adamw, params, steps=20)
  for t, (a, b) in enumerate(zip(got, want)):
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-9,
                                custom_message=f"step {t}")


@pytest.mark.parametrize("case", representatives(), indirect=True)
def test_rank_one_leaves_are_adamw_on_every_step(case):
  name, params = case["name"], case["params"]
  want, _ = run(optax.adamw(**_adamw_kwargs(CASES[name], 0.0)), params)
  for t, (a, b) in enumerate(zip(case["updates"], want)):
    chex.assert_trees_all_close(a["b"], b["b"], rtol=1e-6, atol=1e-9,
                                custom_message=f"step {t}")
