"""``experiment: reproduce.kradagrad_quadratic``: KrADagrad's float32 claim.

Mei, Moreno & Walters, "KrADagrad: Kronecker Approximation-Domination
Gradient Preconditioned Stochastic Optimization", UAI 2023 (abstract):
"Synthetic ill-conditioned experiments show improved performance over
Shampoo for 32-bit precision". docs/algorithms.md §2: minimise
``f(W) = ⟨W, H₀ W H₁⟩`` (:mod:`experiments.reproduce.problems`) with
per-factor condition ``10^c`` for each ``c`` of ``conditions``.

The config is a sweep config (:mod:`experiments.sweep`) run once per
condition, on the ``kronecker_quadratic`` workload with ``c`` set to it,
plus ``reference``: dense Shampoo in float64 (:func:`dense_shampoo`, run
under ``jax.enable_x64`` on a float64 copy of the problem from the same
``W₀``; kronopt's engine is float32 by contract), reported beside the
float32 methods as the reference line. Each method is reported at the best
point of its learning-rate grid (final loss, the mean over seeds).

Writes ``results.json`` (per condition: every method's best point, final
loss, refresh failures; the ratio of KrADagrad★ to Shampoo float32) and
``kradagrad_quadratic.png`` (final loss against the condition, and the loss
curves per condition) to ``output_dir``, and each condition's sweep record
and plots to ``output_dir/c<c>/``.
"""

import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import tqdm

from experiments import config as config_lib
from experiments import report
from experiments import sweep
from experiments import train
from experiments.reproduce import common
from experiments.reproduce import problems
from experiments.workloads import base
from experiments.workloads import quadratic
from kronopt.linalg import lapack
from kronopt.linalg import roots as roots_lib

Field = config_lib.Field
FIGURE = "kradagrad_quadratic.png"

REFERENCE_SCHEMA = {
    "label": Field(config_lib.string(), "shampoo_fp64"),
    "learning_rate": Field(
        config_lib.scalar_or_list(config_lib.number(positive=True))),
    "epsilon": Field(config_lib.number(positive=True), 1e-8),
    "precondition_every": Field(config_lib.integer(1), 3),
}

SCHEMA = common.sweep_schema(
    conditions=Field(config_lib.list_of(config_lib.number(positive=True))),
    reference=Field(config_lib.nested(REFERENCE_SCHEMA), None),
    star=Field(config_lib.string(), "kradagrad_star_fp32",
               "label of KrADagrad★ (the claim's subject)"),
    shampoo=Field(config_lib.string(), "shampoo_fp32",
                  "label of Shampoo float32 (the claim's comparison)"),
)


def check(config: dict[str, Any]) -> dict[str, Any]:
  """Sweep's cross-key checks; the workload must be the quadratic."""
  if config["workload"]["name"] != "kronecker_quadratic":
    raise config_lib.ConfigError(
        f"config key 'workload.name': {config['workload']['name']!r}; "
        "expected 'kronecker_quadratic'.")
  for key in ("star", "shampoo"):
    if config[key] not in config["optimizers"]:
      raise config_lib.ConfigError(
          f"config key {key!r}: {config[key]!r} is not a label of "
          f"optimizers ({', '.join(config['optimizers'])}).")
  return sweep.check(config)


class DenseShampooState(NamedTuple):
  count: jax.Array
  stats: tuple
  roots: tuple


def dense_shampoo(*, every: int, epsilon: float
                  ) -> optax.GradientTransformation:
  """Shampoo on one matrix ``W``, grafted onto the gradient norm, in the
  dtype of ``W`` (float64 under ``jax.enable_x64``).

  ``L ← L + G Gᵀ``, ``R ← R + Gᵀ G`` (β₂ = 1); every ``every`` steps from
  the first, ``P = (max(λ, 0) + ε)^{-1/4}`` on the eigenvectors of each
  statistic (the paper's absolute damping, negative rounding clipped);
  ``U = D ‖G‖_F / ‖D‖_F`` with ``D = P_L G P_R``: what
  ``kronopt.shampoo(lr, b1=0, nesterov=False, graft_type="sgd",
  relative_epsilon=False, start_preconditioning_step=0)`` does in float32.
  """

  def init_fn(w):
    m, n = w.shape
    zeros = lambda d: jnp.zeros((d, d), w.dtype)
    eye = lambda d: jnp.eye(d, dtype=w.dtype)
    return DenseShampooState(jnp.zeros([], jnp.int32), (zeros(m), zeros(n)),
                             (eye(m), eye(n)))

  def root(s):
    lam, q = lapack.eigh(s[None])
    return roots_lib.power_from_eigen(
        q, jnp.maximum(lam, 0.0), -0.25, epsilon=epsilon,
        relative_epsilon=False, clip_negative=False)[0][0]

  def update_fn(updates, state, params=None):
    del params
    g = updates["w"]
    stats = (state.stats[0] + g @ g.T, state.stats[1] + g.T @ g)
    roots = jax.lax.cond(state.count % every == 0,
                         lambda s, _: tuple(root(x) for x in s),
                         lambda _, r: r, stats, state.roots)
    d = roots[0] @ g @ roots[1]
    u = d * jnp.linalg.norm(g) / jnp.maximum(jnp.linalg.norm(d), 1e-300)
    return {"w": u}, DenseShampooState(state.count + 1, stats, roots)

  return optax.GradientTransformation(
      lambda params: init_fn(params["w"]), update_fn)


@base.register
class Float64Quadratic(quadratic.KroneckerQuadratic):
  """The quadratic in float64 from the float32 workload's ``W₀``."""

  def init(self, key):
    shape = self.h0.shape[:1] + self.h1.shape[:1]
    return {"w": jax.random.normal(key, shape, jnp.float32).astype(
        self.h0.dtype)}


def run_reference(config, c: float) -> list[dict[str, Any]]:
  """Every learning rate × seed of the float64 reference at condition c."""
  ref, wl = config["reference"], config["workload"]
  h0, h1, _ = problems.kronecker_quadratic(wl["d"], c, wl["problem_seed"])
  make_tx = lambda hp: optax.chain(
      dense_shampoo(every=ref["precondition_every"], epsilon=ref["epsilon"]),
      optax.scale_by_learning_rate(hp["learning_rate"]))
  runs = []
  with jax.enable_x64(True):
    workload = Float64Quadratic(jnp.asarray(h0, jnp.float64),
                                jnp.asarray(h1, jnp.float64))
    trainer = train.Trainer(workload, make_tx, steps=config["steps"],
                            eval_every=config["eval_every"],
                            compiler_options=config["compiler_options"])
    for lr in ref["learning_rate"]:
      for seed in config["seeds"]:
        with tqdm.tqdm(total=config["steps"], unit="step",
                       desc=f"{ref['label']} {lr:g} seed {seed}",
                       disable=not config["progress"]) as bar:
          rec = trainer.run(seed, {"learning_rate": lr}, bar)
        runs.append({"optimizer": ref["label"], "name": "dense_shampoo",
                     "point": {"learning_rate": lr}, "seed": seed, **rec})
  return runs


def _final(s):
  loss = s["final"].get("loss")
  return math.inf if loss is None or not math.isfinite(loss) else loss


def run_condition(config, c: float) -> dict[str, Any]:
  """One condition: the sweep plus the reference; its record (also written
  to ``output_dir/c<c>/``)."""
  cfg = {**config, "workload": {**config["workload"], "c": c},
         "output_dir": os.path.join(config["output_dir"], f"c{c:g}"),
         "title": f"{config['title'] or 'Kronecker quadratic'}, "
                  f"d = {config['workload']['d']}, condition 1e{c:g}"}
  workload = quadratic.make(**{k: v for k, v in cfg["workload"].items()
                               if k != "name"})
  ref = config["reference"]
  extra = run_reference(config, c) if ref else []
  entries = {ref["label"]: {"learning_rate": ref["learning_rate"]}} if ref \
      else {}
  runs, summary = common.run_sweep(workload, cfg, extra, entries)
  print(f"condition 1e{c:g}:")
  print(report.table(summary, cfg["baseline"]))
  print("\n".join(report.diagnostics_lines(summary)))
  rec = common.record(cfg, workload, summary=summary, runs=runs)
  common.write(cfg["output_dir"], rec)
  report.plot({k: s["curves"] for k, s in summary.items() if s["curves"]},
              cfg["output_dir"], cfg["title"])
  return summary


def claim(summaries, config) -> dict[str, Any]:
  """Per condition: final losses of KrADagrad★ and Shampoo float32, and
  their ratio (below 1: KrADagrad★ improves on Shampoo float32)."""
  out = {}
  for c, s in summaries.items():
    star, sh = _final(s[config["star"]]), _final(s[config["shampoo"]])
    out[c] = {"star": star, "shampoo_fp32": sh,
              "ratio": star / sh if math.isfinite(sh) and sh > 0 else 0.0}
  return out


def table(summaries) -> dict[str, dict[str, Any]]:
  """``{condition: {label: best lr, final loss, edge, failures}}``."""
  out = {}
  for c, s in summaries.items():
    out[c] = {}
    for label, m in s.items():
      diag = m.get("diagnostics") or {}
      out[c][label] = {
          "learning_rate": (m["best"] or {}).get("learning_rate"),
          "edge": m["edge"], "final_loss": _final(m),
          "initial_loss": m["curves"]["eval_loss"][0] if m["curves"] else None,
          "refresh_failures": diag.get("refresh_failures")}
  return out


def markdown(rows) -> str:
  """Methods × conditions: final loss at the best rate, ``[nF]`` failures."""
  conds = list(rows)
  lines = ["| method | " + " | ".join(f"c={c}" for c in conds) + " |",
           "|---|" + "---|" * len(conds)]
  for label in rows[conds[0]]:
    cells = []
    for c in conds:
      r = rows[c][label]
      fail = r["refresh_failures"]
      cell = f"{r['final_loss']:.4g} @{r['learning_rate']:g}" if (
          r["learning_rate"] is not None) else "diverged"
      cell += f" [{int(fail)}F]" if fail else ""
      cell += " (edge)" if r["edge"] else ""
      cells.append(cell)
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def figure(summaries, config):
  """Final loss against the condition; the loss curves per condition."""
  plt = report.plt
  conds = list(summaries)
  fig, axes = plt.subplots(1, 1 + len(conds),
                           figsize=(3.4 * (1 + len(conds)), 3.4))
  labels = list(summaries[conds[0]])
  for i, label in enumerate(labels):
    finals = [_final(summaries[c][label]) for c in conds]
    axes[0].semilogy([float(c) for c in conds], finals, "o-", color=f"C{i}",
                     label=label, lw=2.5 if label == config["star"] else 1.2)
    for ax, c in zip(axes[1:], conds):
      curves = summaries[c][label]["curves"]
      if curves:
        ax.semilogy(curves["eval_step"], curves["eval_loss"], color=f"C{i}",
                    lw=2.5 if label == config["star"] else 1.2)
  axes[0].set(xlabel="log10 condition per factor",
              ylabel="final loss (best learning rate)",
              title=f"d = {config['workload']['d']}, "
                    f"{config['steps']} steps")
  axes[0].legend(fontsize=6)
  for ax, c in zip(axes[1:], conds):
    ax.set(xlabel="step", title=f"condition 1e{c}")
  for ax in axes:
    ax.grid(alpha=0.3)
  return fig


def run(config: dict[str, Any]) -> dict[str, Any]:
  """Every condition, then the figure, the table and ``results.json``."""
  summaries = {f"{c:g}": run_condition(config, c)
               for c in config["conditions"]}
  rows = table(summaries)
  result = claim(summaries, config)
  print(markdown(rows))
  print("KrADagrad★ / Shampoo float32 final loss: " + ", ".join(
      f"c={c}: {r['ratio']:.3g}" for c, r in result.items()))
  rec = common.record(config, None, table=rows, claim=result)
  rec["paths"] = common.write(config["output_dir"], rec,
                              figure(summaries, config), FIGURE)
  return rec
