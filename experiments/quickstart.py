"""Quickstart: Shampoo against Adam on the digits MLP at equal steps.

Config keys: ``output_dir``, ``steps``, ``seed``, ``hidden`` and
``optimizers``, a mapping from a label to an optimizer spec (see
:mod:`experiments.optimizers`). Writes ``results.json`` and ``loss.png`` to
``output_dir`` and prints a comparison table.
"""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from experiments import optimizers
from experiments.workloads import digits

DEFAULT_OUTPUT_DIR = "results/quickstart"


def train_all(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Trains every optimizer of the config on the same data and init."""
  data = digits.load(seed=config.get("seed", 0))
  results = {}
  for label, spec in config["optimizers"].items():
    result = digits.train(
        optimizers.build(spec), config["steps"], data=data,
        hidden=config.get("hidden", (128, 128)), seed=config.get("seed", 0))
    results[label] = {
        "spec": dict(spec),
        "steps": config["steps"],
        "final_train_loss": float(result.losses[-1]),
        "test_accuracy": result.test_accuracy,
        "wall_time_s": result.wall_time,
        "losses": result.losses.tolist(),
    }
  return results


def table(results: dict[str, dict[str, Any]]) -> str:
  """A markdown table of the final numbers."""
  rows = ["| optimizer | learning rate | steps | final train loss | "
          "test accuracy | wall time (s) |",
          "|---|---|---|---|---|---|"]
  for label, r in results.items():
    rows.append(f"| {label} | {r['spec'].get('learning_rate')} | "
                f"{r['steps']} | {r['final_train_loss']:.4g} | "
                f"{r['test_accuracy']:.4f} | {r['wall_time_s']:.2f} |")
  return "\n".join(rows)


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
  """Training loss against steps, log scale, one line per optimizer."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, r in results.items():
    ax.plot(r["losses"], label=label)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (full batch)")
  ax.set_title("digits MLP")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Trains, prints the table, writes ``results.json`` and ``loss.png``."""
  out_dir = config.get("output_dir", DEFAULT_OUTPUT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  results = train_all(config)
  print(table(results))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump({"config": config, "results": results}, f, indent=1)
  plot(results, os.path.join(out_dir, "loss.png"))
  print(f"wrote {out_dir}/results.json and {out_dir}/loss.png")
  return results
