"""The shared engine and grafting: schedule, guard, NaN skipping, graft rules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronopt
from kronopt import engine
from kronopt import grafting


def _params():
  return {"w": jnp.ones((6, 4)), "b": jnp.ones((4,))}


def _grads(t):
  k1, k2 = jax.random.split(jax.random.PRNGKey(t))
  return {"w": jax.random.normal(k1, (6, 4)), "b": jax.random.normal(k2, (4,))}


def _roots(state):
  return engine.find_states(state)[0].groups[0].roots


def test_refresh_schedule_and_preconditioned_flag():
  tx = kronopt.scale_by_shampoo(precondition_every=3,
                                start_preconditioning_step=2)
  state, params = tx.init(_params()), _params()
  step = jax.jit(tx.update)
  changed, flags = [], []
  for t in range(9):
    before = _roots(state)
    d, state = step(_grads(t), state, params)
    changed.append(not np.allclose(before[0], _roots(state)[0]))
    flags.append(bool(state.preconditioned))
    if t < 2:  # before start: the direction is the gradient itself
      chex.assert_trees_all_close(d, _grads(t))
  assert changed == [False, False, True, False, False, True, False, False,
                     True]
  assert flags == [False, False] + [True] * 7


def test_guard_rejects_roots_and_counts():
  # Newton with one iteration cannot reach a residual of 1e-9: every refresh
  # is rejected, the roots stay the identity and each rejection is counted.
  tx = kronopt.scale_by_shampoo(
      root_method="newton", newton_max_iters=1, inverse_failure_threshold=1e-9,
      precondition_every=1, start_preconditioning_step=0)
  state, params = tx.init(_params()), _params()
  for t in range(3):
    _, state = tx.update(_grads(t), state, params)
  for r in _roots(state):
    np.testing.assert_array_equal(r, np.broadcast_to(np.eye(r.shape[-1]),
                                                     r.shape))
  diag = kronopt.diagnostics(state)
  assert int(diag["refresh_failures"]) == 3  # one block, three refreshes
  assert float(diag["worst_residual"]) > 1e-9


def test_non_finite_gradient_gives_zero_direction_and_keeps_state():
  tx = kronopt.graft(kronopt.scale_by_shampoo(start_preconditioning_step=0,
                                              precondition_every=1))
  params = _params()
  state = tx.init(params)
  _, state = tx.update(_grads(0), state, params)
  bad = dict(_grads(1), b=jnp.array([1.0, jnp.inf, 0.0, 0.0]))
  u, new_state = tx.update(bad, state, params)
  for leaf in jax.tree_util.tree_leaves(u):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  chex.assert_trees_all_equal(new_state.magnitude, state.magnitude)
  chex.assert_trees_all_equal(new_state.direction.groups,
                              state.direction.groups)
  assert int(new_state.direction.skipped) == 1


def test_graft_rules():
  params = _params()
  adam = optax.scale_by_adam()
  tx = kronopt.graft(kronopt.scale_by_shampoo(start_preconditioning_step=2,
                                              precondition_every=1), "adam")
  state, adam_state = tx.init(params), adam.init(params)
  for t in range(4):
    u, state = tx.update(_grads(t), state, params)
    ua, adam_state = adam.update(_grads(t), adam_state, params)
    # Rank-1 parameters always take Adam's update.
    np.testing.assert_allclose(u["b"], ua["b"], rtol=1e-6)
    if t < 2:  # before start: Adam's update itself
      np.testing.assert_allclose(u["w"], ua["w"], rtol=1e-6)
    else:  # preconditioned: Adam's norm, not Adam's direction
      np.testing.assert_allclose(np.linalg.norm(u["w"]),
                                 np.linalg.norm(ua["w"]), rtol=1e-5)
      assert not np.allclose(u["w"], ua["w"], rtol=1e-2)


def test_graft_none_and_custom_magnitude():
  direction = kronopt.scale_by_shampoo(start_preconditioning_step=0,
                                       precondition_every=1)
  params = _params()
  plain, _ = direction.update(_grads(0), direction.init(params), params)
  tx = kronopt.graft(direction, "none")
  u, _ = tx.update(_grads(0), tx.init(params), params)
  chex.assert_trees_all_close(u, plain)
  tx = kronopt.graft(direction, optax.scale(-2.0))
  u, _ = tx.update(_grads(0), tx.init(params), params)
  np.testing.assert_allclose(np.linalg.norm(u["w"]),
                             2 * np.linalg.norm(_grads(0)["w"]), rtol=1e-5)
  np.testing.assert_allclose(u["b"], -2.0 * _grads(0)["b"], rtol=1e-6)


@pytest.mark.parametrize("magnitude", ["adagrad", "rmsprop", "sgd"])
def test_graft_magnitudes_match_their_norms(magnitude):
  params = _params()
  ref = grafting.magnitude_transform(magnitude)
  tx = kronopt.graft(kronopt.scale_by_shampoo(start_preconditioning_step=0,
                                              precondition_every=1), magnitude)
  u, _ = tx.update(_grads(0), tx.init(params), params)
  ur, _ = ref.update(_grads(0), ref.init(params), params)
  np.testing.assert_allclose(np.linalg.norm(u["w"]), np.linalg.norm(ur["w"]),
                             rtol=1e-5)
