"""Times only Sketchy's Frequent Directions step, per method and factor shape.

``python -m experiments.sketch_bench [--ranks 16 64 256] [--repeats 5]
[--out results/sketch_bench.json]``

The factor shapes are those of the benchmark (:mod:`experiments.bench`: MLP
784-1024-1024-10, block 1024): per block group and preconditioned axis, ``N``
stacked sketches of size ``d`` receiving ``m = |block|/d`` new columns per
step. For each rank and ``fd_method`` the jitted
:func:`kronopt.linalg.sketch.fd_update` is warmed up on a sketch that has
already seen a few gradients, then timed over ``STEPS`` consecutive steps
(median over repeats); the per-step total over all axes is what Sketchy pays
for its statistics on that model. Gradients are Gaussian with a decaying row
spectrum (the wall time of either method does not depend on the values).
Timings live here and in the JSON this writes, never in tests.
"""

import argparse
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kronopt
from experiments import bench
from kronopt.linalg import sketch

METHODS = sketch.FD_METHODS
STEPS, WARMUP = 10, 3
BLOCK_SIZE = 1024
OVERSAMPLE = 16  # fd_update's and Sketchy's default


def factor_shapes(block_size=BLOCK_SIZE):
  """``(N, d, m)`` per group and axis of the benchmark MLP's layout."""
  _, params, _, _ = bench.problem(bench.WIDTHS, bench.INPUT_DIM, bench.BATCH)
  lay = kronopt.make_layout(params, block_size)
  shapes = []
  for shape, n, axes in zip(lay.group_shapes, lay.group_sizes,
                            lay.group_axes):
    for axis in axes:
      d = shape[axis]
      shapes.append((n, d, math.prod(shape) // d))
  return shapes


def gradients(n, d, m, seed):
  rng = np.random.default_rng(seed)
  rows = np.linspace(1.0, 0.05, d)[:, None]
  return jnp.asarray(rows * rng.standard_normal((n, d, m)), jnp.float32)


def time_update(n, d, m, rank, method, repeats):
  """Median seconds per :func:`fd_update` step, and the path it took."""
  k = min(rank, d)
  grads = [gradients(n, d, m, seed) for seed in range(2)]
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
      jnp.arange(n))
  update = jax.jit(lambda s, g: sketch.fd_update(
      s, g, 0.999, method=method, keys=keys, oversample=OVERSAMPLE))
  state = sketch.init_sketch(n, d, k)
  for t in range(WARMUP):
    state = update(state, grads[t % 2])
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for t in range(STEPS):
      state = update(state, grads[t % 2])
    jax.block_until_ready(state)
    times.append((time.perf_counter() - start) / STEPS)
  ranged = sketch.uses_range_step(d, k, m, OVERSAMPLE)
  return statistics.median(times), ("range" if method == "randomized"
                                    and ranged else "exact")


def run(ranks, repeats):
  rows = []
  for rank in ranks:
    for n, d, m in factor_shapes():
      for method in METHODS:
        seconds, path = time_update(n, d, m, rank, method, repeats)
        rows.append({"rank": rank, "n": n, "d": d, "m": m, "method": method,
                     "path": path, "step_s": seconds})
        print(f"  rank {rank} N={n} d={d} m={m} {method} ({path}): "
              f"{1e3 * seconds:.2f} ms", flush=True)
  return rows


def totals(rows):
  """Per rank and method, the sum over axes (one Sketchy statistics step)."""
  out = {}
  for r in rows:
    key = (r["rank"], r["method"])
    out[key] = out.get(key, 0.0) + r["step_s"]
  return out


def markdown(rows) -> str:
  lines = ["| rank | N | d | m | method | path | ms/step |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['rank']} | {r['n']} | {r['d']} | {r['m']} | "
                 f"{r['method']} | {r['path']} | {1e3 * r['step_s']:.2f} |")
  tot = totals(rows)
  lines += ["", "| rank | " + " | ".join(f"{m} ms/step" for m in METHODS)
            + " | exact / randomized |",
            "|---|" + "---|" * (len(METHODS) + 1)]
  for rank in sorted({r["rank"] for r in rows}):
    cells = [tot[rank, m] for m in METHODS]
    lines.append(f"| {rank} | " + " | ".join(f"{1e3 * c:.1f}" for c in cells)
                 + f" | {tot[rank, 'exact'] / tot[rank, 'randomized']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 256])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="results/sketch_bench.json")
  args = parser.parse_args(argv)
  rows = run(args.ranks, args.repeats)
  print(markdown(rows))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"machine": bench.machine(), "steps": STEPS,
               "repeats": args.repeats, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
