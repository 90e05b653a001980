"""``experiment: reproduce.sketchy_memory``: Sketchy's low-rank claim.

Feinberg, Chen, Sun, Anil & Hazan, "Sketchy: Memory-efficient adaptive
regularization with Frequent Directions", NeurIPS 2023 (docs/algorithms.md
§5): the spectra of Shampoo's Kronecker factors concentrate on a few
leading directions, so rank-k Frequent Directions sketches of them
(``k(m+n)`` memory per block) keep Shampoo's quality.

A sweep config (:mod:`experiments.sweep`) whose optimizer ``sketchy`` (the
label in ``sketchy_label``) is a template, expanded into one entry
``sketchy_r<k>`` per rank of ``ranks``, each on its own learning-rate grid.
Then:

* (a) spectral concentration: the ``spectra.label`` optimizer's (Shampoo's)
  runs read its Kronecker factors ``L_i`` from its state every
  ``spectra.every`` steps (a ``jax.debug.callback`` in
  :func:`factor_probe`); at its best point, per factor, the fraction
  of ``tr L_i`` in its top ``⌈d/4⌉`` eigenvalues, against the same factors
  accumulated (same block shapes, β₂ and steps) from i.i.d. Gaussian
  gradients;
* (b) the final held-out loss of each rank beside Shampoo and AdamW, and
  each optimizer's state bytes (the preconditioner's factors, and the whole
  state) from ``jax.eval_shape`` of its ``init``.

Writes ``results.json`` and ``sketchy_memory.png`` to ``output_dir``.
"""

import math
from typing import Any

import jax
import numpy as np
import tqdm

from experiments import bench
from experiments import config as config_lib
from experiments import grid
from experiments import optimizers
from experiments import report
from experiments import schedules
from experiments import sweep
from experiments import train
from experiments import workloads
from experiments.reproduce import common
import kronopt

Field = config_lib.Field
FIGURE = "sketchy_memory.png"
TOP = 0.25  # the top quarter of each factor's eigenvalues

SPECTRA_SCHEMA = {
    "label": Field(config_lib.string(), "shampoo"),
    "every": Field(config_lib.integer(1), 25),
    "baseline_seed": Field(config_lib.integer(0), 0),
}

SCHEMA = common.sweep_schema(
    ranks=Field(config_lib.list_of(config_lib.integer(1))),
    sketchy_label=Field(config_lib.string(), "sketchy"),
    spectra=Field(config_lib.nested(SPECTRA_SCHEMA),
                  config_lib.validate({}, SPECTRA_SCHEMA)),
)


def rank_label(rank: int) -> str:
  return f"sketchy_r{rank}"


def check(config: dict[str, Any]) -> dict[str, Any]:
  """Expands the Sketchy template into one entry per rank, then sweep's
  checks."""
  opts = dict(config["optimizers"])
  label = config["sketchy_label"]
  template = opts.pop(label, None)
  if template is None or template["name"] != "sketchy":
    raise config_lib.ConfigError(
        f"config key 'sketchy_label': {label!r} is not a sketchy entry of "
        f"optimizers ({', '.join(opts)}).")
  if "rank" in template or "rank" in template["sweep"]:
    raise config_lib.ConfigError(
        f"config key 'optimizers.{label}.rank': set 'ranks' instead.")
  if config["spectra"]["label"] not in opts:
    raise config_lib.ConfigError(
        f"config key 'spectra.label': {config['spectra']['label']!r} is not "
        f"a label of optimizers ({', '.join(opts)}).")
  for rank in config["ranks"]:
    opts[rank_label(rank)] = {**template, "rank": rank}
  return sweep.check({**config, "optimizers": opts})


def factor_probe(tx, every: int, sink):
  """``tx`` that hands its engine's factor statistics (per group, a tuple of
  ``[N, d_i, d_i]``) to ``sink(count, stats)`` every ``every`` steps."""
  def update_fn(updates, state, params=None, **extra):
    updates, state = tx.update(updates, state, params, **extra)
    found = kronopt.engine.find_states(state)[0]
    stats = tuple(g.stats for g in found.groups)
    jax.lax.cond(found.count % every == 0,
                 lambda c, s: jax.debug.callback(sink, c, s),
                 lambda c, s: None, found.count, stats)
    return updates, state

  return tx._replace(update=update_fn)


def top_fraction(stat) -> float:
  """The fraction of ``tr L`` in the top ``⌈TOP·d⌉`` eigenvalues of ``L``."""
  lam = np.clip(np.linalg.eigvalsh(np.asarray(stat, np.float64)), 0, None)
  top = math.ceil(TOP * len(lam))
  total = lam.sum()
  return float(lam[-top:].sum() / total) if total > 0 else math.nan


def fractions(stats) -> list[float]:
  """:func:`top_fraction` of every block and axis of every group."""
  return [top_fraction(block) for group in stats for axis in group
          for block in np.asarray(axis)]


def factor_shapes(stats) -> list[tuple]:
  """The block shape behind each factor, in :func:`fractions`' order."""
  out = []
  for group in stats:
    shape = tuple(np.shape(axis)[-1] for axis in group)
    for i, axis in enumerate(group):
      out += [(i, shape)] * np.shape(axis)[0]
  return out


def gaussian_fractions(shapes, b2: float, steps: list[int], seed: int
                       ) -> dict[int, list[float]]:
  """The same factors accumulated from i.i.d. standard normal gradients:
  ``L ← β₂ L + (1−β₂) G_(i) G_(i)ᵀ`` (a plain sum for β₂ = 1)."""
  rng = np.random.default_rng(seed)
  weight = 1.0 if b2 == 1.0 else 1.0 - b2
  out = {s: [] for s in steps}
  for axis, shape in shapes:
    stat = np.zeros((shape[axis],) * 2)
    for t in range(max(steps) + 1):
      g = np.moveaxis(rng.standard_normal(shape), axis, 0).reshape(
          shape[axis], -1)
      stat = b2 * stat + weight * g @ g.T
      if t in out:
        out[t].append(top_fraction(stat))
  return out


def run_probed(workload, config) -> tuple[list, dict]:
  """(a): every grid point × seed of the ``spectra.label`` optimizer, as
  :func:`experiments.sweep.run_optimizer` runs them (same records), with
  its factors probed; ``(runs, {grid key: probes of its first seed})``."""
  spec = config["spectra"]
  label = spec["label"]
  entry = config["optimizers"][label]
  axes, traced = sweep.grid_axes(entry), sweep.traced_axes(entry)
  shape = schedules.unit(config["steps"],
                         **(entry["schedule"] or config["schedule"]))
  runs, probes = [], {}
  for point in grid.points(axes):
    kwargs = {**sweep.fixed_keywords(entry),
              **{k: v for k, v in point.items() if k not in traced}}
    seen = {}

    def sink(count, stats, seen=seen):
      seen[int(count)] = (fractions(stats), factor_shapes(stats))

    make_tx = lambda hp, kwargs=kwargs, sink=sink: factor_probe(
        optimizers.build_traced(entry["name"], kwargs, hp, shape),
        spec["every"], sink)
    trainer = train.Trainer(workload, make_tx, steps=config["steps"],
                            eval_every=config["eval_every"],
                            compiler_options=config["compiler_options"])
    for i, seed in enumerate(config["seeds"]):
      with tqdm.tqdm(total=config["steps"], unit="step",
                     desc=f"{label} {report.describe_point(point)} seed "
                          f"{seed} (probed)",
                     disable=not config["progress"]) as bar:
        rec = trainer.run(seed, {k: point[k] for k in traced}, bar)
      runs.append({"optimizer": label, "name": entry["name"], "point": point,
                   "seed": seed, **rec})
      if i == 0:
        probes[grid.key(point)] = dict(sorted(seen.items()))
  return runs, probes


def spectra_record(probes, summary, config) -> dict[str, Any]:
  """The best point's probes beside their Gaussian baseline."""
  spec = config["spectra"]
  entry = config["optimizers"][spec["label"]]
  best = summary[spec["label"]]["best"]
  seen = probes[grid.key(best)]
  steps = list(seen)
  b2 = sweep.fixed_keywords(entry).get("b2", best.get("b2", (
      config_lib.signature_schema(optimizers.factory(entry["name"]))[
          "b2"].default)))
  base = gaussian_fractions(seen[steps[0]][1], b2, steps,
                            spec["baseline_seed"])
  return {"steps": steps, "b2": b2, "point": best,
          "factor_shapes": [list(s[1]) for s in seen[steps[0]][1]],
          "fractions": [seen[s][0] for s in steps],
          "gaussian": [base[s] for s in steps]}


def state_bytes(workload, config) -> dict[str, dict[str, int]]:
  """(b): per optimizer, the bytes of its preconditioner's factors and of its
  whole state (arrays), from ``jax.eval_shape`` of its ``init``."""
  params = jax.eval_shape(workload.init, jax.random.PRNGKey(0))
  out = {}
  for label, entry in config["optimizers"].items():
    tx = optimizers.build({"name": entry["name"], "learning_rate": 1e-3,
                           **sweep.fixed_keywords(entry)})
    state = jax.eval_shape(tx.init, params)
    found = kronopt.engine.find_states(state)
    out[label] = {
        "factors": sum(bench.tree_bytes(s.groups) for s in found),
        "total": bench.tree_bytes(state, min_ndim=1),
        "params": bench.tree_bytes(params)}
  return out


def _final(s):
  loss = s["final"].get("loss")
  return math.nan if loss is None else loss


def claim(summary, spectra, memory, config) -> dict[str, Any]:
  """The numbers of the claim: spectra (mean over factors, first and last
  probe), and per rank its final loss and factor bytes relative to
  Shampoo's."""
  sh = config["spectra"]["label"]
  mean = lambda xs: float(np.nanmean(xs))
  out = {"top_fraction": {
      "first": mean(spectra["fractions"][0]),
      "last": mean(spectra["fractions"][-1]),
      "mean": mean([mean(f) for f in spectra["fractions"][1:]] or [math.nan]),
      "gaussian_first": mean(spectra["gaussian"][0]),
      "gaussian_last": mean(spectra["gaussian"][-1])}}
  out["final_loss"] = {k: _final(s) for k, s in summary.items()}
  out["factor_bytes_vs_shampoo"] = {
      k: m["factors"] / memory[sh]["factors"] for k, m in memory.items()
      if memory[sh]["factors"]}
  return out


def figure(summary, spectra, memory, config):
  plt = report.plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  ax = axes[0]
  for key, color, label in (("fractions", "C0", "Shampoo's factors"),
                            ("gaussian", "C7", "i.i.d. Gaussian gradients")):
    f = np.asarray(spectra[key], np.float64)
    ax.plot(spectra["steps"], np.nanmean(f, 1), "o-", ms=3, color=color,
            label=f"{label} (mean)")
    ax.fill_between(spectra["steps"], np.nanmin(f, 1), np.nanmax(f, 1),
                    color=color, alpha=0.2)
  ax.set(xlabel="step", ylabel=f"fraction of trace in top {TOP:.0%}",
         ylim=(0, 1.02), title="(a) spectral concentration")
  ax.legend(fontsize=7)
  ranks = config["ranks"]
  others = [k for k in summary if not k.startswith("sketchy_r")]
  for ax, values, title, ylabel in (
      (axes[1], {k: _final(s) for k, s in summary.items()},
       "(b) quality", "final held-out loss"),
      (axes[2], {k: m["factors"] for k, m in memory.items()},
       "(b) memory", "preconditioner state (bytes)")):
    ax.plot(ranks, [values[rank_label(r)] for r in ranks], "o-", color="C1",
            label="sketchy, rank k")
    for i, k in enumerate(others):
      if values.get(k):
        ax.axhline(values[k], color=f"C{i + 2}", ls="--", label=k)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rank k", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
  axes[2].set_yscale("log")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(config["title"] or config["workload"]["name"], fontsize=9)
  return fig


def run(config: dict[str, Any]) -> dict[str, Any]:
  """The sweep, the spectra probe, the state bytes; record and figure."""
  workload = workloads.make(**config["workload"])
  label = config["spectra"]["label"]
  probed, probes = run_probed(workload, config)
  others = {k: v for k, v in config["optimizers"].items() if k != label}
  runs, summary = common.run_sweep(
      workload, {**config, "optimizers": others}, probed,
      {label: config["optimizers"][label]})
  summary = {k: summary[k] for k in config["optimizers"] if k in summary}
  print(report.table(summary, config["baseline"]))
  spectra = spectra_record(probes, summary, config)
  memory = state_bytes(workload, config)
  result = claim(summary, spectra, memory, config)
  tf = result["top_fraction"]
  print(f"top-{TOP:.0%} trace fraction of Shampoo's factors: first "
        f"{tf['first']:.3f}, last {tf['last']:.3f} (Gaussian "
        f"{tf['gaussian_first']:.3f} → {tf['gaussian_last']:.3f})")
  for label in summary:
    print(f"  {label}: final loss {result['final_loss'][label]:.4g}, "
          f"factor bytes {memory[label]['factors']}, total state bytes "
          f"{memory[label]['total']}")
  rec = common.record(config, workload, summary=summary, spectra=spectra,
                      memory=memory, claim=result, runs=runs)
  rec["paths"] = common.write(config["output_dir"], rec,
                              figure(summary, spectra, memory, config),
                              FIGURE)
  return rec
