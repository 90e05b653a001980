"""Helpers shared by the reproductions: sweeps on a given workload, records.

A reproduction's training is :mod:`experiments.sweep`'s (its config keys,
:func:`experiments.sweep.run_optimizer` and
:func:`experiments.sweep.summarize`); what it adds is a measurement and a
figure. Everything it writes goes through :mod:`experiments.report`.
"""

import os
from typing import Any, Mapping, Optional

from experiments import report
from experiments import sweep
from experiments import train
from experiments.workloads import base


def sweep_schema(**extra) -> dict:
  """:data:`experiments.sweep.SCHEMA` plus a reproduction's own keys."""
  return {**sweep.SCHEMA, **extra}


def run_sweep(workload: base.Workload, config: Mapping[str, Any],
              extra_runs: Optional[list] = None,
              extra_entries: Optional[Mapping[str, Any]] = None):
  """``(runs, summary)`` of every optimizer of a sweep config on
  ``workload``; ``extra_runs`` (records of :class:`experiments.train.Trainer`
  runs made elsewhere, labelled by ``extra_entries``' keys, whose values give
  their ``learning_rate`` grid) are summarized beside them."""
  runs = []
  for label, entry in config["optimizers"].items():
    runs += sweep.run_optimizer(workload, label, entry, config)
  runs += extra_runs or []
  extra = extra_entries or {}
  entries = {**config["optimizers"],
             **{k: {"sweep": {}, **v} for k, v in extra.items()}}
  summary = sweep.summarize(runs, {**config, "optimizers": entries})
  return runs, summary


def record(config: Mapping[str, Any], workload: Optional[base.Workload],
           **fields) -> dict:
  """The JSON record: config, versions, machine, parameter shapes, fields."""
  out = {"config": dict(config), "versions": report.versions(),
         "machine": report.machine()}
  if workload is not None:
    out["workload"] = {"name": config["workload"]["name"],
                       "params": train.param_shapes(workload)}
  return {**out, **fields}


def write(out_dir: str, rec: Mapping[str, Any], fig=None,
          figure_name: Optional[str] = None) -> list:
  """Writes ``results.json`` (and the figure) to ``out_dir``; their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "results.json")]
  report.write_json(paths[0], rec)
  if fig is not None:
    paths.append(os.path.join(out_dir, figure_name))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    report.plt.close(fig)
  print(f"wrote {', '.join(paths)}")
  return paths
