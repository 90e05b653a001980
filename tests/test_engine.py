"""The shared engine and grafting: schedule, guard, skipping, graft rules."""

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


def _stats(state):
  return engine.find_states(state)[0].groups[0].stats


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


def test_statistics_every_matches_hand_built_schedule():
  """Statistics at counts 0, 3, 6, ...: L = Σ_{t ≡ 0 mod 3} β₂^{…} G Gᵀ."""
  b2, every = 0.9, 3
  tx = kronopt.scale_by_shampoo(b2=b2, statistics_every=every,
                                precondition_every=100,
                                start_preconditioning_step=100)
  state, params = tx.init(_params()), _params()
  step = jax.jit(tx.update)
  want = np.zeros((4, 4))
  for t in range(8):
    _, state = step(_grads(t), state, params)
    if t % every == 0:
      w = np.asarray(_grads(t)["w"], np.float64)
      want = b2 * want + (1 - b2) * (w.T @ w)
    got_l = np.asarray(_stats(state)[1])[0]  # the 4×4 factor of w (6×4)
    np.testing.assert_allclose(got_l, want, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("bad, counter", [(jnp.inf, "skipped"),
                                          (1e25, "overflows")])
def test_skipped_step_changes_nothing_but_its_counter(bad, counter):
  """A non-finite gradient, or a finite one whose statistics overflow."""
  tx = kronopt.graft(kronopt.scale_by_shampoo(start_preconditioning_step=0,
                                              precondition_every=1))
  params = _params()
  state = tx.init(params)
  _, state = tx.update(_grads(0), state, params)
  bad_grads = dict(_grads(1), w=_grads(1)["w"].at[0, 0].set(bad))
  u, new_state = tx.update(bad_grads, state, params)
  for leaf in jax.tree_util.tree_leaves(u):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  old_engine = engine.find_states(state)[0]
  new_engine = engine.find_states(new_state)[0]
  assert int(getattr(new_engine, counter)) == 1
  chex.assert_trees_all_equal(
      new_state._replace(direction=None), state._replace(direction=None))
  chex.assert_trees_all_equal(
      new_engine._replace(**{counter: None}),
      old_engine._replace(**{counter: None}))


def _adam_updates(grads_seq, **kw):
  adam = optax.scale_by_adam(**kw)
  state, out = adam.init(_params()), []
  for g in grads_seq:
    u, state = adam.update(g, state)
    out.append(u)
  return out


def test_graft_rules():
  params = _params()
  tx = kronopt.graft(kronopt.scale_by_shampoo(start_preconditioning_step=2,
                                              precondition_every=1), "adam")
  state = tx.init(params)
  adam = _adam_updates([_grads(t) for t in range(4)])
  for t in range(4):
    u, state = tx.update(_grads(t), state, params)
    # Rank-1 parameters always take Adam's update.
    np.testing.assert_allclose(u["b"], adam[t]["b"], rtol=1e-6)
    if t < 2:  # before start: Adam's update itself
      np.testing.assert_allclose(u["w"], adam[t]["w"], rtol=1e-6)
    else:  # preconditioned: Adam's norm, not Adam's direction
      np.testing.assert_allclose(np.linalg.norm(u["w"]),
                                 np.linalg.norm(adam[t]["w"]), rtol=1e-5)
      assert not np.allclose(u["w"], adam[t]["w"], rtol=1e-2)


def test_graft_preconditions_the_filtered_gradient():
  """The direction is P_L m̂ P_R with statistics from the raw gradient."""
  params = _params()
  direction = kronopt.scale_by_shampoo(start_preconditioning_step=0,
                                       precondition_every=1, b2=0.9)
  tx = kronopt.graft(direction, "none", b1=0.5)
  state = tx.init(params)
  ref_state = direction.init(params)
  m = np.zeros((6, 4))
  for t in range(3):
    g = _grads(t)
    m = 0.5 * m + 0.5 * np.asarray(g["w"])
    m_hat = m / (1 - 0.5 ** (t + 1))
    u, state = tx.update(g, state, params)
    want, ref_state = direction.update(
        {"w": jnp.asarray(m_hat, jnp.float32), "b": g["b"]}, ref_state,
        params, statistics_gradient=g)
    np.testing.assert_allclose(u["w"], want["w"], rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_close(_stats(state), _stats(ref_state), rtol=1e-6)


def test_graft_none_and_custom_magnitude():
  direction = kronopt.scale_by_shampoo(start_preconditioning_step=0,
                                       precondition_every=1)
  params = _params()
  plain, _ = direction.update(_grads(0), direction.init(params), params)
  tx = kronopt.graft(direction, "none", b1=0.0)
  u, _ = tx.update(_grads(0), tx.init(params), params)
  chex.assert_trees_all_close(u, plain)
  tx = kronopt.graft(direction, optax.scale(-2.0), b1=0.0)
  u, _ = tx.update(_grads(0), tx.init(params), params)
  np.testing.assert_allclose(np.linalg.norm(u["w"]),
                             2 * np.linalg.norm(_grads(0)["w"]), rtol=1e-5)
  np.testing.assert_allclose(u["b"], -2.0 * _grads(0)["b"], rtol=1e-6)


@pytest.mark.parametrize("magnitude, reference", [
    ("adagrad", optax.scale_by_rss(initial_accumulator_value=0.0, eps=1e-8)),
    ("rmsprop", optax.scale_by_rms(decay=0.999, eps=1e-8, initial_scale=0.0)),
    ("sgd", optax.identity())])
def test_graft_magnitudes_match_their_optax_norms(magnitude, reference):
  params = _params()
  tx = kronopt.graft(kronopt.scale_by_shampoo(start_preconditioning_step=0,
                                              precondition_every=1),
                     magnitude, b1=0.0)
  state, ref_state = tx.init(params), reference.init(params)
  for t in range(3):
    u, state = tx.update(_grads(t), state, params)
    ur, ref_state = reference.update(_grads(t), ref_state, params)
    np.testing.assert_allclose(np.linalg.norm(u["w"]),
                               np.linalg.norm(ur["w"]), rtol=1e-5)
    np.testing.assert_allclose(u["b"], ur["b"], rtol=1e-5)


def test_uncovered_leaves_take_the_magnitude():
  """A leaf the layout leaves out (max_precond_dim) is Adam's, not grafted."""
  params = {"w": jnp.ones((6, 4)), "e": jnp.ones((40, 12))}
  grads = {"w": _grads(0)["w"], "e": jnp.linspace(-1, 1, 480).reshape(40, 12)}
  tx = kronopt.graft(kronopt.scale_by_shampoo(
      start_preconditioning_step=0, precondition_every=1, max_precond_dim=8))
  u, _ = tx.update(grads, tx.init(params), params)
  adam, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(
      params))
  np.testing.assert_allclose(u["e"], adam["e"], rtol=1e-6)
  assert not np.allclose(u["w"], adam["w"], rtol=1e-2)


def test_graft_norm_survives_tiny_and_huge_scales():
  """Float32 norms without under/overflow from 1e-30 to 1e30."""
  for scale in (1e-30, 1e-20, 1e20, 1e30):
    x = jnp.full((3, 5, 4), scale, jnp.float32)
    np.testing.assert_allclose(grafting._norms(x), np.sqrt(20) * scale,
                               rtol=1e-5)


def test_state_for_another_tree_is_a_clear_error():
  tx = kronopt.shampoo(1e-3, block_size=8)
  state = tx.init({"w": jnp.ones((12, 20))})
  with pytest.raises(ValueError, match="initialised for another"):
    tx.update({"w": jnp.ones((12, 24))}, state, {"w": jnp.ones((12, 24))})


def test_state_cast_to_bfloat16_still_updates():
  tx = kronopt.shampoo(1e-3, block_size=8, precondition_every=1,
                       start_preconditioning_step=0)
  params = _params()
  state = optax.tree_utils.tree_cast(tx.init(params), jnp.bfloat16)
  update = jax.jit(tx.update)
  for t in range(2):
    u, state = update(_grads(t), state, params)
    chex.assert_tree_all_finite(u)
  found = engine.find_states(state)[0]
  assert found.count.dtype == jnp.int32 and int(found.count) == 2
  assert found.groups[0].stats[0].dtype == jnp.bfloat16


class _CountsRefreshes:
  """An algorithm whose state counts, per block, the refreshes it received."""

  def init_group(self, block_shape, n, axes=None):
    del block_shape, axes
    return (jnp.zeros([n], jnp.int32),)

  def update_statistics(self, state, g, ctx=None):
    del g, ctx
    return state

  def refresh(self, state, ctx=None):
    del ctx
    return (state[0] + 1,), jnp.zeros(state[0].shape, jnp.float32)

  def precondition(self, state, g, ctx=None):
    del state, ctx
    return g


@pytest.mark.parametrize("every", [1, 3, 4])
def test_staggered_refresh_refreshes_every_block_once_per_period(every):
  # Groups of 9 (4×4 blocks of an 8×14 and a 4×4 leaf), 1 (2×4), 1 (3×3).
  params = {"a": jnp.ones((8, 14)), "b": jnp.ones((4, 4)),
            "c": jnp.ones((2, 4)), "d": jnp.ones((3, 3))}
  tx = engine.preconditioner_transform(
      _CountsRefreshes(), block_size=4, precondition_every=every,
      start_preconditioning_step=2, inverse_failure_threshold=0.1,
      staggered_refresh=True)
  state = tx.init(params)
  update = jax.jit(tx.update)
  sizes = [g[0].shape[0] for g in state.groups]
  assert sorted(sizes) == [1, 1, 9]
  for periods in range(1, 3):
    steps = 2 + every * periods if periods == 1 else every
    for _ in range(steps):
      _, state = update(params, state)
    for g in state.groups:
      np.testing.assert_array_equal(g[0], periods)
