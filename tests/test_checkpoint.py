"""Checkpointing with orbax (docs/checkpointing.md).

A run is saved at step ``SAVE_AT``, restored into a fresh abstract target
(``jax.eval_shape(tx.init, params)``), continued by a freshly built optimizer
and jitted step (as in a new process) and compared bit for bit with the
uninterrupted run: parameters and every state leaf (bytes, dtype, shape) and
the tree structure. The same through Flax NNX's ``nnx.Optimizer``
(``nnx.state`` saved, ``nnx.eval_shape`` + ``nnx.split`` as the target,
``nnx.merge`` to resume), and for a state sharded over two devices, restored
with ``kronopt.state_shardings``: JAX only creates the devices when
``XLA_FLAGS`` is set before it starts, so that check runs this file as a
script in a subprocess.

The run crosses the save point with refreshes on both sides
(``precondition_every=2`` from count 1: counts 1, 3, 5), a learning-rate
schedule (its count is state too) and weight decay.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import kronopt

sys.path.insert(0, os.path.dirname(__file__))
import fast_jit  # noqa: E402
from fast_jit import jit  # noqa: E402  (cheap XLA options; both compared runs)

STEPS = 6
SAVE_AT = 3
SIZES = (5, 6)  # one dense layer: 4 zero-padded 4×4 blocks, and a bias


def make_tx(name, **sharding):
  """The optimizers under test; built anew for every (simulated) process."""
  common = dict(block_size=4, start_preconditioning_step=1, weight_decay=1e-3,
                **sharding)
  schedule = optax.cosine_decay_schedule(3e-2, decay_steps=10)
  if name == "shampoo":
    return kronopt.shampoo(schedule, precondition_every=2, **common)
  if name == "sketchy":
    return kronopt.sketchy(schedule, rank=2, precondition_every=2, **common)
  raise ValueError(name)


def init_params():
  """A 5→6 tanh layer: its kernel is split into zero-padded 4×4 blocks."""
  key = jax.random.PRNGKey(0)
  return {"kernel": jax.random.normal(key, SIZES) / 2,
          "bias": jnp.zeros(SIZES[1])}


def batch_at(t):
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), t))
  return (jax.random.normal(kx, (8, SIZES[0])),
          jax.random.normal(ky, (8, SIZES[1])))


def loss_fn(params, x, y):
  return jnp.mean((jnp.tanh(x @ params["kernel"] + params["bias"]) - y) ** 2)


def make_step(tx, **jit_kwargs):
  """The jitted training step ``(params, state, t) -> (params, state)``."""
  def step(params, state, t):
    grads = jax.grad(loss_fn)(params, *batch_at(t))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jit(step, **jit_kwargs)


def assert_bitwise_equal(got, want):
  """Same tree structure; every leaf the same dtype, shape and bytes."""
  assert (jax.tree_util.tree_structure(got)
          == jax.tree_util.tree_structure(want))
  for path, a, b in zip(
      [jax.tree_util.keystr(p)
       for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]],
      jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), path
    assert a.tobytes() == b.tobytes(), path


def save(directory, step, tree):
  with ocp.CheckpointManager(directory) as manager:
    manager.save(step, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()


def restore_latest(directory, target):
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))


@pytest.mark.parametrize("name", ["shampoo", "sketchy"])
def test_resume_from_a_checkpoint_is_bit_identical(name, tmp_path):
  tx = make_tx(name)
  step = make_step(tx)
  params = init_params()
  state = jax.jit(tx.init)(params)
  for t in range(STEPS):
    if t == SAVE_AT:
      save(tmp_path, t, {"params": params, "opt_state": state})
      saved = state
    params, state = step(params, state, jnp.asarray(t))
  want = (params, state)

  # A new process: a fresh optimizer, a fresh abstract target, a fresh jit.
  tx = make_tx(name)
  abstract_params = jax.eval_shape(init_params)
  target = {"params": abstract_params,
            "opt_state": jax.eval_shape(tx.init, abstract_params)}
  at, restored = restore_latest(tmp_path, target)
  assert at == SAVE_AT
  assert_bitwise_equal(restored["opt_state"], saved)
  assert int(kronopt.diagnostics(restored["opt_state"])["count"]) == SAVE_AT
  step = make_step(tx)
  params, state = restored["params"], restored["opt_state"]
  for t in range(SAVE_AT, STEPS):
    params, state = step(params, state, jnp.asarray(t))
  assert_bitwise_equal((params, state), want)
  diag = kronopt.diagnostics(state)
  assert int(diag["count"]) == STEPS and bool(diag["preconditioned"])
  assert int(diag["refresh_failures"]) == 0


def test_nnx_optimizer_round_trip(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def create():
    model = nnx.Linear(*SIZES, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, make_tx("shampoo"), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, t):
    x, y = batch_at(t)
    grads = nnx.grad(lambda m: jnp.mean((jnp.tanh(m(x)) - y) ** 2))(model)
    optimizer.update(model, grads)

  pure = lambda *objs: [nnx.to_pure_dict(nnx.state(o)) for o in objs]
  model, optimizer = nnx.jit(create)()
  for t in range(STEPS):
    if t == SAVE_AT:
      save(tmp_path, t, {"model": nnx.state(model),
                         "optimizer": nnx.state(optimizer)})
      saved = pure(model, optimizer)
      saved_diag = kronopt.diagnostics(optimizer)
    train_step(model, optimizer, jnp.asarray(t))

  abstract_model, abstract_optimizer = nnx.eval_shape(create)
  model_def, model_target = nnx.split(abstract_model)
  optimizer_def, optimizer_target = nnx.split(abstract_optimizer)
  _, restored = restore_latest(
      tmp_path, {"model": model_target, "optimizer": optimizer_target})
  resumed_model = nnx.merge(model_def, restored["model"])
  resumed = nnx.merge(optimizer_def, restored["optimizer"])
  assert_bitwise_equal(pure(resumed_model, resumed), saved)
  # The optax state is back in its NamedTuples, readable as usual.
  assert isinstance(resumed.opt_state[0], kronopt.GraftState)
  for key, value in kronopt.diagnostics(resumed.opt_state).items():
    np.testing.assert_array_equal(value, saved_diag[key], err_msg=key)
  for t in range(SAVE_AT, STEPS):
    train_step(resumed_model, resumed, jnp.asarray(t))
  assert_bitwise_equal(pure(resumed_model, resumed), pure(model, optimizer))


def sharded_round_trip(directory):
  """Run by the subprocess on 2 devices; raises on any mismatch."""
  from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  assert jax.device_count() == 2, jax.devices()
  mesh = jax.make_mesh((2,), ("model",), axis_types=(AxisType.Auto,))
  tx = make_tx("shampoo", shard_axis="model", mesh=mesh)
  params = init_params()
  param_sh = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), params)
  state_sh = kronopt.state_shardings(tx, params, mesh)
  step = make_step(tx, out_shardings=(param_sh, state_sh))
  params = jax.device_put(params, param_sh)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  for t in range(STEPS):
    if t == SAVE_AT:
      save(directory, t, {"params": params, "opt_state": state})
      saved = state
    params, state = step(params, state, jnp.asarray(t))
  want = (params, state)

  # The target, from a freshly built optimizer: shapes and dtypes from
  # eval_shape, shardings from kronopt.state_shardings.
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                    sharding=s)
  tx = make_tx("shampoo", shard_axis="model", mesh=mesh)
  abstract_params = jax.tree_util.tree_map(
      with_sharding, jax.eval_shape(init_params), param_sh)
  state_sh = kronopt.state_shardings(tx, abstract_params, mesh)
  target = {
      "params": abstract_params,
      "opt_state": jax.tree_util.tree_map(
          with_sharding, jax.eval_shape(tx.init, abstract_params), state_sh)}
  _, restored = restore_latest(directory, target)
  assert_bitwise_equal(restored["opt_state"], saved)
  sharded = 0
  for got, want_sh in zip(jax.tree_util.tree_leaves(restored["opt_state"]),
                          jax.tree_util.tree_leaves(state_sh)):
    assert got.sharding.is_equivalent_to(want_sh, got.ndim), (got.sharding,
                                                              want_sh)
    sharded += want_sh.spec == P("model")
  assert sharded >= 4, sharded  # the stacked statistics and roots
  # The compiled step is reused (the in-process tests recompile theirs).
  params, state = restored["params"], restored["opt_state"]
  for t in range(SAVE_AT, STEPS):
    params, state = step(params, state, jnp.asarray(t))
  assert_bitwise_equal((params, state), want)


def test_sharded_state_round_trip_on_two_devices(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=("--xla_force_host_platform_device_count=2 "
                        + fast_jit.XLA_FLAGS))
  proc = subprocess.run([sys.executable, __file__, str(tmp_path)],
                        capture_output=True, text=True, env=env, timeout=300,
                        check=False)
  assert proc.returncode == 0 and "PASS" in proc.stdout, (
      proc.stdout + proc.stderr)


if __name__ == "__main__":
  sharded_round_trip(sys.argv[1])
  print("PASS sharded_round_trip")
