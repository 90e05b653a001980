"""The reproductions (experiments/reproduce, configs/reproduce) at tiny sizes.

Each shipped config runs through ``experiments.run`` shrunk by overrides
(module fixtures, quick XLA compilation) and writes its figure and JSON; the
claim is asserted where it is robust at that size, with the thresholds
below. The float64 measurements of the layer probe are checked against
dense numpy (np.kron, generalized eigenvalues) on small random gradients.
No timings.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import kronopt
from experiments import config as config_lib
from experiments import reproduce
from experiments import run
from experiments import train
from experiments import workloads
from experiments.reproduce import __main__ as reproduce_cli
from experiments.reproduce import kradagrad_quadratic
from experiments.reproduce import layer_probe
from experiments.reproduce import sketchy_memory

QUICK = {"xla_backend_optimization_level": 0,
         "xla_llvm_disable_expensive_passes": True}
PNG = b"\x89PNG\r\n\x1a\n"


def _run(name, out, changes, **replace):
  """The shipped config ``name`` with dotted ``changes`` and whole-key
  ``replace``ments, run through experiments.run into ``out``."""
  config = config_lib.load(str(reproduce.config_path(name)))
  config.update(replace)
  overrides = [f"{k}={v}" for k, v in changes.items()] + [
      f"output_dir={out}", "progress=false"]
  config["compiler_options"] = QUICK
  return run.run(config, overrides)


def _written(out, figure):
  assert (out / figure).read_bytes()[:8] == PNG
  rec = json.loads((out / "results.json").read_text())
  assert {"config", "versions", "machine"} <= set(rec)
  assert rec["versions"]["jax"] and rec["machine"]["cpu_count"]
  return rec


# --------------------------------------------------- seed 000: quadratic --

# d = 16, 60 steps: Shampoo float32 loses roots from condition 1e4 on, but
# KrADagrad★ float32 only overtakes it from 1e6 at this size (1e5 at d = 128,
# the default); at 1e4 it is behind (ratio ≈ 1.8), at 1e6 ahead (≈ 0.2).
QUAD_RATIO_AT_1E6 = 0.6


@pytest.fixture(scope="module")
def quadratic(tmp_path_factory):
  out = tmp_path_factory.mktemp("quadratic")
  lr = {"learning_rate": [1e-2]}
  config = config_lib.load(str(reproduce.config_path("kradagrad_quadratic")))
  optimizers = {k: {**config["optimizers"][k], **lr}
                for k in ("shampoo_fp32", "kradagrad_star_fp32")}
  rec = _run("kradagrad_quadratic", out,
             {"workload.d": 16, "conditions": "[4, 6]", "steps": 60,
              "eval_every": 30, "reference.learning_rate": "[1e-2]"},
             optimizers=optimizers)
  return out, rec


def test_quadratic_writes_figure_and_json(quadratic):
  out, rec = quadratic
  saved = _written(out, "kradagrad_quadratic.png")
  assert set(saved["table"]) == {"4", "6"}
  for c in ("4", "6"):
    sub = _written(out / f"c{c}", "loss_vs_steps.png")
    assert sub["config"]["workload"]["c"] == float(c)
    assert set(sub["summary"]) == {"shampoo_fp32", "kradagrad_star_fp32",
                                   "shampoo_fp64"}
  assert saved["claim"] == json.loads(json.dumps(rec["claim"]))


def test_quadratic_claim(quadratic):
  _, rec = quadratic
  claim, table = rec["claim"], rec["table"]
  assert claim["6"]["ratio"] < QUAD_RATIO_AT_1E6, claim
  assert claim["6"]["ratio"] < claim["4"]["ratio"], claim  # grows with c
  six = table["6"]
  assert six["shampoo_fp32"]["refresh_failures"] > 0      # float32 breaks
  assert not six["kradagrad_star_fp32"]["refresh_failures"]
  for label, row in six.items():
    assert math.isfinite(row["final_loss"]), label
    if label != "shampoo_fp32":  # which stalls: 91 from 2129 (c = 6)
      assert row["final_loss"] < 0.01 * row["initial_loss"], label
  # Shampoo in float64 is the reference line below both.
  assert six["shampoo_fp64"]["final_loss"] < six["kradagrad_star_fp32"][
      "final_loss"]


def test_dense_float64_shampoo_matches_kronopt_in_float32():
  """The reference transform is kronopt's Shampoo (b1 = 0, SGD-norm graft,
  absolute ε) up to float32, on a well-conditioned problem."""
  rng = np.random.default_rng(0)
  gs = [rng.standard_normal((5, 4)) for _ in range(7)]
  dense = kradagrad_quadratic.dense_shampoo(every=3, epsilon=1e-3)
  ref = kronopt.shampoo(1.0, b1=0.0, nesterov=False, graft_type="sgd",
                        b2=1.0, epsilon=1e-3, relative_epsilon=False,
                        precondition_every=3, start_preconditioning_step=0)
  def updates(tx, dtype):
    def step(s, g):
      u, s = tx.update({"w": g}, s)
      return s, u["w"]
    run_all = jax.jit(lambda g: jax.lax.scan(step, tx.init(
        {"w": jnp.zeros((5, 4), dtype)}), g)[1])
    return np.asarray(run_all(jnp.asarray(np.stack(gs), dtype)))

  with jax.enable_x64(True):
    out64 = updates(dense, jnp.float64)
  out32 = updates(ref, jnp.float32)
  for got, want in zip(out32, out64):
    np.testing.assert_allclose(-got, want, rtol=1e-3,
                               atol=1e-4 * np.abs(want).max())


# ------------------------------------------------- seed 000: autoencoder --


def test_autoencoder_sweep_writes_figure_and_json(tmp_path):
  config = config_lib.load(str(reproduce.config_path(
      "kradagrad_autoencoder")))
  optimizers = {k: {**config["optimizers"][k], "learning_rate": 3e-3}
                for k in ("adam", "kradagrad_star")}
  rec = _run("kradagrad_autoencoder", tmp_path,
             {"workload.widths": "[8]", "steps": 10, "eval_every": 5,
              "seeds": "[0]"}, optimizers=optimizers)
  _written(tmp_path, "loss_vs_steps.png")
  for label, s in rec["summary"].items():
    loss = s["curves"]["eval_loss"]
    assert math.isfinite(loss[-1]) and loss[-1] < loss[0], label


# ----------------------------------------------- seed 002/003: the probe --

PROBE = {"workload.hidden": "[8, 8]", "probe_examples": 96, "steps": 20,
         "eval_every": 10}


@pytest.fixture(scope="module")
def cosines(tmp_path_factory):
  out = tmp_path_factory.mktemp("cosine")
  return out, _run("kronecker_cosine", out, PROBE)


@pytest.fixture(scope="module")
def caspr(tmp_path_factory):
  out = tmp_path_factory.mktemp("caspr")
  return out, _run("caspr_distance", out, PROBE)


def _curve(rec, key):
  return np.asarray(rec["summary"]["adamw"]["curves"][f"eval_{key}"])


def test_kronecker_cosine_claim(cosines):
  """Morwani et al.: L⊗R ≥ L^{1/2}⊗R^{1/2} in cosine to H (every
  evaluation, both H), and the optimal Kronecker product is above both."""
  out, rec = cosines
  _written(out, "kronecker.png")
  for stat in layer_probe.STATISTICS:
    opt, lr, sq = (_curve(rec, f"{stat}_{a}")
                   for a in layer_probe.APPROXIMATIONS)
    assert len(lr) == 3 and np.all((sq > 0) & (opt <= 1 + 1e-6))
    assert np.all(lr >= sq), (stat, lr, sq)
    assert np.all(opt >= lr - 1e-5), (stat, opt, lr)


def test_caspr_claim(caspr):
  """CASPR: nearer to √r S^{-1/2} than Shampoo in the distance the sandwich
  orders, and the sandwich itself, at every evaluation."""
  out, rec = caspr
  _written(out, "caspr.png")
  assert np.all(_curve(rec, "caspr_dist") < _curve(rec, "shampoo_dist"))
  assert np.all(_curve(rec, "sandwich_upper") <= 1 + 1e-6)
  assert np.all(_curve(rec, "sandwich_lower") >= 1 - 1e-9)
  assert np.all(_curve(rec, "rank") == 1)  # a dense layer's G_t = a δᵀ


def _random_gradients(rng, t, m, n, rank):
  return np.stack([rng.standard_normal((m, rank)) @ rng.standard_normal(
      (rank, n)) for _ in range(t)])


def test_kronecker_cosines_against_dense_numpy():
  rng = np.random.default_rng(1)
  g = _random_gradients(rng, 12, 3, 4, 2)
  w = rng.uniform(0.5, 2.0, 12)
  got = layer_probe.kronecker_cosines(g, w, iters=200)
  flat = g.reshape(12, -1)
  h = (flat.T * w) @ flat / w.sum()
  left = np.einsum("t,tij,tkj->ik", w, g, g) / w.sum()
  right = np.einsum("t,tji,tjk->ik", w, g, g) / w.sum()
  cos = lambda a: np.vdot(h, a) / (np.linalg.norm(h) * np.linalg.norm(a))
  root = lambda a: scipy.linalg.sqrtm(a).real
  np.testing.assert_allclose(got["lr"], cos(np.kron(left, right)), rtol=1e-10)
  np.testing.assert_allclose(got["sqrt"], cos(np.kron(root(left),
                                                       root(right))),
                             rtol=1e-8)
  # Optimal: the top singular value of the rearrangement over ‖H‖_F.
  rearranged = h.reshape(3, 4, 3, 4).transpose(0, 2, 1, 3).reshape(9, 16)
  sigma = np.linalg.svd(rearranged, compute_uv=False)[0]
  np.testing.assert_allclose(got["optimal"], sigma / np.linalg.norm(h),
                             rtol=1e-8)


def test_caspr_distances_against_dense_numpy():
  rng = np.random.default_rng(2)
  m, n, t, rank = 3, 4, 20, 2
  g = _random_gradients(rng, t, m, n, rank)
  got = layer_probe.caspr_distances(g, epsilon=1e-2)
  flat = g.reshape(t, -1)
  eps = 1e-2 * np.trace(flat.T @ flat) / (m * n)
  s = eps * np.eye(m * n) + flat.T @ flat
  left = eps * np.eye(m) + np.einsum("tij,tkj->ik", g, g)
  right = eps * np.eye(n) + np.einsum("tji,tjk->ik", g, g)
  power = lambda a, p: scipy.linalg.fractional_matrix_power(a, p).real
  pl, pr = power(left, -0.25), power(right, -0.25)
  ksum = (np.kron(pl, np.eye(n)) + np.kron(np.eye(m), pr)) / 2
  target = np.sqrt(rank) * power(s, -0.5)
  assert got["rank"] == rank
  for name, p in (("shampoo", np.kron(pl, pr)), ("caspr", ksum @ ksum)):
    mu = scipy.linalg.eigh(p, target, eigvals_only=True)
    np.testing.assert_allclose(got[f"{name}_dist"],
                               np.linalg.norm(np.log(mu)), rtol=1e-8)
    np.testing.assert_allclose(
        got[f"{name}_scale_free"],
        np.linalg.norm(np.log(mu) - np.log(mu).mean()), rtol=1e-8)
    inv_root = power(s, -0.5)
    cos = np.vdot(p, inv_root) / (np.linalg.norm(p)
                                  * np.linalg.norm(inv_root))
    np.testing.assert_allclose(got[f"{name}_frobenius"],
                               np.sqrt(1 - cos ** 2), rtol=1e-8)
    if name == "caspr":
      np.testing.assert_allclose(got["sandwich_upper"], mu.max(), rtol=1e-8)
  assert got["sandwich_upper"] <= 1 + 1e-9
  assert got["caspr_dist"] < got["shampoo_dist"]


# ------------------------------------------------------- seed 004: Sketchy --


SKETCHY = {"workload.widths": "[8]", "ranks": "[2]", "steps": 20,
           "eval_every": 10, "spectra.every": 10, "baseline": "shampoo",
           "optimizers.shampoo.learning_rate": "1e-2",
           "optimizers.sketchy.learning_rate": "1e-2"}


@pytest.fixture(scope="module")
def sketchy(tmp_path_factory):
  out = tmp_path_factory.mktemp("sketchy")
  config = config_lib.load(str(reproduce.config_path("sketchy_memory")))
  optimizers = {k: v for k, v in config["optimizers"].items() if k != "adamw"}
  return out, _run("sketchy_memory", out, SKETCHY, optimizers=optimizers)


def test_sketchy_spectra(sketchy):
  out, rec = sketchy
  saved = _written(out, "sketchy_memory.png")
  spectra = rec["spectra"]
  assert spectra["steps"] == [10, 20]
  # (a) Shampoo's factors put more of their trace in their top quarter than
  # Gaussian-gradient factors of the same shapes, at every probe, by 0.3.
  for real, gauss in zip(spectra["fractions"], spectra["gaussian"]):
    assert len(real) == len(gauss) == 4  # 2 kernels × 2 axes
    assert np.mean(real) > np.mean(gauss) + 0.3, (real, gauss)
  assert set(saved["claim"]["final_loss"]) == {"shampoo", "sketchy_r2"}
  for label, s in rec["summary"].items():
    loss = s["curves"]["eval_loss"]
    assert math.isfinite(loss[-1]) and loss[-1] < loss[0], label


def test_sketchy_state_bytes_are_k_times_m_plus_n():
  """(b): per axis of size d, U and the root's basis (d·min(k, d) each), σ
  and the root's scales, ρ and the root's tail, in float32; AdamW none."""
  config = config_lib.load(str(reproduce.config_path("sketchy_memory")))
  _, config = run.prepare(config, ["workload.widths=[16, 8, 16]",
                                   "ranks=[2, 4, 32]"])
  workload = workloads.make(**config["workload"])
  memory = sketchy_memory.state_bytes(workload, config)
  kernels = [s for s in train.param_shapes(workload).values()
             if len(s) == 2]
  for k in (2, 4, 32):
    want = sum(4 * (2 * d * min(k, d) + 2 * min(k, d) + 2)
               for shape in kernels for d in shape)
    assert memory[sketchy_memory.rank_label(k)]["factors"] == want
  assert (memory["sketchy_r2"]["factors"] < memory["sketchy_r4"]["factors"]
          < memory["shampoo"]["factors"])
  assert memory["adamw"]["factors"] == 0
  assert memory["adamw"]["total"] == 2 * memory["adamw"]["params"]


def test_cli_validates_every_config_first(capsys):
  with pytest.raises(SystemExit):
    reproduce_cli.main(["all", "--set", "stepz=3"])
  assert "'stepz' is unknown" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    reproduce_cli.main(["not_a_reproduction"])
  for name in reproduce.available():  # every shipped config
    module, _ = run.prepare(config_lib.load(str(reproduce.config_path(name))))
    assert module.__name__.startswith("experiments."), name
