"""Benchmark: kronopt optimizers against ``optax.adam`` on this machine.

``python -m experiments.bench [--quick] [--peers] [--only NAME ...]
[--out results/bench.json]``

Every number is a ratio against ``optax.adam`` measured in the same run:

* **Step time** of the jitted train step (loss, grad, ``tx.update``,
  ``apply_updates``) on an MLP 784-1024-1024-10 with a random batch of 512,
  each step timed on its own, over rounds of ``max(2·precondition_every,
  20)`` consecutive steps (whole refresh periods) interleaved with rounds of
  Adam's, after a warm-up past the first refresh. The mean ratio is the
  amortised cost (refreshes included), the median ratio the cost of a step
  between refreshes, max/median the refresh's spike (what the staggered
  refresh flattens). Next to it, the FLOP floor ``1 + (statistics +
  preconditioning flops) / (6·batch·params)`` of the optimizer's layout.
* **Compile time** of the train step of a 4-layer and a 48-layer MLP (width
  256), ``jit(...).lower(...).compile()``, for the first registry entry of
  each optimizer name; the 48/4 ratio is compared to Adam's.
* **State bytes** per parameter byte, with the bytes the layout predicts.
* **Loss at equal steps**: each optimizer's batch loss after
  :data:`LOSS_STEPS` steps on that batch, beside the step time.

Optimizers are the dicts of :data:`REGISTRY` (built by
:func:`experiments.optimizers.build`); another optimizer is one more line.
K-FAC's step also takes the layer statistics, from the same forward and
backward pass (:class:`kronopt.flax.linen.KFACCapture`). ``--peers`` adds
the peers of :data:`experiments.peers.PEERS` (``pip install -e
".[peers]"``) to the step-time loop, each with its package version; one
that is not installed or does not run here is skipped with the reason,
printed and recorded. Timings live here and in the JSON this writes, never
in tests.
"""

from __future__ import annotations

import argparse
import inspect
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
from experiments import peers as peers_lib
from kronopt.flax import linen as kfac_linen
from kronopt.preconditioners import kfac as kfac_lib
from kronopt.preconditioners import soap as soap_lib

LEARNING_RATE = 1e-3
BASELINE = {"name": "adam"}

# Shampoo's refresh variants (issue 14): eigh, the warm-started qr basis,
# coupled Newton, the staggered refresh, statistics every 10 steps.
REGISTRY = [
    {"name": "shampoo", "block_size": block, "precondition_every": every,
     "root_method": method, **extra}
    for block in (256, 1024)
    for method, every, extra in (
        ("eigh", 10, {}), ("qr", 10, {}), ("newton", 10, {}),
        ("eigh", 100, {}), ("eigh", 10, {"staggered_refresh": True}),
        ("qr", 10, {"staggered_refresh": True}),
        ("qr", 10, {"statistics_every": 10}))
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
    {"name": "sketchy", "rank": 64, "block_size": 1024, "precondition_every": 1,
     "fd_method": "exact"},
    {"name": "kradagrad", "block_size": 128, "precondition_every": 10},
    {"name": "kradagrad", "block_size": 256, "precondition_every": 10},
    {"name": "kradagrad", "block_size": 1024, "precondition_every": 10},
    {"name": "soap", "block_size": 256, "precondition_every": 10},
    {"name": "soap", "block_size": 1024, "precondition_every": 10},
]
# K-FAC, each method at the optimizer's defaults (rank 220, T_cov 10, T_inv
# 100); its step also takes the layer statistics (make_kfac_step).
KFAC = [{"name": "kfac", "method": method} for method in kfac_lib.METHODS]
REGISTRY = REGISTRY + FAMILY + KFAC
QUICK = [spec for spec in REGISTRY
         if spec["name"] == "shampoo" and spec["precondition_every"] == 10
         and spec["root_method"] in ("eigh", "qr") and len(spec) == 4]

# Largest amortized step-time ratio, keyed by (block_size, precondition_every).
STEP_TARGETS = {(256, 10): 2.0, (1024, 10): 4.0}
COMPILE_TARGET = 1.5  # shampoo's 48/4 compile ratio ≤ this × adam's.

WIDTHS = (1024, 1024)
INPUT_DIM, NUM_CLASSES, BATCH = 784, 10, 512
MIN_WINDOW = 20
LOSS_STEPS = 30  # every stepper runs at least this many (warm-up + window)
# Keywords that set an optimizer's refresh period, its own or a peer's.
PERIOD_KEYS = ("precondition_every", "inverse_every", "inverse_update_period",
               "preconditioning_compute_steps")
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


def make_kfac_step(model, tx, capture) -> Callable:
  """:func:`make_step` for ``kronopt.kfac``: the gradient and the layer
  statistics of one forward and backward pass (``capture``, a
  :class:`kronopt.flax.linen.KFACCapture`), both under ``"params"``."""
  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(variables, opt_state, x, y):
    loss, grads, stats = capture.value_grad_and_stats(
        loss_fn, variables["params"], x, y)
    updates, opt_state = tx.update({"params": grads}, opt_state, variables,
                                   kfac_stats={"params": stats})
    return optax.apply_updates(variables, updates), opt_state, loss
  return step


def build(spec):
  return optimizers.build({"learning_rate": LEARNING_RATE, **spec})


def step_and_tx(spec, model, params, x):
  """``(step, tx)``: a kronopt or optax spec's train step (not jitted) and
  its optimizer; K-FAC's registers the model's layers with the capture."""
  if spec["name"] != "kfac":
    tx = build(spec)
    return make_step(model, tx), tx
  capture = kfac_linen.KFACCapture(model, params, x)
  tx = build({**spec, "layers": {"params": capture.layers}})
  return make_kfac_step(model, tx, capture), tx


class Stepper:
  """A compiled, warmed-up train step of one optimizer on one problem.

  Raises:
    experiments.peers.Unavailable: for a peer that cannot run here.
  """

  def __init__(self, spec, model, params, x, y):
    self.patch = None  # what a peer's adapter patched, if anything
    self._batch = (x, y)
    self.losses = []
    try:
      self._step, state = self._build(spec, model, params, x)
      self._carry = (jax.tree_util.tree_map(jnp.copy, params), state)
      # Past the default start_preconditioning_step (10) and its first
      # refresh.
      self.run(spec.get("start_preconditioning_step", 10) + 1)
    except peers_lib.Unavailable:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not peers_lib.is_peer(spec):
        raise
      raise peers_lib.failure(spec, e) from e

  def _build(self, spec, model, params, x):
    """``(step, opt_state)``: jitted unless the peer owns its step."""
    if peers_lib.owns_step(spec):
      step, state, self.patch = peers_lib.kfac_jax_step(
          spec, model, params, x, self._batch[1], LEARNING_RATE)
      return step, state
    if peers_lib.is_peer(spec):
      tx = peers_lib.transform(spec, LEARNING_RATE)
      step = make_step(model, tx)
    else:
      step, tx = step_and_tx(spec, model, params, x)
    # Copied: leaves of a fresh state may share one buffer (the engine's
    # zero counters), which donation refuses.
    state = jax.tree_util.tree_map(jnp.copy, tx.init(params))
    return jax.jit(step, donate_argnums=(0, 1)), state

  def run(self, steps: int) -> None:
    for _ in range(steps):
      params, opt_state, loss = self._step(*self._carry, *self._batch)
      self._carry = (params, opt_state)
      self.losses.append(loss)
    jax.block_until_ready(self._carry)

  def loss_after(self, steps: int) -> Optional[float]:
    """The batch loss after ``steps`` updates (``None`` if not run)."""
    return float(self.losses[steps]) if len(self.losses) > steps else None

  def time(self, steps: int) -> list[float]:
    """Seconds of each of ``steps`` consecutive steps (each waited for)."""
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.run(1)
      times.append(time.perf_counter() - start)
    return times


def timing(times) -> dict[str, float]:
  """Mean (the amortised cost, refreshes included), median (a step between
  refreshes) and max/median (the refresh's spike) of per-step seconds."""
  median = statistics.median(times)
  return {"mean": statistics.fmean(times), "median": median,
          "max_over_median": max(times) / median}


def period(spec) -> int:
  """Steps between refreshes: the spec's, else its optimizer's default."""
  for key in PERIOD_KEYS:
    if key in spec:
      return spec[key]
  fn = None if peers_lib.is_peer(spec) else optimizers.factory(spec["name"])
  params = inspect.signature(fn).parameters if fn is not None else {}
  for key in PERIOD_KEYS:
    if key in params and isinstance(params[key].default, int):
      return params[key].default
  return 1


def window(spec) -> int:
  """Consecutive steps timed: at least two whole refresh periods."""
  return max(2 * period(spec), MIN_WINDOW)


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
  """Per spec: its seconds per step, Adam's right before, ratio, floor, loss
  after :data:`LOSS_STEPS` steps; and the peers skipped (with reasons)."""
  model, params, x, y = problem(WIDTHS, INPUT_DIM, BATCH)
  adam = Stepper(BASELINE, model, params, x, y)
  rows, skipped = [], []
  for spec in specs:
    peer = peers_lib.is_peer(spec)
    version = (f"{peers_lib.distribution(spec)} {peers_lib.version(spec)}"
               if peer else None)
    try:
      stepper = Stepper(spec, model, params, x, y)
    except peers_lib.Unavailable as e:
      skipped.append({"optimizer": optimizers.describe(spec), "spec": spec,
                      "version": version, "reason": str(e)})
      print(f"  skipping peer {optimizers.describe(spec)}: {e}", flush=True)
      continue
    # Rounds interleaved with Adam's, so both see the same machine load.
    mine, base = [], []
    for _ in range(repeats):
      base += adam.time(window(spec))
      mine += stepper.time(window(spec))
    mine, base = timing(mine), timing(base)
    loss = stepper.loss_after(LOSS_STEPS)
    patch = stepper.patch
    del stepper
    limit = target(spec)
    rows.append({
        "optimizer": optimizers.describe(spec), "spec": spec, "peer": peer,
        "version": version, "patch": patch,
        "window": window(spec), "repeats": repeats, "step": mine,
        "adam_step": base,
        "ratio": mine["mean"] / base["mean"],
        "ratio_median": mine["median"] / base["median"], "loss": loss,
        "adam_loss": adam.loss_after(LOSS_STEPS),
        "flop_floor": flop_floor(spec, params, BATCH), "target": limit,
        "pass": None if limit is None else mine["mean"] / base["mean"] <= limit,
    })
    print(f"  step time {rows[-1]['optimizer']}: {rows[-1]['ratio']:.2f}x",
          flush=True)
  return rows, skipped


def compile_seconds(spec, depth) -> float:
  model, params, x, y = problem((COMPILE_WIDTH,) * depth, COMPILE_WIDTH,
                                COMPILE_BATCH)
  step, tx = step_and_tx(spec, model, params, x)
  lowered = jax.jit(step).lower(params, tx.init(params), x, y)
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
  """Per block and axis of size d: ``L`` and its root, 2·d² float32 (3·d²
  with ``root_method="qr"``, which keeps the basis); plus the Adam graft's
  ``μ, ν``: 2× the parameters."""
  lay = kronopt.make_layout(params, spec.get("block_size", 1024))
  per_axis = 3 if spec.get("root_method") == "qr" else 2
  factors = sum(n * per_axis * sum(d * d for d in shape) * 4
                for shape, n in zip(lay.group_shapes, lay.group_sizes))
  return factors + 2 * tree_bytes(params)


def sketchy_state_bytes(spec, params) -> int:
  """Per block and axis of size d, with k = min(rank, d): the sketch (U, σ,
  ρ) and the cached root (its basis, scales and tail), 4·(2dk + 2k + 2)
  bytes; plus the graft's ``μ, ν``, 2× the parameters."""
  lay = kronopt.make_layout(params, spec.get("block_size", 1024))
  rank = spec.get("rank", 256)
  per_axis = lambda d: 4 * (2 * d * min(rank, d) + 2 * min(rank, d) + 2)
  factors = sum(n * sum(per_axis(d) for d in shape)
                for shape, n in zip(lay.group_shapes, lay.group_sizes))
  return factors + 2 * tree_bytes(params)


def soap_state_bytes(spec, params) -> int:
  """No graft: per block ``M, V`` and per rotated axis ``L, Q`` in float32,
  Adam's two moments for the leaves without a block
  (:func:`kronopt.preconditioners.soap.predicted_state_bytes`)."""
  return soap_lib.predicted_state_bytes(
      params, block_size=spec.get("block_size", 1024),
      max_precond_dim=spec.get("max_precond_dim", 10_000))


def kfac_state_bytes(spec, params) -> int:
  """Per layer (the default registration: every kernel with its bias row)
  and factor of size d, with r its kept rank (d for ``eigh``, else
  ``min(rank, d)``): ``U`` and ``D``, 4·(dr + r) bytes, and the d×d EMA
  for every method but ``brand``; plus the graft's μ, ν: 2× the
  parameters."""
  precond = kfac_lib.KFAC(**{k: spec[k] for k in ("method", "rank")
                             if k in spec})
  lay = kfac_lib.make_layout(params)
  per_factor = lambda d: 4 * (d * precond.factor_rank(d)
                              + precond.factor_rank(d)
                              + (d * d if precond.keeps_ema else 0))
  factors = sum(n * sum(per_factor(d) for d in shape)
                for shape, n in zip(lay.group_shapes, lay.group_sizes))
  return factors + 2 * tree_bytes(params)


# Shampoo², CASPR and KrADagrad keep two d×d float32 matrices per axis too
# (statistic or inverse statistic, and its root).
PREDICTED_STATE_BYTES = {"adam": adam_state_bytes,
                         "shampoo": shampoo_state_bytes,
                         "shampoo2": shampoo_state_bytes,
                         "caspr": shampoo_state_bytes,
                         "kradagrad": shampoo_state_bytes,
                         "sketchy": sketchy_state_bytes,
                         "soap": soap_state_bytes,
                         "kfac": kfac_state_bytes}


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


def _first(rows, key):
  return next((r[key] for r in rows if r.get(key) is not None), None)


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
      f"(repeats: {report['repeats']}); loss on the batch after "
      f"{LOSS_STEPS} steps (adam: "
      f"{_fmt(_first(report['step_time'], 'adam_loss'), '.4g')})",
      "",
      "| optimizer | steps timed | ms/step (mean) | adam | ratio (mean) | "
      "ratio (median) | max/median step | "
      f"loss after {LOSS_STEPS} | FLOP floor | target | |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["step_time"]:
    name = r["optimizer"] + (f" [{r['version']}]" if r.get("version") else "")
    lines.append(
        f"| {name} | {r['repeats']}×{r['window']} | "
        f"{1e3 * r['step']['mean']:.1f} | "
        f"{1e3 * r['adam_step']['mean']:.1f} | {r['ratio']:.2f} | "
        f"{r['ratio_median']:.2f} | {r['step']['max_over_median']:.1f} | "
        f"{_fmt(r['loss'], '.4g')} | "
        f"{_fmt(r['flop_floor'])} | {_fmt(r['target'], '.1f')} | "
        f"{_verdict(r['pass'])} |")
  for r in report["step_time"]:
    if r.get("patch"):
      lines += ["", f"Patched for {r['optimizer']}: {r['patch']}."]
  skipped = report.get("skipped_peers") or []
  if skipped:
    lines += ["", "Peers skipped:", ""] + [
        f"- {r['optimizer']}: {r['reason']}" for r in skipped]
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
  parser.add_argument("--peers", action="store_true",
                      help="also time the peers from the package registry "
                      "(experiments.peers; pip install -e '.[peers]')")
  parser.add_argument("--out", default="results/bench.json")
  args = parser.parse_args(argv)
  specs = (QUICK if args.quick else REGISTRY) + (
      peers_lib.PEERS if args.peers else [])
  if args.only:
    specs = [spec for spec in specs if spec["name"] in args.only]
  repeats = 1 if args.quick else 3
  own = [spec for spec in specs if not peers_lib.is_peer(spec)]
  firsts = list({spec["name"]: spec for spec in reversed(own)}.values())
  report = {"machine": machine(), "quick": args.quick, "repeats": repeats,
            "peers": args.peers}
  report["memory"] = bench_memory(own)
  report["compile"] = bench_compile(firsts)
  report["step_time"], report["skipped_peers"] = bench_step_time(specs,
                                                                 repeats)
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
