"""``experiment: reproduce.kfac_inversion``: K-FAC's inversion error and cost.

Puiu, "Brand New K-FACs: Speeding up K-FAC with Online Decomposition
Updates" (arXiv 2210.08494) and "Randomized K-FACs" (RS-KFAC, arXiv
2206.15397); docs/algorithms.md §6. The K-factors ``M ← ρ M + (1−ρ) Â Âᵀ``
are kept by kronopt's K-FAC as rank-``r`` eigendecompositions ``U D Uᵀ``
that follow ``M`` by a randomized EVD (``rsvd``), Brand's online update
(``brand``), Brand's update with periodic RSVD resets (``brand_rsvd``) or
with Rayleigh–Ritz corrections (``brand_corrected``); ``eigh`` (exact K-FAC,
refreshed every ``T_inv`` steps) is the reference.

**Inversion error.** For each width of ``widths``, the digits MLP ``64 →
width × depth → 10`` (:func:`experiments.workloads.digits.mlp`) is trained
by ``kronopt.kfac`` (the ``train`` entry), its statistics taken by
:class:`kronopt.flax.nnx.KFACCapture`. The same gradients and statistics
also go, every step, to one ``kronopt.scale_by_kfac`` per method of
``methods`` (their directions are discarded), so every method follows the
same ``M`` with exactly the optimizer's code, schedule and hyperparameters
(``kfac``: any keyword of ``scale_by_kfac``; unset ones keep its defaults,
rank 220 capped at ``d``, ρ 0.95, ``T_cov`` 10, ``T_inv`` 100, …). Beside
them the exact EMA of every factor is kept in float64 numpy. After every
statistics step (``t % T_cov == 0``), per layer factor:

* the relative spectral error ``‖M − U D Uᵀ‖₂ / ‖M‖₂`` of each method, and
  the best any rank-``r`` approximation can do, ``λ_{r+1}(M)/λ_1(M)``;
* the damped-inverse application error ``‖Ṽ − V‖_F / ‖V‖_F`` of the
  layer's gradient block ``G``: ``Ṽ`` applies the method's inverse
  (:func:`kronopt.linalg.lowrank.inverse_apply`, the spectrum continued at
  the smallest kept eigenvalue, damping ``λ·max D``) and ``V = (M +
  λ λ_1(M) I)^{-1}`` along that factor's axis of ``G``, in float64.

The figure ``inversion_error.png`` shows, per width, the worst factor of
the network at each step.

**Update time.** ``timing.widths`` (``d``, 256 to 4096): the seconds of one
K-factor update, ``eigh`` of a ``d×d`` EMA (:func:`lowrank.from_eigh`, what
exact K-FAC refreshes) against Brand's update of a rank-``r`` decomposition
by ``timing.columns`` new columns (:func:`lowrank.brand_update`) and the
RSVD (:func:`lowrank.randomized_eigh`), each jitted, the median of
``timing.repeats`` calls after a warm-up call, on log-log axes with
slope-1 and slope-3 guides (``update_time.png``). Timings are only
meaningful on a quiet machine; the record keeps the load average.

Writes ``results.json`` (per width: factors, steps, every error curve,
losses; the timing table and fitted slopes; the claims) and both figures to
``output_dir``.
"""

import inspect
import math
import os
import statistics
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx

import kronopt
from experiments import config as config_lib
from experiments import report
from experiments import train
from experiments.workloads import base
from experiments.workloads import digits
from kronopt.flax import nnx as kfac_nnx
from kronopt.linalg import lowrank
from kronopt.preconditioners import kfac as kfac_lib
from kronopt.preconditioners import kfac_layers

Field = config_lib.Field
ERROR_FIGURE, TIME_FIGURE = "inversion_error.png", "update_time.png"
FACTORS = ("A", "Gamma")  # input side (block axis 0), output side (axis 1)
TIMED = ("eigh", "brand", "rsvd")
FLOOR = 1e-12  # plotted in place of an exact zero on log axes

# scale_by_kfac's keywords (with its defaults) that the study may set.
KFAC_SCHEMA = config_lib.signature_schema(
    kronopt.scale_by_kfac, skip=("method", "layers", "shard_axis", "mesh"))
_UNSET = object()  # a keyword of ``train`` left to the ``kfac`` settings
TRAIN_DEFAULT_METHOD = inspect.signature(kronopt.kfac).parameters[
    "method"].default
TRAIN_SCHEMA = {
    **{k: Field(f.check, _UNSET) for k, f in config_lib.signature_schema(
        kronopt.kfac, skip=("layers", "shard_axis", "mesh")).items()},
    "learning_rate": Field(config_lib.number(positive=True)),
}
TIMING_SCHEMA = {
    "widths": Field(config_lib.list_of(config_lib.integer(1), min_len=0),
                    [256, 512, 1024, 2048, 4096]),
    "columns": Field(config_lib.integer(1), 128,
                     "columns of B = √(1−ρ) Â (the batch)"),
    "repeats": Field(config_lib.integer(1), 5),
    "seed": Field(config_lib.integer(0), 0),
}

SCHEMA = {
    "experiment": Field(config_lib.string()),
    "title": Field(config_lib.string(), None),
    "widths": Field(config_lib.list_of(config_lib.integer(1)), [256, 512]),
    "depth": Field(config_lib.integer(1), 2, "hidden layers of the MLP"),
    "batch_size": Field(config_lib.integer(1), 128),
    "steps": Field(config_lib.integer(1), 600),
    "seed": Field(config_lib.integer(0), 0),
    "methods": Field(config_lib.list_of(
        config_lib.string(kfac_lib.METHODS)), list(kfac_lib.METHODS)),
    "kfac": Field(config_lib.nested(KFAC_SCHEMA), {}),
    "train": Field(config_lib.nested(TRAIN_SCHEMA)),
    "timing": Field(config_lib.nested(TIMING_SCHEMA), {}),
    "output_dir": Field(config_lib.string(),
                        "results/reproduce/kfac_inversion_error"),
    "progress": Field(config_lib.boolean, True),
    "compiler_options": Field(config_lib.mapping_of(config_lib.anything,
                                                    min_len=0), {}),
}


def check(config: dict[str, Any]) -> dict[str, Any]:
  """Fills nested defaults; the methods are distinct, ``steps`` reaches a
  statistics step."""
  config["kfac"] = config_lib.validate(config["kfac"], KFAC_SCHEMA, "kfac")
  config["timing"] = config_lib.validate(config["timing"], TIMING_SCHEMA,
                                         "timing")
  config["train"] = {k: v for k, v in config["train"].items()
                     if v is not _UNSET}
  if len(set(config["methods"])) != len(config["methods"]):
    raise config_lib.ConfigError(
        f"config key 'methods': {config['methods']} repeats a method.")
  kronopt.scale_by_kfac(**config["kfac"])  # ValueError naming the argument
  return config


# ------------------------------------------------------------- the study --


def layer_name(layer: kfac_layers.ResolvedLayer) -> str:
  """``hidden/0`` for the kernel at ``('hidden', 0, 'kernel')``."""
  return "/".join(map(str, layer.key[:-1]))


class Study:
  """One width: the training step, the trackers and the exact EMA."""

  def __init__(self, width: int, config: dict[str, Any]):
    self.config = config
    kfac_args = config["kfac"]
    self.rho = kfac_args["ema"]
    self.cov_every = kfac_args["cov_every"]
    self.workload = digits.mlp((width,) * config["depth"],
                               batch_size=config["batch_size"])
    key = jax.random.PRNGKey(config["seed"])
    self.params = nnx.as_pure(train.init_params(self.workload, key))
    self.data_key = jax.random.fold_in(key, 1)
    capture = kfac_nnx.KFACCapture(nnx.merge(self.workload.graphdef,
                                             self.params))
    self.layout = kfac_lib.make_layout(self.params, capture.layers)
    self.train_tx = kronopt.kfac(**{**kfac_args, **config["train"]},
                                 layers=capture.layers)
    self.shared = shared_method(config)
    self.methods = list(config["methods"])
    self.trackers = [kronopt.scale_by_kfac(method=m, layers=capture.layers,
                                           **kfac_args)
                     for m in self.methods if m != self.shared]
    options = dict(config["compiler_options"]) or None
    self._init = jax.jit(self._init_fn, compiler_options=options)
    self._step = jax.jit(self._make_step(capture), compiler_options=options)
    self._measure = jax.jit(self._measure_fn, compiler_options=options)
    # rank: what the rank-r methods keep (eigh keeps d).
    self.factors = [
        {"layer": layer_name(layer), "factor": FACTORS[f], "d": d,
         "rank": lowrank.rank_for(d, kfac_args["rank"])}
        for layer in self.layout.layers
        for f, d in enumerate((layer.d_a, layer.d_g))]
    self.exact = [np.zeros((f["d"], f["d"])) for f in self.factors]

  def _init_fn(self, params):
    return (self.train_tx.init(params),
            tuple(tx.init(params) for tx in self.trackers))

  def tracked(self, states) -> list:
    """The preconditioner state of each method, in ``methods`` order."""
    train_state, own = states
    own = iter(own)
    return [preconditioner_state(train_state) if m == self.shared
            else next(own) for m in self.methods]

  def _make_step(self, capture):
    graphdef, workload = self.workload.graphdef, self.workload

    def loss_fn(model, x, y):
      return base.classification_metrics(model(x), y)["loss"]

    def step(t, params, states):
      train_state, tracked = states
      x, y = workload.batch(jax.random.fold_in(self.data_key, t))
      loss, grads, stats = capture.value_grad_and_stats(
          loss_fn, nnx.merge(graphdef, params), x, y)
      grads = nnx.as_pure(grads)
      updates, train_state = self.train_tx.update(grads, train_state, params,
                                                  kfac_stats=stats)
      tracked = tuple(tx.update(grads, s, params, kfac_stats=stats)[1]
                      for tx, s in zip(self.trackers, tracked))
      return (optax.apply_updates(params, updates), (train_state, tracked),
              loss, grads, stats)
    return step

  def _measure_fn(self, tracked, grads):
    """Per method the ``(U, D, Ṽ_A, Ṽ_Γ)`` of every group; the blocks."""
    blocks = self.layout.block(grads)
    damping = self.config["kfac"]["damping"]
    relative = self.config["kfac"]["relative_damping"]
    out = []
    for state in tracked:
      groups = []
      for group, block in zip(state.groups, blocks):
        decs = [f.decomposition for f in group.factors]
        applied = [lowrank.inverse_apply(dec, block, i,
                                         damping=damping, relative=relative)
                   for i, dec in enumerate(decs)]
        groups.append(([(d.basis, d.values) for d in decs], applied))
      out.append(groups)
    return out, blocks

  def _layer_stats(self, stats):
    """Per resolved layer, ``(Â, Γ̂)`` in float64 as the optimizer sees them
    (the rows of ones of a folded bias kept, as ``block_aux`` does)."""
    aligned = kfac_layers.align_stats(self.params, self.layout.layers, stats)
    return [(np.asarray(s.a, np.float64)[:layer.d_a],
             np.asarray(s.g, np.float64))
            for layer, s in zip(self.layout.layers, aligned)]

  def _update_exact(self, stats):
    i = 0
    for a, g in self._layer_stats(stats):
      for cols in (a, g):
        self.exact[i] = self.rho * self.exact[i] + (1 - self.rho) * (
            cols @ cols.T)
        i += 1

  def _errors(self, tracked, grads):
    """Spectral and application errors per method and factor; the optimum."""
    measured, blocks = jax.device_get(self._measure(tracked, grads))
    damping = self.config["kfac"]["damping"]
    relative = self.config["kfac"]["relative_damping"]
    spectral = {m: [] for m in self.methods}
    applied = {m: [] for m in self.methods}
    optimum = []
    i = 0
    for layer, (group, index) in zip(self.layout.layers, self.layout.slots):
      block = np.asarray(blocks[group][index], np.float64)
      for f in range(2):
        m, rank = self.exact[i], self.factors[i]["rank"]
        lam, vec = np.linalg.eigh(m)
        lam = np.maximum(lam, 0.0)
        top = max(lam[-1], np.finfo(np.float64).tiny)
        optimum.append(float(lam[-rank - 1] / top) if rank < len(lam)
                       else 0.0)
        lam_damp = damping * top if relative else damping
        exact = _apply(vec, 1.0 / (lam + lam_damp), block, f)
        for k, method in enumerate(self.methods):
          pairs, got = measured[k][group]
          u = np.asarray(pairs[f][0][index], np.float64)
          d = np.asarray(pairs[f][1][index], np.float64)
          diff = m - (u * d) @ u.T
          spectral[method].append(float(
              np.max(np.abs(np.linalg.eigvalsh(diff))) / top))
          approx = np.asarray(got[f][index], np.float64)
          applied[method].append(float(np.linalg.norm(approx - exact)
                                       / max(np.linalg.norm(exact), 1e-300)))
        i += 1
    return spectral, applied, optimum

  def ema_gap(self, tracked):
    """``max|M_opt − M| / max|M|`` over the factors, ``M_opt`` the float32
    EMA a method keeps in its state and ``M`` the float64 one kept here
    (``None`` if no method keeps one): the two follow the same schedule."""
    gaps = []
    for state in tracked:
      i = 0
      for group, index in self.layout.slots:
        for factor in state.groups[group].factors:
          if factor.ema is not None:
            ema = np.asarray(factor.ema[index], np.float64)
            gaps.append(np.max(np.abs(ema - self.exact[i]))
                        / max(np.max(np.abs(self.exact[i])), 1e-300))
          i += 1
    return float(max(gaps)) if gaps else None

  def run(self, desc: str) -> dict[str, Any]:
    """Trains ``steps`` steps, measuring after every statistics step."""
    params = self.params
    states = self._init(params)
    steps, losses = [], []
    spectral = {m: [] for m in self.methods}
    applied = {m: [] for m in self.methods}
    optimum = []
    with tqdm.tqdm(total=self.config["steps"], desc=desc, unit="step",
                   disable=not self.config["progress"]) as bar:
      for t in range(self.config["steps"]):
        params, states, loss, grads, stats = self._step(
            jnp.asarray(t, jnp.int32), params, states)
        losses.append(loss)
        if t % self.cov_every == 0:
          self._update_exact(stats)
          s, a, o = self._errors(self.tracked(states), grads)
          steps.append(t)
          optimum.append(o)
          for m in self.methods:
            spectral[m].append(s[m])
            applied[m].append(a[m])
        bar.update(1)
    diagnostics = {m: {k: int(v) for k, v in
                       kronopt.diagnostics(s).items()
                       if k in ("refresh_failures", "skipped_gradients")}
                   for m, s in zip(self.methods, self.tracked(states))}
    test = {k: float(v) for k, v in
            jax.jit(self.workload.evaluate)(params).items()}
    return {"factors": self.factors, "steps": steps,
            "ema_gap": self.ema_gap(self.tracked(states)),
            "shared_with_training": self.shared,
            "train_loss": [float(x) for x in jax.device_get(losses)],
            "test": test, "spectral": spectral, "application": applied,
            "optimum": optimum, "diagnostics": diagnostics}


def shared_method(config) -> Optional[str]:
  """The method whose tracker is the training optimizer's own
  preconditioner: ``train.method`` when it is one of ``methods`` and
  ``train`` sets no other preconditioner keyword differently from
  ``kfac`` (the statistics and refreshes do not depend on the updates the
  preconditioner is given, only on ``kfac_stats``); else ``None``."""
  kfac_args, entry = config["kfac"], config["train"]
  method = entry.get("method", TRAIN_DEFAULT_METHOD)
  same = all(entry[k] == kfac_args[k] for k in entry if k in kfac_args)
  return method if method in config["methods"] and same else None


def preconditioner_state(state) -> kronopt.PreconditionerState:
  """The one :class:`kronopt.PreconditionerState` inside a chain's state."""
  found = [x for x in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, kronopt.PreconditionerState))
           if isinstance(x, kronopt.PreconditionerState)]
  if len(found) != 1:
    raise ValueError(f"expected one PreconditionerState, found {len(found)}")
  return found[0]


def _apply(vec, scale, block, factor: int):
  """``(V diag(scale) Vᵀ) ×_axis block``: left for A, right for Γ."""
  if factor == 0:
    return vec @ (scale[:, None] * (vec.T @ block))
  return ((block @ vec) * scale[None, :]) @ vec.T


# ---------------------------------------------------------- the claims --


def reset_steps(kfac_args, steps) -> list[int]:
  """The statistics steps at which B-R-KFAC resets from an RSVD (not the
  first): ``(t − start) / T_inv`` a positive multiple of the reset period."""
  start, every = (kfac_args["start_preconditioning_step"],
                  kfac_args["inverse_every"])
  return [t for t in steps if t > start and (t - start) % every == 0
          and ((t - start) // every) % kfac_args["rsvd_reset_every"] == 0]


def refresh_steps(kfac_args, steps) -> list[int]:
  start, every = (kfac_args["start_preconditioning_step"],
                  kfac_args["inverse_every"])
  return [t for t in steps if t >= start and (t - start) % every == 0]


def claims(result: dict[str, Any], kfac_args) -> dict[str, Any]:
  """The robust claims of one width (``None`` where a claim has no data):

  * ``brand_full_rank``: the largest spectral error of ``brand`` on the
    factors it keeps at full rank (``d ≤ r``; float32 rounding only);
  * ``rsvd_over_optimum``: at the refreshes, the largest ratio of
    ``rsvd``'s spectral error to ``λ_{r+1}/λ_1`` on the factors it truly
    sketches (``d > r + oversample``);
  * ``brand_rsvd_minus_brand``: at the RSVD resets after the first, the
    largest ``error(brand_rsvd) − error(brand)`` (relative to ``‖M‖₂``) on
    the factors kept at rank ``r < d``; ``≤ 0`` means no larger;
  * per method, the mean and largest spectral and application errors.
  """
  factors, steps = result["factors"], result["steps"]
  spectral = {m: np.asarray(v) for m, v in result["spectral"].items()}
  low = [i for i, f in enumerate(factors) if f["rank"] < f["d"]]
  full = [i for i, f in enumerate(factors) if f["rank"] >= f["d"]]
  sketched = [i for i, f in enumerate(factors)
              if f["d"] > f["rank"] + kfac_args["oversample"]]
  out: dict[str, Any] = {"brand_full_rank": None, "rsvd_over_optimum": None,
                         "brand_rsvd_minus_brand": None}
  if "brand" in spectral and full:
    out["brand_full_rank"] = float(spectral["brand"][:, full].max())
  rows = [steps.index(t) for t in refresh_steps(kfac_args, steps)]
  if "rsvd" in spectral and sketched and rows:
    opt = np.asarray(result["optimum"])[np.ix_(rows, sketched)]
    err = spectral["rsvd"][np.ix_(rows, sketched)]
    out["rsvd_over_optimum"] = float(np.max(err / np.maximum(opt, 1e-300)))
  rows = [steps.index(t) for t in reset_steps(kfac_args, steps)]
  if {"brand", "brand_rsvd"} <= set(spectral) and low and rows:
    diff = (spectral["brand_rsvd"][np.ix_(rows, low)]
            - spectral["brand"][np.ix_(rows, low)])
    out["brand_rsvd_minus_brand"] = float(diff.max())
    out["reset_steps"] = [steps[r] for r in rows]
  out["summary"] = {
      m: {"spectral_mean": float(np.mean(spectral[m])),
          "spectral_max": float(np.max(spectral[m])),
          "application_mean": float(np.mean(result["application"][m])),
          "application_max": float(np.max(result["application"][m]))}
      for m in spectral}
  return out


# --------------------------------------------------------------- timing --


def _median_seconds(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def update_times(timing, kfac_args, progress=True,
                 compiler_options=None) -> dict[str, Any]:
  """Median seconds of one K-factor update per width, per :data:`TIMED`
  (``compiler_options``: none for anything reported)."""
  rho, rank = kfac_args["ema"], kfac_args["rank"]
  n = timing["columns"]
  jit = lambda fn: jax.jit(fn, compiler_options=compiler_options or None)
  eigh = jit(lowrank.from_eigh)
  brand = jit(lambda dec, b: lowrank.brand_update(dec, b, rho))
  keys = jax.random.PRNGKey(timing["seed"])[None]
  seconds = {k: [] for k in TIMED}
  load = os.getloadavg()
  for d in tqdm.tqdm(timing["widths"], desc="update time", unit="width",
                     disable=not progress):
    r = lowrank.rank_for(d, rank)
    rng = np.random.default_rng(timing["seed"] + d)
    a = rng.standard_normal((1, d, 2 * n))
    m = jnp.asarray(a @ np.swapaxes(a, -1, -2) / (2 * n), jnp.float32)
    basis = np.linalg.qr(rng.standard_normal((1, d, r)))[0]
    values = np.sort(rng.uniform(size=(1, r)), axis=-1)[:, ::-1]
    dec = lowrank.LowRank(jnp.asarray(basis, jnp.float32),
                          jnp.asarray(values, jnp.float32))
    b = jnp.asarray(math.sqrt(1 - rho) * rng.standard_normal((1, d, n)),
                    jnp.float32)
    rsvd = jit(lambda m, k, r=r: lowrank.randomized_eigh(
        m, r, k, oversample=kfac_args["oversample"],
        power_iters=kfac_args["power_iters"]))
    calls = {"eigh": (eigh, (m,)),
             "brand": (brand, (dec, b)), "rsvd": (rsvd, (m, keys))}
    for k in TIMED:
      fn, args = calls[k]
      seconds[k].append(_median_seconds(fn, args, timing["repeats"]))
  return {"widths": list(timing["widths"]), "columns": n, "rank": rank,
          "repeats": timing["repeats"], "seconds": seconds,
          "slopes": {k: fitted_slope(timing["widths"], v)
                     for k, v in seconds.items()},
          "load_average_start": list(load),
          "load_average_end": list(os.getloadavg()),
          "note": ("timings are only meaningful on a quiet machine; the "
                   "README's are taken there")}


def fitted_slope(widths, seconds) -> Optional[float]:
  """Least-squares slope of ``log t`` on ``log d``, over the upper half of
  more than 3 widths (where the leading term dominates); ``None`` below 2."""
  if len(widths) < 2:
    return None
  lo = len(widths) // 2 if len(widths) > 3 else 0
  return float(np.polyfit(np.log(widths[lo:]), np.log(seconds[lo:]), 1)[0])


# -------------------------------------------------------------- figures --


def error_figure(results, config):
  widths = list(results)
  fig, axes = report.plt.subplots(2, len(widths), squeeze=False,
                                  figsize=(4.6 * len(widths), 7.0),
                                  sharex=True)
  for col, w in enumerate(widths):
    res = results[w]
    steps = res["steps"]
    for row, key in enumerate(("spectral", "application")):
      ax = axes[row][col]
      for i, (m, curve) in enumerate(res[key].items()):
        worst = np.max(np.asarray(curve), axis=1)
        ax.plot(steps, np.maximum(worst, FLOOR), "-", color=f"C{i}",
                lw=1.2, label=m)
      if key == "spectral":
        best = np.max(np.asarray(res["optimum"]), axis=1)
        ax.plot(steps, np.maximum(best, FLOOR), "k--", lw=0.9,
                label="rank-r optimum λ_{r+1}/λ_1")
      ax.set_yscale("log")
      ax.grid(alpha=0.3)
      if row == 0:
        ax.set_title(f"width {w}, rank {config['kfac']['rank']} (capped at d)")
      else:
        ax.set_xlabel("step")
      ax.set_ylabel(("‖M − UDUᵀ‖₂/‖M‖₂" if key == "spectral" else
                     "damped-inverse application error")
                    + " (worst factor)")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(config["title"] or "K-FAC inversion error", fontsize=10)
  return fig


def time_figure(timing):
  fig, ax = report.plt.subplots(figsize=(5.6, 4.2))
  d = np.asarray(timing["widths"], np.float64)
  for i, (k, sec) in enumerate(timing["seconds"].items()):
    slope = timing["slopes"][k]
    label = k if slope is None else f"{k} (slope {slope:.2f})"
    ax.loglog(d, sec, "o-", color=f"C{i}", label=label)
  for power, k in ((1, "brand"), (3, "eigh")):
    ref = timing["seconds"][k][-1]
    ax.loglog(d, ref * (d / d[-1]) ** power, ":", color="gray", lw=1)
    ax.annotate(f"slope {power}", (d[0], ref * (d[0] / d[-1]) ** power),
                fontsize=7, color="gray")
  ax.set_xlabel("factor dimension d")
  ax.set_ylabel("seconds per K-factor update (median)")
  ax.set_title(f"rank {timing['rank']}, {timing['columns']} columns; "
               "quiet machine only", fontsize=9)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  return fig


# ------------------------------------------------------------------ run --


def run(config: dict[str, Any]) -> dict[str, Any]:
  """The study per width, the update times; record and figures."""
  kfac_args = config["kfac"]
  results, found = {}, {}
  for width in config["widths"]:
    study = Study(width, config)
    res = study.run(f"width {width}")
    results[str(width)] = res
    found[str(width)] = claims(res, kfac_args)
    s = found[str(width)]["summary"]
    print(f"width {width}: final train loss {res['train_loss'][-1]:.4g}, "
          f"held-out accuracy {res['test'].get('accuracy', math.nan):.3f}")
    for m, row in s.items():
      print(f"  {m}: spectral error mean {row['spectral_mean']:.3g} max "
            f"{row['spectral_max']:.3g}; application error mean "
            f"{row['application_mean']:.3g} max {row['application_max']:.3g}")
  timing = None
  out_dir = config["output_dir"]
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, "results.json")]
  if config["timing"]["widths"]:
    timing = update_times(config["timing"], kfac_args, config["progress"],
                          config["compiler_options"])
    load = ", ".join(f"{v:.1f}" for v in timing["load_average_start"])
    print(f"K-factor update seconds (median; {timing['note']}; load average "
          f"at start {load}):")
    for k, sec in timing["seconds"].items():
      print(f"  {k}: " + ", ".join(f"d={d} {s:.3g}" for d, s in
                                   zip(timing["widths"], sec))
            + f"; fitted slope {timing['slopes'][k]}")
  rec = {"config": dict(config), "versions": report.versions(),
         "machine": report.machine(), "kfac": dict(kfac_args),
         "widths": results, "timing": timing, "claims": found}
  figures = [(ERROR_FIGURE, error_figure(results, config))]
  if timing is not None:
    figures.append((TIME_FIGURE, time_figure(timing)))
  for name, fig in figures:
    paths.append(os.path.join(out_dir, name))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    report.plt.close(fig)
  rec["paths"] = paths
  report.write_json(paths[0], rec)
  print(f"wrote {', '.join(paths)}")
  return rec
