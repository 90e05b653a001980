"""What a sweep writes: the JSON record, the summary table and the plots.

The JSON holds the validated config, the package versions and the machine,
so that a figure can be traced to what produced it; step times in it are
only meaningful on a quiet machine (they are measured, never asserted).
"""

import importlib.metadata
import json
import math
import os
import subprocess
from typing import Any, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments import bench

PACKAGES = ("jax", "jaxlib", "optax", "flax", "kronopt", "numpy")
PLOTS = ("loss_vs_steps.png", "loss_vs_time.png")


def _git(*args: str) -> Optional[str]:
  try:
    return subprocess.run(["git", *args], capture_output=True, text=True,
                          check=True,
                          cwd=os.path.dirname(__file__)).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def versions() -> dict[str, Any]:
  """The installed versions of :data:`PACKAGES`; the checkout's git commit
  and whether tracked files differ from it (``None`` outside a checkout)."""
  out: dict[str, Any] = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  out["git_commit"] = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain", "--untracked-files=no")
  out["git_dirty"] = None if status is None else bool(status)
  return out


def machine() -> dict[str, Any]:
  """Platform, CPU count, cores used, JAX backend and device kind."""
  return bench.machine()


def write_json(path: str, record: Mapping[str, Any]) -> None:
  """``record`` as JSON; NaN and infinities as ``null``."""
  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  with open(path, "w") as f:
    json.dump(clean(record), f, indent=1)


def _fmt(x: Optional[float], spec: str = ".4g") -> str:
  return "—" if x is None or not math.isfinite(x) else format(x, spec)


def describe_point(point: Optional[Mapping[str, Any]],
                   edge: Sequence[str] = ()) -> str:
  """``3e-03, b2=0.95 (edge: learning_rate)``."""
  if point is None:
    return "— (every run diverged)"
  text = ", ".join(f"{v:g}" if k == "learning_rate" else f"{k}={v}"
                   for k, v in point.items())
  return text + (f" (edge: {', '.join(edge)})" if edge else "")


def table(summary: Mapping[str, Mapping[str, Any]], baseline: str) -> str:
  """A markdown table: one row per optimizer at its best grid point."""
  accuracy = any("accuracy" in s["final"] for s in summary.values())
  head = (["optimizer", "best lr", "final val loss"]
          + (["final val accuracy"] if accuracy else [])
          + [f"steps to {baseline}'s final val loss", "wall time (s)",
             f"step time / {baseline} (mean)", "(median)"])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, s in summary.items():
    final = s["final"]
    loss = _fmt(final.get("loss"))
    if s["seeds"] > 1 and final.get("loss") is not None:
      loss += f" ± {_fmt(final.get('loss_std'), '.2g')}"
    cells = [label, describe_point(s["best"], s["edge"]), loss]
    if accuracy:
      cells.append(_fmt(final.get("accuracy"), ".4f"))
    steps = s["steps_to_baseline"]
    cells += ["—" if steps is None else str(steps),
              _fmt(s["wall_seconds"], ".3g"),
              _fmt(s["step_time_ratio"]["mean"], ".2f"),
              _fmt(s["step_time_ratio"]["median"], ".2f")]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def diagnostics_lines(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """kronopt's diagnostics at the end of each best run (worst over seeds)."""
  lines = []
  for label, s in summary.items():
    if s.get("diagnostics"):
      lines.append(f"  {label} diagnostics: " + ", ".join(
          f"{k} {v:.3g}" for k, v in s["diagnostics"].items()))
  return lines


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (shorter at the start)."""
  c = np.concatenate([[0.0], np.cumsum(x)])
  n = np.arange(1, len(x) + 1)
  lo = np.maximum(n - window, 0)
  return (c[n] - c[lo]) / (n - lo)


def _log_scale(values) -> bool:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)])
  return v.size > 0 and v.min() > 0 and v.max() / v.min() > 20


def plot(curves: Mapping[str, Mapping[str, Any]], out_dir: str,
         title: str) -> list[str]:
  """``loss_vs_steps.png`` and ``loss_vs_time.png`` of each optimizer's best
  point (mean over seeds): held-out loss at the evaluations (markers) and
  the smoothed training loss (thin) against steps; held-out loss against
  training wall-clock seconds."""
  paths = [os.path.join(out_dir, name) for name in PLOTS]
  figs = [plt.subplots(figsize=(6.4, 4.2)) for _ in PLOTS]
  every = [v for c in curves.values() for v in c["eval_loss"]]
  for i, (label, c) in enumerate(curves.items()):
    color = f"C{i}"
    (_, ax_s), (_, ax_t) = figs
    ax_s.plot(c["eval_step"], c["eval_loss"], "o-", color=color, ms=3,
              label=f"{label} (held-out)")
    train = np.asarray(c["train_loss"], np.float64)
    ax_s.plot(np.arange(1, len(train) + 1),
              _smooth(train, max(len(train) // 20, 1)), "-", color=color,
              lw=0.7, alpha=0.6, label=f"{label} (train, smoothed)")
    ax_t.plot(c["eval_seconds"], c["eval_loss"], "o-", color=color, ms=3,
              label=label)
  for (fig, ax), xlabel, path in zip(
      figs, ("step", "training wall-clock (s, compilation excluded)"), paths):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    if _log_scale(every):
      ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return paths
