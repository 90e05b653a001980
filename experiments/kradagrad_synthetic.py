"""KrADagrad's synthetic float32 experiment (Mei et al. 2023; ALGORITHMS §2).

Minimise the ill-conditioned Kronecker quadratic ``f(W) = ⟨W, H₀ W H₁⟩``,
``H_i = Q_i diag(λ) Q_iᵀ`` with random orthogonal ``Q_i`` and
``λ_j = 10^{-s_j²}``, ``s_j`` evenly spaced on ``[0, √c]``, rescaled so that
``max λ = 10`` (condition ``10^c`` per factor, ``10^{2c}`` for the Hessian).
From the same ``W₀``, for each ``c``:

* ``shampoo_fp64`` -- Shampoo with the paper's absolute damping
  ``(L + εI)^{-1/4}`` in float64 (a dense reference under
  ``jax.enable_x64``, with kronopt's eigh root; the engine is float32-only);
* ``shampoo_fp32`` -- ``kronopt.scale_by_shampoo(relative_epsilon=False)``;
* ``kradagrad_star_fp32`` -- ``kronopt.scale_by_kradagrad(variant="star")``;
* ``kradagrad_fp32`` -- ``kronopt.scale_by_kradagrad(variant="single_axis")``;
* ``sgd`` and ``adam`` (optax).

The preconditioned directions are grafted onto the gradient's norm
(``kronopt.graft(..., "sgd")``), so that one learning-rate grid serves all;
every method is run on the whole grid and reported at its best final loss.
β₂ = 1, roots every ``precondition_every`` steps from the first step.

The claim to check: KrADagrad★ in float32 is unaffected by float32, while
Shampoo in float32 degrades (its roots are rejected as non-finite) as ``c``
grows.

    python -m experiments.kradagrad_synthetic configs/kradagrad_synthetic.yaml
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronopt
from kronopt.linalg import roots as roots_lib

DEFAULTS = dict(
    d=128,
    conditions=[2, 3, 4, 5],
    steps=250,
    precondition_every=3,
    epsilon=1e-8,
    learning_rates=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0],
    seed=0,
    output_dir="results/kradagrad_synthetic",
)
METHODS = ("shampoo_fp64", "shampoo_fp32", "kradagrad_star_fp32",
           "kradagrad_fp32", "sgd", "adam")


def kronecker_quadratic(d, c, seed):
  """``(H₀, H₁, W₀)`` in float64 numpy."""
  rng = np.random.default_rng(seed)
  lam = 10.0 ** (-np.linspace(0.0, np.sqrt(c), d) ** 2)
  lam *= 10.0 / lam.max()

  def factor():
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * lam) @ q.T

  return factor(), factor(), rng.standard_normal((d, d))


def quadratic_loss(w, h0, h1):
  return jnp.sum(w * (h0 @ w @ h1))


class DenseShampooState(NamedTuple):
  count: jax.Array
  stats: tuple
  roots: tuple
  failures: jax.Array


def shampoo_fp64(*, every, epsilon):
  """Dense Shampoo grafted onto the gradient norm, entirely in float64.

  ``L ← L + G Gᵀ``, ``R ← R + Gᵀ G`` (β₂ = 1); every ``every`` steps from the
  first, ``P = (S + εI)^{-1/4}`` by kronopt's eigh root (absolute damping; a
  non-finite root is rejected and counted, as kronopt's guard does);
  ``U = D ‖G‖_F / ‖D‖_F`` with ``D = P_L G P_R``. kronopt's engine and graft
  work in float32, so the float64 reference is this dense transform, run
  under ``jax.enable_x64(True)`` on float64 arrays.
  """

  def init_fn(w):
    z, eye = jnp.zeros_like(w), jnp.eye(w.shape[0], dtype=w.dtype)
    return DenseShampooState(jnp.zeros([], jnp.int32), (z, z), (eye, eye),
                             jnp.zeros([], jnp.int32))

  def refresh(stats, roots):
    new = [roots_lib.inverse_root_eigh(s[None], 4, epsilon=epsilon,
                                       relative_epsilon=False)[0][0]
           for s in stats]
    ok = [jnp.all(jnp.isfinite(n)) for n in new]
    return (tuple(jnp.where(k, n, o) for k, n, o in zip(ok, new, roots)),
            sum((~k).astype(jnp.int32) for k in ok))

  def update_fn(g, state, params=None):
    del params
    stats = (state.stats[0] + g @ g.T, state.stats[1] + g.T @ g)
    roots, failed = jax.lax.cond(
        state.count % every == 0, refresh,
        lambda _, r: (r, jnp.zeros([], jnp.int32)), stats, state.roots)
    d = roots[0] @ g @ roots[1]
    u = d * jnp.linalg.norm(g) / jnp.maximum(jnp.linalg.norm(d), 1e-300)
    return u, DenseShampooState(state.count + 1, stats, roots,
                                state.failures + failed)

  return optax.GradientTransformation(init_fn, update_fn)


def _grafted(direction):
  return kronopt.graft(direction, "sgd")


def refresh_failures(state):
  """Rejected roots counted in an optimizer state (0 without a guard)."""
  if kronopt.engine.find_states(state):
    return kronopt.diagnostics(state)["refresh_failures"]
  if isinstance(state, DenseShampooState):
    return state.failures
  return jnp.zeros([], jnp.int32)


def make_direction(method, cfg):
  """The transform whose update ``u`` gives ``W ← W − lr·u``."""
  common = dict(block_size=cfg["d"], b2=1.0, epsilon=cfg["epsilon"],
                precondition_every=cfg["precondition_every"],
                start_preconditioning_step=0)
  if method == "shampoo_fp64":
    return shampoo_fp64(every=cfg["precondition_every"],
                        epsilon=cfg["epsilon"])
  if method == "shampoo_fp32":
    return _grafted(kronopt.scale_by_shampoo(relative_epsilon=False,
                                             **common))
  if method == "kradagrad_star_fp32":
    return _grafted(kronopt.scale_by_kradagrad(variant="star", **common))
  if method == "kradagrad_fp32":
    return _grafted(kronopt.scale_by_kradagrad(variant="single_axis",
                                               **common))
  if method == "sgd":
    return optax.identity()
  if method == "adam":
    return optax.scale_by_adam()
  raise ValueError(f"method={method!r}; expected one of {METHODS}.")


def make_runner(tx, steps):
  """A jitted ``(W₀, H₀, H₁, lr) -> (loss curve [steps+1], failures)``."""

  def run(w, h0, h1, lr):
    def step(carry, _):
      w, s = carry
      loss, g = jax.value_and_grad(quadratic_loss)(w, h0, h1)
      u, s = tx.update(g, s, w)
      return (w - lr * u, s), loss

    (w, s), losses = jax.lax.scan(step, (w, tx.init(w)), None, length=steps)
    curve = jnp.concatenate([losses, quadratic_loss(w, h0, h1)[None]])
    return curve, refresh_failures(s)

  return jax.jit(run)


def run_method(method, cfg, problems):
  """Loss curves of one method over every condition and learning rate."""
  fp64 = method.endswith("fp64")
  dtype = np.float64 if fp64 else np.float32
  with jax.enable_x64(fp64):
    runner = make_runner(make_direction(method, cfg), cfg["steps"])
    out = {}
    for c, (h0, h1, w0) in problems.items():
      args = [jnp.asarray(a, dtype) for a in (w0, h0, h1)]
      out[c] = {}
      for lr in cfg["learning_rates"]:
        curve, failures = runner(*args, jnp.asarray(lr, dtype))
        out[c][lr] = (np.asarray(curve, np.float64), int(failures))
  return out


def _final(curve):
  last = float(curve[-1])
  return last if np.isfinite(last) else float("inf")


def summarise(curves, problems):
  """Per condition and method: the best learning rate and its final loss."""
  table = {}
  for c in problems:
    table[str(c)] = {}
    for method in curves:
      runs = curves[method][c]
      lr = min(runs, key=lambda k: _final(runs[k][0]))
      curve, failures = runs[lr]
      table[str(c)][method] = dict(
          learning_rate=lr, final_loss=_final(curve),
          initial_loss=float(curve[0]), refresh_failures=failures,
          all_final_losses={str(k): _final(v[0]) for k, v in runs.items()})
  return table


def plot(curves, table, cfg):
  """One loss-curve figure per condition, each method at its best rate."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  for c in cfg["conditions"]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in curves:
      lr = table[str(c)][method]["learning_rate"]
      curve = curves[method][c][lr][0]
      ax.semilogy(curve, label=f"{method} (lr {lr:g})")
    ax.set(xlabel="step", ylabel="f(W)",
           title=f"d = {cfg['d']}, per-factor condition 1e{c}")
    ax.legend(fontsize=7)
    path = os.path.join(cfg["output_dir"], f"loss_c{c}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
  return paths


def format_table(table):
  header = "method".ljust(22) + "".join(f"c={c}".rjust(24) for c in table)
  lines = [header]
  for method in next(iter(table.values())):
    cells = []
    for c in table:
      r = table[c][method]
      fail = f" [{r['refresh_failures']}F]" if r["refresh_failures"] else ""
      cells.append(f"{r['final_loss']:.3e} @{r['learning_rate']:g}{fail}"
                   .rjust(24))
    lines.append(method.ljust(22) + "".join(cells))
  return "\n".join(lines)


def run(config: dict) -> dict:
  """Runs the experiment; returns (and saves as JSON) the table of losses."""
  cfg = {**DEFAULTS, **{k: v for k, v in config.items()
                        if k != "experiment"}}
  os.makedirs(cfg["output_dir"], exist_ok=True)
  problems = {c: kronecker_quadratic(cfg["d"], c, cfg["seed"])
              for c in cfg["conditions"]}
  start = time.time()
  curves = {m: run_method(m, cfg, problems) for m in METHODS}
  table = summarise(curves, problems)
  result = dict(config=cfg, table=table, plots=plot(curves, table, cfg),
                seconds=time.time() - start)
  with open(os.path.join(cfg["output_dir"], "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(format_table(table))
  return result


def main(argv):
  import yaml
  path = argv[1] if len(argv) > 1 else "configs/kradagrad_synthetic.yaml"
  with open(path) as f:
    run(yaml.safe_load(f) or {})


if __name__ == "__main__":
  main(sys.argv)
