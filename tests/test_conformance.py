"""Optax conformance of every kronopt optimizer (DESIGN.md, Contracts).

Each optimizer is registered once in ``CASES``; every contract test runs for
all of them. Shapes are tiny and ``block_size`` small so that the layout has
merging, splitting, padding, a rank-1 parameter and an order-3 block.
"""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import kronopt
import kronopt.engine

LAYOUT_STATIC = ("block_size", "precondition_every",
                 "start_preconditioning_step")
COMMON = dict(learning_rate=1e-2, block_size=4, precondition_every=2,
              start_preconditioning_step=1)

# name -> (ready-made optimizer, keyword arguments, static args for
# optax.inject_hyperparams).
CASES = {
    "shampoo": (kronopt.shampoo, dict(COMMON), LAYOUT_STATIC),
    "shampoo_newton": (kronopt.shampoo, dict(COMMON, root_method="newton"),
                       LAYOUT_STATIC),
    "kradagrad_star": (kronopt.kradagrad, dict(COMMON, epsilon=0.1),
                       LAYOUT_STATIC),
    "kradagrad_single_axis": (
        kronopt.kradagrad,
        dict(COMMON, variant="single_axis", epsilon=0.01), LAYOUT_STATIC),
    "shampoo2": (kronopt.shampoo2, dict(COMMON), LAYOUT_STATIC),
    "caspr": (kronopt.caspr, dict(COMMON), LAYOUT_STATIC),
    "sketchy": (kronopt.sketchy, dict(COMMON, rank=2),
                LAYOUT_STATIC + ("rank",)),
}

STEPS = 4


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
  fn, kwargs, _ = CASES[name]
  return fn(**{**kwargs, **overrides})


def run(tx, params, steps=STEPS, grads_fn=grads_at, jit=True, **extra):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  out = []
  for t in range(steps):
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

  def counted_update(g, s, p):
    trace_count.append(1)
    return tx.update(g, s, p)

  update = jax.jit(counted_update)
  states, updates = [tx.init(params)], []
  for t in range(STEPS):
    u, s = update(grads_at(params, t), states[-1], params)
    states.append(s)
    updates.append(u)
  return dict(name=name, tx=tx, params=params, states=states,
              updates=updates, traces=len(trace_count))


def test_state_structure_is_stable(case):
  ref = structure(case["states"][0])
  for s in case["states"][1:]:
    assert structure(s) == ref
  eager_updates, eager_state = case["tx"].update(
      grads_at(case["params"], 0), case["states"][0], case["params"])
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


def test_unknown_extra_args_are_ignored(case):
  tx, params = case["tx"], case["params"]
  state = case["states"][1]
  g = grads_at(params, 1)
  with_extra, _ = tx.update(g, state, params, some_unknown_arg=3.0)
  chex.assert_trees_all_close(with_extra, case["updates"][1], rtol=1e-5,
                              atol=1e-7)


def test_inside_chain_and_multisteps(case):
  name, params = case["name"], case["params"]
  chained = optax.chain(optax.clip_by_global_norm(1e6), build(name))
  got, _ = run(chained, params)
  for a, b in zip(got, case["updates"]):
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)
  multi = optax.MultiSteps(build(name), every_k_schedule=2)
  got, state = run(multi, params)
  chex.assert_tree_all_finite(got)
  # Updates are emitted only on every second step.
  assert all(float(jnp.abs(u["w"]).max()) == 0.0 for u in got[0::2])
  assert all(float(jnp.abs(u["w"]).max()) > 0.0 for u in got[1::2])
  assert int(kronopt.diagnostics(state)["count"]) == STEPS // 2


def test_inside_masked_and_partition(case):
  name, params = case["name"], case["params"]
  mask = {"w": True, "b": False, "conv": True}
  got, _ = run(optax.masked(build(name), mask), params)
  ref = case["updates"]
  for a, b, t in zip(got, ref, range(STEPS)):
    chex.assert_trees_all_close(a["w"], b["w"], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(a["b"], grads_at(params, t)["b"])
  labels = {"w": "kron", "b": "adam", "conv": "kron"}
  part = optax.partition({"kron": build(name), "adam": optax.adam(1e-2)},
                         labels)
  got, _ = run(part, params)
  for a, b in zip(got, ref):
    chex.assert_trees_all_close(a["w"], b["w"], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(a["conv"], b["conv"], rtol=1e-4, atol=1e-6)


def test_inject_hyperparams_matches_plain(case):
  fn, kwargs, static = CASES[case["name"]]
  injected = optax.inject_hyperparams(fn, static_args=static)(**kwargs)
  got, state = run(injected, case["params"])
  for a, b in zip(got, case["updates"]):
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)
  # The learning rate can be changed through the injected state.
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  zero, _ = injected.update(grads_at(case["params"], STEPS), state,
                            case["params"])
  assert all(float(jnp.abs(x).max()) == 0.0
             for x in jax.tree_util.tree_leaves(zero))


def test_bf16_params_get_bf16_updates(case):
  params = make_params(jnp.bfloat16)
  got, state = run(build(case["name"]), params, steps=3)
  for u in got:
    for leaf in jax.tree_util.tree_leaves(u):
      assert leaf.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(u)
  # Statistics stay in float32.
  for group in kronopt.engine.find_states(state)[0].groups:
    for leaf in jax.tree_util.tree_leaves(group):
      assert leaf.dtype == jnp.float32


def test_nan_gradient_is_skipped_and_counted(case):
  tx, params = build(case["name"]), case["params"]
  nan_step = 2  # not a refresh step: refreshes run at counts 1 and 3.

  def grads_fn(p, t):
    g = grads_at(p, t)
    return dict(g, w=g["w"].at[0, 0].set(jnp.nan)) if t == nan_step else g

  update = jax.jit(tx.update)
  states, got = [tx.init(params)], []
  for t in range(STEPS):
    u, s = update(grads_fn(params, t), states[-1], params)
    states.append(s)
    got.append(u)
  chex.assert_tree_all_finite(states[-1])
  # The NaN step's update is finite (momentum only: the graft emits zero).
  for t in range(STEPS):
    chex.assert_tree_all_finite(got[t])
    assert float(jnp.abs(got[t]["w"]).max()) > 0.0
  # The NaN step left every statistic and root as it was.
  before = kronopt.engine.find_states(states[nan_step])[0]
  after = kronopt.engine.find_states(states[nan_step + 1])[0]
  chex.assert_trees_all_equal(after.groups, before.groups)
  diag = kronopt.diagnostics(states[-1])
  assert int(diag["skipped_gradients"]) == 1
  assert int(diag["refresh_failures"]) == 0
