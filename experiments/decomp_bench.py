"""Times the ways of running a refresh's decompositions on this CPU.

``python -m experiments.decomp_bench [--block-sizes 256 1024] [--repeats 5]
[--timeout 120] [--out results/decomp_bench.json]``

A Shampoo refresh of the benchmark's model (:mod:`experiments.bench`: MLP
784-1024-1024-10) decomposes one stack ``[N, d, d]`` per block group and
axis. Each way below runs every stack of that layout in one jitted program,
on SPD matrices of the right shapes, timed over ``repeats`` calls (median
and mean):

* ``map``: :mod:`kronopt.linalg.lapack`'s CPU path, one matrix at a time
  (``lax.map`` over each stack) — what kronopt does on CPU;
* ``batched``: one batched ``jnp.linalg.eigh`` per stack, the stacks free to
  run concurrently (the call that can deadlock jaxlib's CPU thread pool);
* ``chained``: one batched call per stack, each stack's input made to depend
  on the previous stack's output (``lax.optimization_barrier``), so no two
  run at once;
* ``concat``: every stack of one size concatenated into a single batched
  call;
* ``qr``: one warm-started power+QR step per matrix instead (the
  ``root_method="qr"`` refresh when the basis has drifted), via
  :func:`kronopt.linalg.lapack.qr`.

Every way runs in its own subprocess with a timeout, so a deadlock is
reported as one (``"deadlock": true``) instead of hanging the benchmark.
Timings live here and in the JSON this writes, never in tests.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kronopt
from experiments import bench
from kronopt.linalg import lapack

WAYS = ("map", "batched", "chained", "concat", "qr")


def stack_shapes(block_size):
  """``(N, d)`` per block group and axis of the benchmark MLP's layout."""
  _, params, _, _ = bench.problem(bench.WIDTHS, bench.INPUT_DIM, bench.BATCH)
  lay = kronopt.make_layout(params, block_size)
  return [(n, shape[axis]) for shape, n, axes in
          zip(lay.group_shapes, lay.group_sizes, lay.group_axes)
          for axis in axes]


def spd_stacks(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for n, d in shapes:
    g = rng.standard_normal((n, d, 2 * d)).astype(np.float32)
    out.append(jnp.asarray(g @ np.swapaxes(g, -1, -2) / (2 * d)))
  return out


def _chained(stacks):
  outs, dep = [], None
  for a in stacks:
    if dep is not None:
      a, _ = jax.lax.optimization_barrier((a, dep))
    lam, q = jnp.linalg.eigh(a)
    outs.append((lam, q))
    dep = q
  return outs


def _concat(stacks):
  by_d: dict = {}
  for i, a in enumerate(stacks):
    by_d.setdefault(a.shape[-1], []).append(i)
  outs = [None] * len(stacks)
  for idx in by_d.values():
    lam, q = jnp.linalg.eigh(jnp.concatenate([stacks[i] for i in idx]))
    start = 0
    for i in idx:
      n = stacks[i].shape[0]
      outs[i] = (lam[start:start + n], q[start:start + n])
      start += n
  return outs


def _qr_step(stacks):
  # A Q then qr(A Q): the flops of one warm-started step (the values of Q
  # do not change its cost; A stands in for it).
  return [lapack.qr(a @ a) for a in stacks]


PROGRAMS = {
    "map": lambda stacks: [lapack.eigh(a) for a in stacks],
    "batched": lambda stacks: [jnp.linalg.eigh(a) for a in stacks],
    "chained": _chained,
    "concat": _concat,
    "qr": _qr_step,
}


def time_way(way, block_size, repeats):
  """``{"median", "mean"}`` seconds per refresh of ``way`` (in-process)."""
  stacks = spd_stacks(stack_shapes(block_size))
  fn = jax.jit(PROGRAMS[way])
  jax.block_until_ready(fn(stacks))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(stacks))
    times.append(time.perf_counter() - start)
  return {"median": statistics.median(times), "mean": statistics.fmean(times)}


def run_isolated(way, block_size, repeats, timeout):
  """:func:`time_way` in a subprocess; a timeout counts as a deadlock."""
  code = ("import json, sys; from experiments import decomp_bench as b; "
          f"print(json.dumps(b.time_way({way!r}, {block_size}, {repeats})))")
  try:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=timeout, check=True)
  except subprocess.TimeoutExpired:
    return {"deadlock": True, "timeout_s": timeout}
  except subprocess.CalledProcessError as e:
    return {"error": e.stderr.strip().splitlines()[-1]}
  return {"deadlock": False, **json.loads(out.stdout.strip().splitlines()[-1])}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--block-sizes", nargs="+", type=int,
                      default=[256, 1024])
  parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--timeout", type=float, default=120.0)
  parser.add_argument("--out", default="results/decomp_bench.json")
  args = parser.parse_args(argv)
  rows = []
  for block in args.block_sizes:
    shapes = stack_shapes(block)
    for way in args.ways:
      row = {"block_size": block, "stacks": shapes, "way": way,
             **run_isolated(way, block, args.repeats, args.timeout)}
      rows.append(row)
      print(json.dumps(row), flush=True)
  report = {"machine": bench.machine(), "repeats": args.repeats, "rows": rows}
  print("\n| block | way | median (ms) | mean (ms) | vs map (median) |")
  print("|---|---|---|---|---|")
  for block in args.block_sizes:
    base = next((r for r in rows if r["block_size"] == block
                 and r["way"] == "map" and "median" in r), None)
    for r in rows:
      if r["block_size"] != block:
        continue
      if "median" not in r:
        what = "deadlock" if r.get("deadlock") else r.get("error", "?")
        print(f"| {block} | {r['way']} | {what} | | |")
        continue
      rel = (f"{r['median'] / base['median']:.2f}" if base else "—")
      print(f"| {block} | {r['way']} | {1e3 * r['median']:.1f} | "
            f"{1e3 * r['mean']:.1f} | {rel} |")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
