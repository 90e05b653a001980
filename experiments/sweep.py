"""``experiment: sweep``: optimizers × learning-rate grid × seeds on a workload.

Config keys (see :data:`SCHEMA`; every key is validated before any work)::

    experiment: sweep
    title: char LM                 # plot title (default: the workload name)
    workload: {name: char_lm, layers: 2, ...}   # experiments.workloads
    steps: 200                     # steps per run
    eval_every: 20                 # steps per compiled chunk; divides steps
    seeds: [0, 1]                  # init and batch order, shared by all
    schedule: {name: warmup_cosine, warmup_steps: 20, end_factor: 0.0}
    baseline: adamw                # label of the reference optimizer
    output_dir: results/x
    progress: true                 # a tqdm bar per run
    compiler_options: {}           # XLA options of the chunk (quick checks)
    optimizers:
      adamw:                       # a label
        name: adamw                # kronopt.<name>, else optax.<name>
        learning_rate: [1e-3, 3e-3, 1e-2]  # the peak; one value or a grid
        sweep: {b2: [0.95, 0.999]} # more grid axes (optional)
        schedule: {...}            # overrides the top-level one (optional)
        optional: false            # true: skip if the optimizer is missing
        weight_decay: 1e-4         # any other keyword of the optimizer

Every run of an optimizer shares one compiled chunk: the peak learning rate
and every swept keyword whose default is a float are traced arguments; a
swept integer, boolean or string keyword compiles once per value. The best
grid point minimises the mean over seeds of the final held-out loss and is
flagged when it lies on the edge of its grid (:mod:`experiments.grid`).

Per optimizer the summary reports its best point, the final held-out
metrics, the first evaluation step at which its mean held-out loss reaches
the baseline's final one, its training wall time, and its step time (mean
over all its steps; median over its chunks) as a ratio to the baseline's.
Writes ``results.json`` and the plots of :mod:`experiments.report` to
``output_dir`` and prints the table.
"""

import math
import numbers
import os
from typing import Any, Mapping, Optional

import numpy as np
import tqdm

from experiments import config as config_lib
from experiments import grid
from experiments import optimizers
from experiments import report
from experiments import schedules
from experiments import train
from experiments import workloads

Field = config_lib.Field
RESERVED = ("name", "learning_rate", "sweep", "schedule", "optional")
_OMITTED = object()  # a keyword left to the optimizer's default


def check_workload(value: Any, path: str) -> dict[str, Any]:
  """``{name: <a key of WORKLOADS>, **its constructor's keywords}``."""
  if not isinstance(value, Mapping):
    raise config_lib.ConfigError(f"config key {path!r}: expected a mapping "
                                 f"with a name, got {value!r}.")
  name = config_lib.string(tuple(workloads.WORKLOADS))(
      value.get("name"), f"{path}.name")
  schema = {"name": Field(config_lib.anything),
            **config_lib.signature_schema(workloads.WORKLOADS[name])}
  return config_lib.validate(value, schema, path)


def _is_float_keyword(schema: Optional[Mapping[str, Field]],
                      name: str) -> bool:
  default = schema[name].default if schema and name in schema else None
  return (isinstance(default, numbers.Real)
          and not isinstance(default, (bool, numbers.Integral)))


def check_optimizer(value: Any, path: str) -> dict[str, Any]:
  """One optimizer entry (see the module docstring), normalised: the
  learning rate and every swept axis as a list."""
  if not isinstance(value, Mapping):
    raise config_lib.ConfigError(f"config key {path!r}: expected a mapping "
                                 f"with a name, got {value!r}.")
  name = config_lib.string()(value.get("name"), f"{path}.name")
  optional = config_lib.boolean(value.get("optional", False),
                                f"{path}.optional")
  fn = optimizers.factory(name)
  if fn is None:
    if optional:
      return dict(value)  # checked once the optimizer exists
    raise config_lib.ConfigError(
        f"config key {path + '.name'!r}: {name!r} is not an optimizer of "
        "kronopt or optax (mark the entry `optional: true` to skip it while "
        "it does not exist).")
  keywords = config_lib.signature_schema(fn, skip=("learning_rate",))
  if keywords is None:  # takes **kwargs: every extra key goes through
    keywords = {k: Field(config_lib.anything) for k in value
                if k not in RESERVED}

  def check_sweep(axes, sweep_path):
    if not isinstance(axes, Mapping):
      raise config_lib.ConfigError(f"config key {sweep_path!r}: expected a "
                                   f"mapping of keyword to values.")
    out = {}
    for k, values in axes.items():
      if k not in keywords:
        raise config_lib.ConfigError(
            f"config key '{sweep_path}.{k}' is unknown: not a keyword of "
            f"{name}.")
      if k in value:
        raise config_lib.ConfigError(
            f"config key '{sweep_path}.{k}' is also fixed at '{path}.{k}'.")
      out[k] = config_lib.list_of(keywords[k].check)(values,
                                                     f"{sweep_path}.{k}")
    return out

  schema = {
      "name": Field(config_lib.anything),
      "optional": Field(config_lib.boolean, False),
      "learning_rate": Field(
          config_lib.scalar_or_list(config_lib.number(positive=True))),
      "schedule": Field(config_lib.nested(schedules.SCHEMA), None),
      "sweep": Field(check_sweep, {}),
      **{k: Field(f.check, _OMITTED) for k, f in keywords.items()},
  }
  entry = config_lib.validate(value, schema, path)
  return {k: v for k, v in entry.items() if v is not _OMITTED}


SCHEMA = {
    "experiment": Field(config_lib.string()),
    "title": Field(config_lib.string(), None),
    "workload": Field(check_workload),
    "steps": Field(config_lib.integer(1)),
    "eval_every": Field(config_lib.integer(1)),
    "seeds": Field(config_lib.list_of(config_lib.integer(0)), [0]),
    "schedule": Field(config_lib.nested(schedules.SCHEMA),
                      config_lib.validate({}, schedules.SCHEMA)),
    "baseline": Field(config_lib.string(), "adamw"),
    "optimizers": Field(config_lib.mapping_of(check_optimizer)),
    "output_dir": Field(config_lib.string(), "results/sweep"),
    "progress": Field(config_lib.boolean, True),
    "compiler_options": Field(config_lib.mapping_of(config_lib.anything,
                                                    min_len=0), {}),
}


def check(config: dict[str, Any]) -> dict[str, Any]:
  """The cross-key checks :data:`SCHEMA` cannot express alone."""
  steps, every = config["steps"], config["eval_every"]
  if steps % every:
    raise config_lib.ConfigError(
        f"config key 'eval_every': {every} does not divide steps={steps}.")
  if config["baseline"] not in config["optimizers"]:
    raise config_lib.ConfigError(
        f"config key 'baseline': {config['baseline']!r} is not a label of "
        f"optimizers ({', '.join(config['optimizers'])}).")
  shapes = [("schedule", config["schedule"])] + [
      (f"optimizers.{k}.schedule", e["schedule"])
      for k, e in config["optimizers"].items()
      if e.get("schedule") and optimizers.factory(e["name"])]
  for path, s in shapes:
    if s["name"] != "constant" and not 0 <= s["warmup_steps"] < steps:
      raise config_lib.ConfigError(
          f"config key '{path}.warmup_steps': {s['warmup_steps']} is out of "
          f"range; expected an integer in [0, steps={steps}).")
  return config


def grid_axes(entry: Mapping[str, Any]) -> dict[str, list]:
  return {"learning_rate": entry["learning_rate"], **entry["sweep"]}


def traced_axes(entry: Mapping[str, Any]) -> list[str]:
  """``learning_rate`` and the swept keywords whose default is a float."""
  keywords = config_lib.signature_schema(optimizers.factory(entry["name"]))
  return ["learning_rate"] + [k for k in entry["sweep"]
                              if _is_float_keyword(keywords, k)]


def fixed_keywords(entry: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in entry.items() if k not in RESERVED}


def run_optimizer(workload, label: str, entry: Mapping[str, Any],
                  config: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Every grid point × seed of one optimizer; one record per run."""
  axes, traced = grid_axes(entry), traced_axes(entry)
  shape = schedules.unit(config["steps"],
                         **(entry["schedule"] or config["schedule"]))
  groups: dict[tuple, list] = {}
  for point in grid.points(axes):
    static = tuple((k, v) for k, v in point.items() if k not in traced)
    groups.setdefault(static, []).append(point)
  runs = []
  for static, group in groups.items():
    kwargs = {**fixed_keywords(entry), **dict(static)}
    make_tx = (lambda hp, kwargs=kwargs: optimizers.build_traced(
        entry["name"], kwargs, hp, shape))
    trainer = train.Trainer(workload, make_tx, steps=config["steps"],
                            eval_every=config["eval_every"],
                            compiler_options=config["compiler_options"])
    for point in group:
      for seed in config["seeds"]:
        desc = f"{label} {report.describe_point(point)} seed {seed}"
        with tqdm.tqdm(total=config["steps"], desc=desc, unit="step",
                       disable=not config["progress"]) as bar:
          record = trainer.run(seed, {k: point[k] for k in traced}, bar)
        runs.append({"optimizer": label, "name": entry["name"],
                     "point": point, "seed": seed, **record})
  return runs


def _mean(xs):
  return float(np.mean(xs)) if len(xs) else math.nan


def _curves(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean over seeds of one grid point's curves (NaN where any seed is)."""
  mean = lambda key, sub=None: np.mean(
      [r[key] if sub is None else r[key][sub] for r in runs], 0).tolist()
  out = {"eval_step": runs[0]["eval"]["step"], "train_loss": mean(
      "train_loss"), "eval_seconds": mean("eval", "seconds")}
  for metric in runs[0]["eval"]:
    if metric not in ("step", "seconds"):
      out[f"eval_{metric}"] = mean("eval", metric)
  return out


def steps_to(steps, values, target: Optional[float]) -> Optional[int]:
  """The first step whose value is ``≤ target``; ``None`` if none is."""
  if target is None or not math.isfinite(target):
    return None
  for s, v in zip(steps, values):
    if v is not None and math.isfinite(v) and v <= target:
      return int(s)
  return None


def step_seconds(runs: list[dict[str, Any]], every: int) -> dict[str, float]:
  """Seconds per step over all of an optimizer's runs: the mean (total time
  over total steps) and the median over chunks."""
  chunks = [s / every for r in runs for s in r["chunk_seconds"]]
  return {"mean": _mean(chunks), "median": float(np.median(chunks))
          if chunks else math.nan}


def summarize_optimizer(runs: list[dict[str, Any]], axes, every: int,
                        seeds: int) -> dict[str, Any]:
  """Best point (by mean final held-out loss over seeds) and its numbers."""
  by_point: dict[tuple, list] = {}
  for r in runs:
    by_point.setdefault(grid.key(r["point"]), []).append(r)
  scores = [(rs[0]["point"], _mean([r["eval"]["loss"][-1] for r in rs]))
            for rs in by_point.values()]
  best = grid.best(scores)
  out = {"grid": dict(axes),
         "scores": [{"point": p, "final_val_loss": s} for p, s in scores],
         "best": best, "edge": [] if best is None else grid.edges(axes, best),
         "seeds": seeds,
         "step_seconds": step_seconds(runs, every),
         "compile_seconds": max(r["compile_seconds"] for r in runs)}
  chosen = by_point[grid.key(best)] if best is not None else []
  out["curves"] = _curves(chosen) if chosen else None
  finals = {m: [r["eval"][m][-1] for r in chosen]
            for m in (chosen[0]["eval"] if chosen else ())
            if m not in ("step", "seconds")}
  out["final"] = {m: _mean(v) for m, v in finals.items()}
  if chosen:
    out["final"]["loss_std"] = float(np.std(finals["loss"]))
  out["wall_seconds"] = _mean([r["wall_seconds"] for r in chosen])
  diags = [r["diagnostics"] for r in chosen if r["diagnostics"]]
  out["diagnostics"] = ({k: max(d[k][-1] for d in diags) for k in diags[0]
                         if k != "step"} if diags else None)
  return out


def summarize(runs: list[dict[str, Any]], config: Mapping[str, Any]
              ) -> dict[str, dict[str, Any]]:
  """:func:`summarize_optimizer` per label, then the comparisons to the
  baseline: steps to its final held-out loss and step-time ratios."""
  summary = {}
  for label, entry in config["optimizers"].items():
    mine = [r for r in runs if r["optimizer"] == label]
    if mine:
      summary[label] = summarize_optimizer(
          mine, grid_axes(entry), config["eval_every"], len(config["seeds"]))
  base = summary.get(config["baseline"])
  target = base["final"].get("loss") if base else None
  for s in summary.values():
    c = s["curves"]
    s["steps_to_baseline"] = (steps_to(c["eval_step"], c["eval_loss"],
                                       target) if c else None)
    s["step_time_ratio"] = {
        k: (s["step_seconds"][k] / base["step_seconds"][k] if base
            else math.nan) for k in ("mean", "median")}
  return summary


def run(config: dict[str, Any]) -> dict[str, Any]:
  """Runs the sweep (a config validated by :data:`SCHEMA` and :func:`check`,
  as ``experiments.run`` does); prints the table; writes JSON and plots."""
  workload = workloads.make(**config["workload"])
  out_dir = config["output_dir"]
  os.makedirs(out_dir, exist_ok=True)
  runs, skipped = [], {}
  for label, entry in config["optimizers"].items():
    if optimizers.factory(entry["name"]) is None:
      skipped[label] = f"{entry['name']} is not in kronopt or optax"
      print(f"skipping {label}: {skipped[label]} (optional)")
      continue
    runs += run_optimizer(workload, label, entry, config)
  summary = summarize(runs, config)
  title = config["title"] or config["workload"]["name"]
  print(report.table(summary, config["baseline"]))
  for label, s in summary.items():
    print(f"  {label} grid: " + ", ".join(
        f"{k} {v}" for k, v in s["grid"].items()))
  print("\n".join(report.diagnostics_lines(summary)))
  record = {"config": config, "versions": report.versions(),
            "machine": report.machine(),
            "workload": {"name": config["workload"]["name"],
                         "params": train.param_shapes(workload)},
            "skipped": skipped, "summary": summary, "runs": runs}
  report.write_json(os.path.join(out_dir, "results.json"), record)
  plots = report.plot({k: s["curves"] for k, s in summary.items()
                       if s["curves"]}, out_dir, title)
  print(f"wrote {os.path.join(out_dir, 'results.json')}, "
        f"{', '.join(plots)}")
  return record
