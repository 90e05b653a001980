"""Sharded Shampoo on a device mesh, and a small benchmark of it.

A 2×4 mesh ``("data", "model")``: the parameters are FSDP-sharded over
``"data"``, the batch too, and Shampoo's stacked blocks over ``"model"`` (each
device stores and refreshes a quarter of them). On CPU, 8 devices are
simulated (the flag is set here if it is not set already):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m experiments.sharded_example            # train, print loss
    python -m experiments.sharded_example --bench         # timings

``--bench`` measures (1) the refresh (all inverse roots) of the model's
blocks, unsharded on one device and sharded over 8 devices, and (2) the
sharded training step of Shampoo against ``optax.adam`` under the same
sharding. Simulated CPU devices share the machine's cores, so they show the
mechanics and the overhead, not a speed-up.

The roots use ``root_method="newton"`` (matmuls only, the GPU/TPU fast path);
``eigh`` works too (on CPU it decomposes one matrix at a time, see
:mod:`kronopt.linalg.lapack`).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import argparse  # pylint: disable=g-import-not-at-top,g-bad-import-order
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import kronopt
from kronopt import engine
from kronopt.preconditioners import shampoo as shampoo_lib

WIDTHS = (64, 256, 256, 10)
BLOCK = 64
ROOT_METHOD = "newton"


def init_mlp(key, widths=WIDTHS):
  params = {}
  for i, (m, n) in enumerate(zip(widths[:-1], widths[1:])):
    key, sub = jax.random.split(key)
    params[f"w{i}"] = jax.random.normal(sub, (m, n)) / np.sqrt(m)
    params[f"b{i}"] = jnp.zeros((n,))
  return params


def loss_fn(params, x, y):
  h = x
  for i in range(len(WIDTHS) - 1):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < len(WIDTHS) - 2:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def make_mesh():
  return jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto, AxisType.Auto))


def fsdp(mesh, params):
  """Matrices sharded over "data" along their first axis; biases replicated."""
  return {k: NamedSharding(mesh, P("data") if v.ndim == 2 else P())
          for k, v in params.items()}


def make_train_step(tx, param_sh, state_sh, batch_sh):
  """The jitted step, with every output's sharding pinned."""
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return jax.jit(step, in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
                 out_shardings=(param_sh, state_sh, None),
                 donate_argnums=(0, 1))


def setup(tx, mesh, batch=128):
  """Sharded params, state, data and the jitted step for ``tx``."""
  params = init_mlp(jax.random.PRNGKey(0))
  param_sh = fsdp(mesh, params)
  state_sh = kronopt.state_shardings(tx, params, mesh)
  batch_sh = NamedSharding(mesh, P("data"))
  digits = load_digits()
  x = jnp.asarray(digits.data[:batch] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:batch])
  params = jax.device_put(params, param_sh)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  step = make_train_step(tx, param_sh, state_sh, batch_sh)
  return params, state, jax.device_put(x, batch_sh), jax.device_put(
      y, batch_sh), step


def train(steps=50):
  mesh = make_mesh()
  tx = kronopt.shampoo(3e-3, block_size=BLOCK, precondition_every=10,
                       start_preconditioning_step=5, root_method=ROOT_METHOD,
                       shard_axis="model", mesh=mesh)
  params, state, x, y, step = setup(tx, mesh)
  for t in range(steps):
    params, state, loss = step(params, state, x, y)
    if t % 10 == 0 or t == steps - 1:
      print(f"step {t:3d}  loss {float(loss):.4f}")
  groups = engine.find_states(state)[0].groups
  root = groups[0].roots[0]
  print(f"stacked roots {root.shape}, sharding {root.sharding.spec}, "
        f"per device {root.addressable_shards[0].data.shape}")
  print("diagnostics", {k: float(v)
                        for k, v in kronopt.diagnostics(state).items()})


def _time(fn, *args, repeats=5):
  """Median seconds of ``fn(*args)`` after a warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench_refresh(root_method, n=64, d=BLOCK):
  """The refresh of ``n`` random ``d×d`` statistics: 1 device vs 8."""
  precond = shampoo_lib.Shampoo(root_method=root_method)
  g = jax.random.normal(jax.random.PRNGKey(1), (n, d, 2 * d))
  state = precond.update_statistics(precond.init_group((d, 2 * d), n), g)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  refresh = jax.jit(lambda s: engine.guarded_refresh(precond, [s], 0.1))
  one = _time(refresh, jax.device_put(state, jax.devices()[0]))
  sharded = jax.device_put(state, NamedSharding(mesh, P("x")))
  eight = _time(refresh, sharded)
  return one, eight


def bench_step(steps=20):
  """Sharded step time of Shampoo (refresh every 10) and of optax.adam."""
  mesh = make_mesh()
  out = {}
  for name, tx in (
      ("adam", optax.adam(1e-3)),
      ("shampoo", kronopt.shampoo(1e-3, block_size=BLOCK,
                                  precondition_every=10,
                                  start_preconditioning_step=1,
                                  root_method=ROOT_METHOD,
                                  shard_axis="model", mesh=mesh))):
    params, state, x, y, step = setup(tx, mesh)
    params, state, _ = step(params, state, x, y)  # compile
    jax.block_until_ready(params)
    start = time.perf_counter()
    for _ in range(steps):
      params, state, loss = step(params, state, x, y)
    jax.block_until_ready(loss)
    out[name] = (time.perf_counter() - start) / steps
  return out


def bench():
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices on "
        f"{os.cpu_count()} cores (simulated devices share the cores: no "
        "real speed-up is possible here)")
  for method in ("eigh", "newton"):
    one, eight = bench_refresh(method)
    print(f"refresh of 64 blocks 64x128 ({method} roots of L and R): "
          f"1 device {one * 1e3:.1f} ms, sharded over 8 {eight * 1e3:.1f} ms "
          f"(ratio {eight / one:.2f})")
  steps = bench_step()
  print(f"sharded step on a 2x4 mesh (FSDP over data, blocks over model, "
        f"{ROOT_METHOD} roots every 10 steps): "
        f"adam {steps['adam'] * 1e3:.2f} ms, shampoo "
        f"{steps['shampoo'] * 1e3:.2f} ms "
        f"(ratio {steps['shampoo'] / steps['adam']:.2f})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bench", action="store_true")
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()
  if args.bench:
    bench()
  else:
    train(args.steps)


if __name__ == "__main__":
  main()
