"""``experiment: reproduce.layer_probe``: one layer's exact gradient
statistics over training, against their Kronecker approximations.

A sweep config (:mod:`experiments.sweep`) on a digits classifier whose
evaluation (step 0 and after every chunk) also takes, at the current
parameters, the per-example gradients ``G_t`` (``m×n``) of one kernel
``layer`` on ``probe_examples`` fixed training images and measures, in
float64 numpy, one of:

``measure: kronecker`` -- Morwani et al., "A New Perspective on Shampoo's
Preconditioner", 2024 (docs/algorithms.md §3). For ``H = E[g gᵀ]`` (``g =
vec G``), of true-label gradients (``adagrad``) and of labels drawn from
the model (``gauss_newton``: the expectation over ``y ~ p(y|x)``, i.e. every
label weighted by its probability, which is the Gauss–Newton matrix of the
cross-entropy exactly rather than a one-sample estimate), the cosine
similarity ``⟨H, Ĥ⟩_F / (‖H‖_F ‖Ĥ‖_F)`` of

* ``optimal``: the Frobenius-optimal ``A⊗B`` (power iteration on the
  rearrangement ``𝓡(H)`` from ``(I, I)``, ``power_iterations`` steps);
* ``lr``: ``L⊗R`` with ``L = E[G Gᵀ]``, ``R = E[Gᵀ G]`` (one step of it);
* ``sqrt``: ``L^{1/2}⊗R^{1/2}``, Shampoo's implicit approximation.

``measure: caspr`` -- Duvvuri et al., CASPR, ICLR 2024 (docs/algorithms.md
§4), on the true-label gradients: with ``S = εI + Σ g gᵀ``,
``L = εI + Σ G Gᵀ``, ``R = εI + Σ Gᵀ G`` (``ε = epsilon · tr(Σ g gᵀ)/mn``)
and ``r = max rank G_t``, Shampoo's ``P_S = L^{-1/4}⊗R^{-1/4}`` and CASPR's
``P_C = ((L^{-1/4} ⊕ R^{-1/4})/2)²`` against full-matrix AdaGrad's
``Q = √r S^{-1/2}``, through the generalized eigenvalues ``μ`` of
``(P, Q)``:

* ``dist``: ``‖log μ‖₂``, the affine-invariant (Riemannian) distance from
  ``P`` to ``Q``. The sandwich ``P_S ⪯ P_C ⪯ Q`` orders every ``μ`` of
  CASPR between Shampoo's and 1, so CASPR's distance is the smaller;
* ``scale_free``: ``‖log μ − mean log μ‖₂``, the distance to the nearest
  multiple of ``Q`` (what grafting leaves), not ordered by the sandwich;
* ``frobenius``: ``min_c ‖c P − S^{-1/2}‖_F / ‖S^{-1/2}‖_F``;
* ``sandwich_upper``: ``max μ`` of CASPR (``≤ 1``: ``P_C ⪯ Q``) and
  ``sandwich_lower``: ``min`` of ``P_C / P_S`` on their common eigenbasis
  (``≥ 1``: ``P_S ⪯ P_C``).

Both measures work in the Kronecker eigenbasis of ``L, R`` where ``P_S`` and
``P_C`` are diagonal, so a probe costs three ``mn×mn`` eighs at most.
Writes ``results.json`` (the sweep record, with every metric's curve) and
``<measure>.png`` to ``output_dir``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import config as config_lib
from experiments import report
from experiments import workloads
from experiments.reproduce import common
from experiments.workloads import base
from experiments.workloads import digits

Field = config_lib.Field
MEASURES = ("kronecker", "caspr")
STATISTICS = ("adagrad", "gauss_newton")
APPROXIMATIONS = ("optimal", "lr", "sqrt")
CASPR_METRICS = ("dist", "scale_free", "frobenius")
MAX_ENTRIES = 8192  # the probe forms dense (mn)×(mn) float64 matrices

SCHEMA = common.sweep_schema(
    measure=Field(config_lib.string(MEASURES)),
    layer=Field(config_lib.string(), "['hidden'][1]['kernel']",
                "the probed kernel, as experiments.train.param_shapes "
                "names it"),
    probe_examples=Field(config_lib.integer(1), 1024),
    epsilon=Field(config_lib.number(positive=True), 1e-3,
                  "caspr: ε relative to the mean eigenvalue of Σ g gᵀ"),
    power_iterations=Field(config_lib.integer(1), 100),
)


def check(config: dict[str, Any]) -> dict[str, Any]:
  """Sweep's checks; a digits classifier and a 2-D kernel of ``mn ≤ 8192``."""
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  name = config["workload"]["name"]
  if name not in ("digits_mlp", "digits_cnn"):
    raise config_lib.ConfigError(
        f"config key 'workload.name': {name!r}; expected 'digits_mlp' or "
        "'digits_cnn' (a classifier).")
  shapes = _param_shapes(config)
  shape = shapes.get(config["layer"])
  if shape is None or len(shape) != 2:
    matrices = ", ".join(k for k, s in shapes.items() if len(s) == 2)
    raise config_lib.ConfigError(
        f"config key 'layer': {config['layer']!r} is not a 2-D parameter; "
        f"expected one of {matrices}.")
  if shape[0] * shape[1] > MAX_ENTRIES:
    raise config_lib.ConfigError(
        f"config key 'layer': {config['layer']!r} has {shape[0]}×{shape[1]} "
        f"entries; expected at most {MAX_ENTRIES} (dense (mn)² matrices).")
  return sweep.check(config)


def _param_shapes(config):
  from experiments import train  # pylint: disable=g-import-not-at-top
  return train.param_shapes(workloads.make(**config["workload"]))


# ------------------------------------------------------------ float64 math --


def _weighted_grams(g, w):
  """``(H, L, R)`` of gradients ``g [T, m, n]`` with weights ``w [T]``."""
  flat = g.reshape(len(g), -1) * np.sqrt(w)[:, None]
  left = np.einsum("t,tij,tkj->ik", w, g, g)
  right = np.einsum("t,tji,tjk->ik", w, g, g)
  return flat.T @ flat, left, right


def _kron_inner(h4, a, b):
  """``⟨H, A⊗B⟩_F = vec(A)ᵀ 𝓡(H) vec(B)`` (``H`` as ``[m, n, m, n]``)."""
  return np.einsum("ijkl,ik,jl->", h4, a, b)


def optimal_kronecker(h4, iters: int):
  """``(A, B)`` spanning the best ``A⊗B ≈ H``: power iteration on 𝓡(H)
  from ``(I, I)`` (docs/algorithms.md §3), normalised each step."""
  m, n = h4.shape[:2]
  a, b = np.eye(m), np.eye(n)
  for _ in range(iters):
    a = np.einsum("ijkl,jl->ik", h4, b)
    b = np.einsum("ijkl,ik->jl", h4, a)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
  return a, b


def _sym_power(a, power):
  lam, q = np.linalg.eigh(a)
  return (q * np.maximum(lam, 0.0) ** power) @ q.T


def kronecker_cosines(g, w, iters: int) -> dict[str, float]:
  """Cosine similarity of ``H`` with each of :data:`APPROXIMATIONS`."""
  m, n = g.shape[1:]
  h, left, right = _weighted_grams(g, w / w.sum())
  h4, norm = h.reshape(m, n, m, n), np.linalg.norm(h)
  pairs = {"optimal": optimal_kronecker(h4, iters), "lr": (left, right),
           "sqrt": (_sym_power(left, 0.5), _sym_power(right, 0.5))}
  return {k: _kron_inner(h4, a, b) / (norm * np.linalg.norm(a)
                                       * np.linalg.norm(b))
          for k, (a, b) in pairs.items()}


def numerical_rank(g) -> int:
  """``max_t rank G_t`` (singular values above ``1e-6·σ_max``, float32
  gradients)."""
  s = np.linalg.svd(g, compute_uv=False)
  return int(np.max(np.sum(s > 1e-6 * s[:, :1], axis=1)))


def caspr_distances(g, epsilon: float) -> dict[str, float]:
  """Shampoo's and CASPR's preconditioners against ``√r S^{-1/2}``."""
  t, m, n = g.shape
  ones = np.ones(t)
  s0, left, right = _weighted_grams(g, ones)
  eps = epsilon * np.trace(s0) / (m * n)
  lam_l, u_l = np.linalg.eigh(left + eps * np.eye(m))
  lam_r, u_r = np.linalg.eigh(right + eps * np.eye(n))
  rot = np.einsum("ai,tab,bj->tij", u_l, g, u_r).reshape(t, -1)
  lam_s, v = np.linalg.eigh(eps * np.eye(m * n) + rot.T @ rot)
  lam_s = np.maximum(lam_s, eps)  # S ⪰ εI exactly; rounding below it
  s_half = (v * np.sqrt(lam_s)) @ v.T
  pl, pr = lam_l ** -0.25, lam_r ** -0.25
  diag = {"shampoo": np.outer(pl, pr).ravel(),
          "caspr": (((pl[:, None] + pr[None, :]) / 2) ** 2).ravel()}
  rank = numerical_rank(g)
  # S^{-1/2} in the same basis: its diagonal and its Frobenius norm.
  target_diag = np.einsum("ik,k->i", v * v, lam_s ** -0.5)
  target_norm = np.sqrt(np.sum(1.0 / lam_s))
  out = {"rank": float(rank)}
  for name, p in diag.items():
    mu = np.linalg.eigvalsh(np.sqrt(p)[:, None] * s_half
                            * np.sqrt(p)[None, :]) / np.sqrt(rank)
    log_mu = np.log(np.maximum(mu, 1e-300))
    cos = target_diag @ p / (target_norm * np.linalg.norm(p))
    out[f"{name}_dist"] = float(np.linalg.norm(log_mu))
    out[f"{name}_scale_free"] = float(np.linalg.norm(log_mu - log_mu.mean()))
    out[f"{name}_frobenius"] = float(np.sqrt(max(1.0 - cos ** 2, 0.0)))
    out[f"{name}_max_mu"] = float(mu.max())
  out["sandwich_upper"] = out.pop("caspr_max_mu")
  out["shampoo_max_mu"] = out.pop("shampoo_max_mu")
  out["sandwich_lower"] = float(np.min(diag["caspr"] / diag["shampoo"]))
  return out


def metric_names(measure: str) -> list[str]:
  if measure == "kronecker":
    return [f"{s}_{a}" for s in STATISTICS for a in APPROXIMATIONS]
  return ([f"{p}_{k}" for p in ("shampoo", "caspr") for k in CASPR_METRICS]
          + ["shampoo_max_mu", "sandwich_upper", "sandwich_lower", "rank"])


def host_metrics(measure, epsilon, iters, g_true, g_all, p):
  """The probe's float64 numbers from float32 per-example gradients."""
  g_true = np.asarray(g_true, np.float64)
  if measure == "caspr":
    out = caspr_distances(g_true, epsilon)
  else:
    out = {f"adagrad_{k}": v for k, v in kronecker_cosines(
        g_true, np.ones(len(g_true)), iters).items()}
    g_all = np.asarray(g_all, np.float64)
    m, n = g_all.shape[2:]
    out.update({f"gauss_newton_{k}": v for k, v in kronecker_cosines(
        g_all.reshape(-1, m, n), np.asarray(p, np.float64).ravel(),
        iters).items()})
  return {k: np.float32(out[k]) for k in metric_names(measure)}


# -------------------------------------------------------------- workload --


@base.register
class ProbedClassifier(base.Workload):
  """A digits classifier whose ``evaluate`` also probes one kernel."""
  inner: digits.DigitsClassifier
  x_probe: jax.Array
  y_probe: jax.Array
  layer: str = base.static()
  measure: str = base.static()
  epsilon: float = base.static()
  iters: int = base.static()

  def init(self, key):
    return self.inner.init(key)

  def batch(self, key):
    return self.inner.batch(key)

  def loss(self, params, batch):
    return self.inner.loss(params, batch)

  def _log_probs(self, params):
    """``(kernel, x) -> log p(·|x)`` with the probed kernel as argument."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(k).removesuffix(".value")
             for k, _ in leaves]
    index = names.index(self.layer)
    arrays = [x for _, x in leaves]

    def fn(kernel, x):
      new = arrays[:index] + [kernel] + arrays[index + 1:]
      p = jax.tree_util.tree_unflatten(treedef, new)
      return jax.nn.log_softmax(nnx.merge(self.inner.graphdef, p)(x[None])[0])
    return fn, arrays[index]

  def evaluate(self, params):
    out = dict(self.inner.evaluate(params))
    fn, kernel = self._log_probs(params)
    jac = jax.vmap(jax.jacrev(fn), (None, 0))(kernel, self.x_probe)
    g_all = -jac  # [N, classes, m, n]: ∇ of −log p(y|x) for every y
    g_true = jnp.take_along_axis(
        g_all, self.y_probe[:, None, None, None], axis=1)[:, 0]
    probs = jnp.exp(jax.vmap(fn, (None, 0))(kernel, self.x_probe))
    names = metric_names(self.measure)
    shapes = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in names}
    host = lambda a, b, c: host_metrics(self.measure, self.epsilon,
                                        self.iters, a, b, c)
    out.update(jax.pure_callback(host, shapes, g_true, g_all, probs))
    return out


def make_workload(config) -> ProbedClassifier:
  inner = workloads.make(**config["workload"])
  n = min(config["probe_examples"], inner.x_train.shape[0])
  return ProbedClassifier(inner, inner.x_train[:n], inner.y_train[:n],
                          config["layer"], config["measure"],
                          config["epsilon"], config["power_iterations"])


# ---------------------------------------------------------------- output --


def _series(curves, key):
  return np.asarray([np.nan if v is None else v
                     for v in curves[f"eval_{key}"]], np.float64)


def claim(curves, measure) -> dict[str, Any]:
  """Means over the evaluations (training included) and the final values;
  for ``caspr``, the worst sandwich over them."""
  out = {}
  for key in metric_names(measure):
    s = _series(curves, key)
    out[key] = {"mean": float(np.nanmean(s)), "final": float(s[-1]),
                "min": float(np.nanmin(s)), "max": float(np.nanmax(s))}
  return out


def figure(curves, config):
  plt = report.plt
  steps = curves["eval_step"]
  if config["measure"] == "kronecker":
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, stat in zip(axes, STATISTICS):
      for i, (a, label) in enumerate(zip(APPROXIMATIONS, (
          "optimal A⊗B", "L⊗R", "L^{1/2}⊗R^{1/2} (Shampoo)"))):
        ax.plot(steps, _series(curves, f"{stat}_{a}"), "o-", ms=3,
                color=f"C{i}", label=label)
      ax.set(xlabel="step", title=f"H: {stat.replace('_', '-')}")
      ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine similarity to H")
    axes[0].legend(fontsize=7)
  else:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    titles = ("‖log μ‖ to √r S^{-1/2}", "after the best scale",
              "relative Frobenius (best scale)")
    for ax, metric, title in zip(axes, CASPR_METRICS, titles):
      for i, p in enumerate(("shampoo", "caspr")):
        ax.plot(steps, _series(curves, f"{p}_{metric}"), "o-", ms=3,
                color=f"C{i}", label=p)
      ax.set(xlabel="step", title=title)
      ax.grid(alpha=0.3)
    axes[0].set_ylabel("distance to full-matrix AdaGrad")
    axes[0].legend(fontsize=7)
  fig.suptitle(f"{config['title'] or config['workload']['name']}: "
               f"{config['layer']}", fontsize=9)
  return fig


def run(config: dict[str, Any]) -> dict[str, Any]:
  """Trains through the sweep, probing at every evaluation; writes the
  record and the figure."""
  workload = make_workload(config)
  runs, summary = common.run_sweep(workload, config)
  print(report.table(summary, config["baseline"]))
  best = summary[config["baseline"]]["curves"]
  result = claim(best, config["measure"])
  for key, v in result.items():
    print(f"  {key}: mean {v['mean']:.4g}, final {v['final']:.4g}, "
          f"range [{v['min']:.4g}, {v['max']:.4g}]")
  rec = common.record(config, workload.inner, summary=summary, claim=result,
                      runs=runs)
  rec["paths"] = common.write(config["output_dir"], rec,
                              figure(best, config),
                              f"{config['measure']}.png")
  return rec


