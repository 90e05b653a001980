"""Benchmark: kronopt optimizers against ``optax.adam`` on this machine.

``python -m experiments.bench [--quick] [--out results/bench.json]``

Every number is a ratio against ``optax.adam`` measured in the same run:

* **Step time** of the jitted train step (loss, grad, ``tx.update``,
  ``apply_updates``) on an MLP 784-1024-1024-10 with a random batch of 512,
  amortized over ``max(2·precondition_every, 20)`` consecutive steps (so it
  covers whole refresh periods), median over repeats, after a warm-up past
  the first refresh. Adam is re-timed next to each optimizer. Next to it, the
  FLOP floor ``1 + (statistics + preconditioning flops) / (6·batch·params)``
  of the optimizer's layout.
* **Compile time** of the train step of a 4-layer and a 48-layer MLP (width
  256), ``jit(...).lower(...).compile()``, for the first registry entry of
  each optimizer name; the 48/4 ratio is compared to Adam's.
* **State bytes** per parameter byte, with the bytes the layout predicts.

Optimizers are the dicts of :data:`REGISTRY` (built by
:func:`experiments.optimizers.build`); another optimizer is one more line.
Timings live here and in the JSON this writes, never in tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronopt
from experiments import optimizers
from kronopt.preconditioners import soap as soap_lib

LEARNING_RATE = 1e-3
BASELINE = {"name": "adam"}

REGISTRY = [
    {"name": "shampoo", "block_size": block, "precondition_every": every,
     "root_method": method}
    for block in (256, 1024) for method in ("eigh", "newton")
    for every in (1, 10, 100)
]
# The rest of the family, each at the settings its issue asks for.
FAMILY = [
    {"name": "shampoo2", "block_size": 256, "precondition_every": 10},
    {"name": "shampoo2", "block_size": 1024, "precondition_every": 10},
    {"name": "shampoo2", "block_size": 256, "precondition_every": 10,
     "kronecker_power_iterations": True},
    {"name": "caspr", "block_size": 256, "precondition_every": 10},
    {"name": "caspr", "block_size": 1024, "precondition_every": 10},
    {"name": "sketchy", "rank": 16, "block_size": 1024, "precondition_every": 1,
     "fd_method": "randomized"},
    {"name": "sketchy", "rank": 64, "block_size": 1024, "precondition_every": 1,
     "fd_method": "randomized"},
    {"name": "sketchy", "rank": 256, "block_size": 1024,
     "precondition_every": 1, "fd_method": "randomized"},
    {"name": "sketchy", "rank": 16, "block_size": 1024, "precondition_every": 1,
     "fd_method": "exact"},
    {"name": "sketchy", "rank": 64, "block_size": 1024, "precondition_every": 1,
     "fd_method": "exact"},
    {"name": "sketchy", "rank": 256, "block_size": 1024,
     "precondition_every": 1, "fd_method": "exact"},
    {"name": "kradagrad", "block_size": 128, "precondition_every": 10},
    {"name": "kradagrad", "block_size": 256, "precondition_every": 10},
    {"name": "kradagrad", "block_size": 1024, "precondition_every": 10},
    {"name": "soap", "block_size": 256, "precondition_every": 10},
    {"name": "soap", "block_size": 1024, "precondition_every": 10},
]
REGISTRY = REGISTRY + FAMILY
QUICK = [spec for spec in REGISTRY
         if spec["name"] == "shampoo" and spec["precondition_every"] == 10
         and spec["root_method"] == "eigh"]

# Largest amortized step-time ratio, keyed by (block_size, precondition_every).
STEP_TARGETS = {(256, 10): 2.0, (1024, 10): 4.0}
COMPILE_TARGET = 1.5  # shampoo's 48/4 compile ratio ≤ this × adam's.

WIDTHS = (1024, 1024)
INPUT_DIM, NUM_CLASSES, BATCH = 784, 10, 512
MIN_WINDOW = 20
COMPILE_WIDTH, COMPILE_DEPTHS, COMPILE_BATCH = 256, (4, 48), 64


class MLP(nn.Module):
  """ReLU layers of widths ``hidden``, then a linear layer to the logits."""
  hidden: tuple[int, ...]
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def problem(hidden, input_dim, batch, seed=0):
  """``(model, params, x, y)``: an MLP and one random batch."""
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (batch, input_dim), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, NUM_CLASSES)
  model = MLP(tuple(hidden))
  return model, model.init(kp, x), x, y


def make_step(model, tx) -> Callable:
  """``(params, opt_state, x, y) -> (params, opt_state, loss)``, not jitted."""
  def loss_fn(params, x, y):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def build(spec):
  return optimizers.build({"learning_rate": LEARNING_RATE, **spec})


class Stepper:
  """A compiled, warmed-up train step of one optimizer on one problem."""

  def __init__(self, spec, model, params, x, y):
    tx = build(spec)
    self._step = jax.jit(make_step(model, tx), donate_argnums=(0, 1))
    self._carry = (jax.tree_util.tree_map(jnp.copy, params), tx.init(params))
    self._batch = (x, y)
    # Past the default start_preconditioning_step (10) and its first refresh.
    self.run(spec.get("start_preconditioning_step", 10) + 1)

  def run(self, steps: int) -> None:
    for _ in range(steps):
      params, opt_state, _ = self._step(*self._carry, *self._batch)
      self._carry = (params, opt_state)
    jax.block_until_ready(self._carry)

  def time(self, window: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per step over ``window``."""
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      self.run(window)
      times.append((time.perf_counter() - start) / window)
    return statistics.median(times)


def window(spec) -> int:
  """Consecutive steps timed: at least two whole refresh periods."""
  return max(2 * spec.get("precondition_every", 1), MIN_WINDOW)


def num_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flop_floor(spec, params, batch) -> Optional[float]:
  """``1 + Σ_blocks Σ_axes 4·d·|block| / (6·batch·params)``, or ``None``.

  Per block of shape ``m×n``: statistics ``2m²n + 2mn²`` and preconditioning
  ``P_L G P_R`` another ``2m²n + 2mn²`` flops.
  """
  if spec["name"] not in ("shampoo", "shampoo2"):  # the formula's algorithm
    return None
  lay = kronopt.make_layout(params, spec["block_size"])
  extra = sum(n * 4 * math.prod(shape) * sum(shape)
              for shape, n in zip(lay.group_shapes, lay.group_sizes))
  return 1.0 + extra / (6 * batch * num_params(params))


def target(spec) -> Optional[float]:
  return STEP_TARGETS.get((spec.get("block_size"),
                           spec.get("precondition_every")))


def bench_step_time(specs, repeats):
  """Per spec: its seconds per step, Adam's right before, ratio, floor."""
  model, params, x, y = problem(WIDTHS, INPUT_DIM, BATCH)
  adam = Stepper(BASELINE, model, params, x, y)
  rows = []
  for spec in specs:
    stepper = Stepper(spec, model, params, x, y)
    base = adam.time(window(spec), repeats)
    seconds = stepper.time(window(spec), repeats)
    del stepper
    limit = target(spec)
    rows.append({
        "optimizer": optimizers.describe(spec), "spec": spec,
        "window": window(spec), "step_s": seconds, "adam_step_s": base,
        "ratio": seconds / base,
        "flop_floor": flop_floor(spec, params, BATCH), "target": limit,
        "pass": None if limit is None else seconds / base <= limit,
    })
    print(f"  step time {rows[-1]['optimizer']}: {rows[-1]['ratio']:.2f}x",
          flush=True)
  return rows


def compile_seconds(spec, depth) -> float:
  model, params, x, y = problem((COMPILE_WIDTH,) * depth, COMPILE_WIDTH,
                                COMPILE_BATCH)
  tx = build(spec)
  lowered = jax.jit(make_step(model, tx)).lower(params, tx.init(params), x, y)
  start = time.perf_counter()
  lowered.compile()
  return time.perf_counter() - start


def bench_compile(specs):
  """Compile seconds at each depth and the deep/shallow ratio per spec."""
  shallow, deep = COMPILE_DEPTHS
  rows = []
  for spec in [BASELINE] + specs:
    times = {d: compile_seconds(spec, d) for d in COMPILE_DEPTHS}
    rows.append({"optimizer": optimizers.describe(spec), "spec": spec,
                 "seconds": times, "ratio": times[deep] / times[shallow]})
    print(f"  compile {rows[-1]['optimizer']}: {times}", flush=True)
  adam_ratio = rows[0]["ratio"]
  for row in rows:
    row["vs_adam"] = row["ratio"] / adam_ratio
    row["pass"] = (None if row is rows[0] else
                   row["vs_adam"] <= COMPILE_TARGET)
  return rows


def tree_bytes(tree, min_ndim=0) -> int:
  return sum(x.size * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree) if x.ndim >= min_ndim)


def adam_state_bytes(spec, params) -> int:
  """``μ`` and ``ν``: 2× the parameters."""
  del spec
  return 2 * tree_bytes(params)


def shampoo_state_bytes(spec, params) -> int:
  """Per block and axis of size d: ``L`` and its root, 2·d² float32; plus
  the Adam graft's ``μ, ν`` and the momentum: 3× the parameters."""
  lay = kronopt.make_layout(params, spec.get("block_size", 1024))
  factors = sum(n * 2 * sum(d * d for d in shape) * 4
                for shape, n in zip(lay.group_shapes, lay.group_sizes))
  return factors + 3 * tree_bytes(params)


def sketchy_state_bytes(spec, params) -> int:
  """Per block and axis of size d, with k = min(rank, d): the sketch (U, σ,
  ρ) and the cached root (its basis, scales and tail), 4·(2dk + 2k + 2)
  bytes; plus graft and momentum, 3× the parameters."""
  lay = kronopt.make_layout(params, spec.get("block_size", 1024))
  rank = spec.get("rank", 256)
  per_axis = lambda d: 4 * (2 * d * min(rank, d) + 2 * min(rank, d) + 2)
  factors = sum(n * sum(per_axis(d) for d in shape)
                for shape, n in zip(lay.group_shapes, lay.group_sizes))
  return factors + 3 * tree_bytes(params)


def soap_state_bytes(spec, params) -> int:
  """No graft: per block ``M, V`` and per rotated axis ``L, Q`` in float32,
  Adam's two moments for the leaves without a block
  (:func:`kronopt.preconditioners.soap.predicted_state_bytes`)."""
  return soap_lib.predicted_state_bytes(
      params, block_size=spec.get("block_size", 1024),
      max_precond_dim=spec.get("max_precond_dim", 10_000))


# Shampoo², CASPR and KrADagrad keep two d×d float32 matrices per axis too
# (statistic or inverse statistic, and its root).
PREDICTED_STATE_BYTES = {"adam": adam_state_bytes,
                         "shampoo": shampoo_state_bytes,
                         "shampoo2": shampoo_state_bytes,
                         "caspr": shampoo_state_bytes,
                         "kradagrad": shampoo_state_bytes,
                         "sketchy": sketchy_state_bytes,
                         "soap": soap_state_bytes}


def bench_memory(specs):
  """Optimizer-state bytes (arrays; scalars apart) against the prediction."""
  _, params, _, _ = problem(WIDTHS, INPUT_DIM, BATCH)
  param_bytes = tree_bytes(params)
  rows = []
  for spec in [BASELINE] + specs:
    state = jax.eval_shape(build(spec).init, params)
    arrays = tree_bytes(state, min_ndim=1)
    predict = PREDICTED_STATE_BYTES.get(spec["name"])
    predicted = None if predict is None else predict(spec, params)
    rows.append({
        "optimizer": optimizers.describe(spec), "spec": spec,
        "array_bytes": arrays,
        "scalar_bytes": tree_bytes(state) - arrays,
        "per_param_byte": tree_bytes(state) / param_bytes,
        "predicted_bytes": predicted,
        "match": None if predicted is None else arrays == predicted,
    })
  return rows


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(),
          "cpus_used": sorted(os.sched_getaffinity(0)),
          "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device": device.device_kind,
          "load_average": os.getloadavg()}


def _fmt(x, spec=".2f"):
  return "—" if x is None else format(x, spec)


def _verdict(ok):
  return "—" if ok is None else ("pass" if ok else "FAIL")


def markdown(report) -> str:
  """The report as markdown tables."""
  m = report["machine"]
  lines = [
      f"Machine: {m['platform']}, {m['cpu_count']} CPUs (this run on "
      f"{len(m['cpus_used'])}), python "
      f"{m['python']}, jax {m['jax']}, device {m['device']} "
      f"({m['backend']}); load average at start "
      f"{', '.join(f'{v:.1f}' for v in m['load_average'])}, at end "
      f"{', '.join(f'{v:.1f}' for v in report['load_average_end'])}.",
      "",
      f"Step time, MLP {INPUT_DIM}-{'-'.join(map(str, WIDTHS))}-"
      f"{NUM_CLASSES}, batch {BATCH}, ratio to optax.adam "
      f"(repeats: {report['repeats']})",
      "",
      "| optimizer | steps timed | ms/step | adam ms/step | ratio | "
      "FLOP floor | target | |",
      "|---|---|---|---|---|---|---|---|"]
  for r in report["step_time"]:
    lines.append(
        f"| {r['optimizer']} | {r['window']} | {1e3 * r['step_s']:.1f} | "
        f"{1e3 * r['adam_step_s']:.1f} | {r['ratio']:.2f} | "
        f"{_fmt(r['flop_floor'])} | {_fmt(r['target'], '.1f')} | "
        f"{_verdict(r['pass'])} |")
  shallow, deep = COMPILE_DEPTHS
  lines += [
      "", f"Compile time, MLP width {COMPILE_WIDTH}, target: {deep}/{shallow}"
      f" ratio ≤ {COMPILE_TARGET}× adam's", "",
      f"| optimizer | {shallow} layers (s) | {deep} layers (s) | "
      f"{deep}/{shallow} | vs adam | |", "|---|---|---|---|---|---|"]
  for r in report["compile"]:
    s = r["seconds"]
    lines.append(f"| {r['optimizer']} | {s[shallow]:.2f} | {s[deep]:.2f} | "
                 f"{r['ratio']:.2f} | {r['vs_adam']:.2f} | "
                 f"{_verdict(r['pass'])} |")
  lines += [
      "", "Optimizer state (arrays; scalars apart) per parameter byte", "",
      "| optimizer | state bytes / param bytes | array bytes | predicted | "
      "scalar bytes | |", "|---|---|---|---|---|---|"]
  for r in report["memory"]:
    lines.append(
        f"| {r['optimizer']} | {r['per_param_byte']:.2f} | "
        f"{r['array_bytes']} | {_fmt(r['predicted_bytes'], 'd')} | "
        f"{r['scalar_bytes']} | "
        f"{'—' if r['match'] is None else ('equal' if r['match'] else 'DIFFERENT')} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="only the targeted configs, one repeat")
  parser.add_argument("--only", nargs="+", metavar="NAME",
                      help="only the registry entries of these optimizers")
  parser.add_argument("--out", default="results/bench.json")
  args = parser.parse_args(argv)
  specs = QUICK if args.quick else REGISTRY
  if args.only:
    specs = [spec for spec in specs if spec["name"] in args.only]
  repeats = 1 if args.quick else 3
  firsts = list({spec["name"]: spec for spec in reversed(specs)}.values())
  report = {"machine": machine(), "quick": args.quick, "repeats": repeats}
  report["memory"] = bench_memory(specs)
  report["compile"] = bench_compile(firsts)
  report["step_time"] = bench_step_time(specs, repeats)
  report["load_average_end"] = os.getloadavg()
  print(markdown(report))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")
  memory_ok = all(r["match"] is not False for r in report["memory"])
  assert memory_ok, "optimizer state differs from the layout's prediction"


if __name__ == "__main__":
  main()
