"""The K-FAC inversion-error reproduction (configs/reproduce/
kfac_inversion_error.yaml) at a tiny size, and its float64 measurements.

The shipped config is shrunk by overrides to the digits MLP 64-32-32-10,
batch 16, rank 12 (every factor but the 10-dimensional one is truncated),
T_cov 2, T_inv 4 and a B-R-KFAC reset every 2 refreshes (steps 8, 16, …),
trained by B-KFAC (whose preconditioner is also the brand curve) beside
rsvd and brand_rsvd, compiled with XLA's cheapest options (the step's
compilation is most of the cost: one K-FAC transform per method). The
claims asserted are the ones that hold at any size (measured at this one in
the comments):

* brand keeps a factor with ``d ≤ r`` exactly: its spectral error is float32
  rounding (3.0e-6), below ``FULL_RANK_TOL``;
* right after each refresh rsvd's error is within ``RSVD_OVER_OPTIMUM`` of
  the best rank-r error ``λ_{r+1}/λ_1`` (1.0000: three power iterations);
* at each reset after the first, brand_rsvd's error is no larger than
  brand's (−7.2e-4), up to ``RESET_TOL``;
* the float64 EMA kept beside the methods is the optimizer's own float32
  EMA (gap 3.9e-7 ≤ ``EMA_TOL``), i.e. both follow the same statistics schedule.

No timings are asserted (the update-time sweep runs at d = 8, 16 only to
check its record and figure).
"""

import json
import pathlib

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import run
from experiments.reproduce import kfac_inversion

QUICK = {"xla_backend_optimization_level": 0,
         "xla_llvm_disable_expensive_passes": True}
PNG = b"\x89PNG\r\n\x1a\n"
FULL_RANK_TOL = 1e-4
RSVD_OVER_OPTIMUM = 1.05
RESET_TOL = 1e-6
EMA_TOL = 1e-5
TINY = {"widths": "[32]", "steps": 26, "batch_size": 16, "kfac.rank": 12,
        "kfac.cov_every": 2, "kfac.inverse_every": 4,
        "kfac.rsvd_reset_every": 2, "timing.widths": "[8, 16]",
        "methods": "[rsvd, brand, brand_rsvd]", "train.method": "brand",
        "timing.repeats": 1, "timing.columns": 4, "progress": "false"}


CONFIG = (pathlib.Path(__file__).resolve().parents[1] / "configs" / "reproduce"
          / "kfac_inversion_error.yaml")


def _config():
  return config_lib.load(str(CONFIG))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  out = tmp_path_factory.mktemp("kfac_inversion")
  config = _config()
  config["compiler_options"] = QUICK
  rec = run.run(config, [f"{k}={v}" for k, v in TINY.items()]
                + [f"output_dir={out}"])
  return out, rec


def test_writes_figures_and_json(study):
  out, rec = study
  for name in (kfac_inversion.ERROR_FIGURE, kfac_inversion.TIME_FIGURE):
    assert (out / name).read_bytes()[:8] == PNG
  saved = json.loads((out / "results.json").read_text())
  assert {"config", "versions", "machine", "widths", "timing",
          "claims"} <= set(saved)
  assert saved["versions"]["jax"] and saved["machine"]["cpu_count"]
  res = saved["widths"]["32"]
  assert [f["d"] for f in res["factors"]] == [65, 32, 33, 32, 33, 10]
  assert [f["rank"] for f in res["factors"]] == [12] * 5 + [10]
  assert res["steps"] == list(range(0, 26, 2))
  assert len(res["train_loss"]) == 26
  # brand's curve is the training optimizer's own preconditioner.
  assert res["shared_with_training"] == "brand"
  for key in ("spectral", "application"):
    assert list(res[key]) == ["rsvd", "brand", "brand_rsvd"]
    for curve in res[key].values():
      assert np.asarray(curve).shape == (13, 6)
      assert np.all(np.isfinite(curve))
  for row in res["diagnostics"].values():
    assert row == {"refresh_failures": 0, "skipped_gradients": 0}
  timing = saved["timing"]
  assert timing["widths"] == [8, 16] and set(timing["seconds"]) == set(
      kfac_inversion.TIMED)
  assert "quiet machine" in timing["note"]
  # The optimizer's defaults are what the study ran with, but for --set.
  assert saved["kfac"]["ema"] == 0.95 and saved["kfac"]["rank"] == 12


def test_claims(study):
  _, rec = study
  claim = rec["claims"]["32"]
  assert claim["brand_full_rank"] < FULL_RANK_TOL, claim
  assert 1.0 - 1e-6 <= claim["rsvd_over_optimum"] < RSVD_OVER_OPTIMUM, claim
  assert claim["reset_steps"] == [8, 16, 24]
  assert claim["brand_rsvd_minus_brand"] <= RESET_TOL, claim
  assert rec["widths"]["32"]["ema_gap"] < EMA_TOL


def test_apply_is_the_damped_solve():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6, 9))
  m = x @ x.T
  lam, vec = np.linalg.eigh(m)
  damp = 0.1
  g = rng.standard_normal((6, 4))
  left = kfac_inversion._apply(vec, 1.0 / (lam + damp), g, 0)
  np.testing.assert_allclose(left, np.linalg.solve(m + damp * np.eye(6), g),
                             rtol=1e-10)
  right = kfac_inversion._apply(vec, 1.0 / (lam + damp), g.T, 1)
  np.testing.assert_allclose(
      right, g.T @ np.linalg.inv(m + damp * np.eye(6)), rtol=1e-10)


def test_fitted_slope_and_schedules():
  d = [256, 512, 1024, 2048, 4096]
  assert kfac_inversion.fitted_slope(d, [1e-9 * x ** 3 for x in d]) == (
      pytest.approx(3.0))
  assert kfac_inversion.fitted_slope([256], [1.0]) is None
  args = {"start_preconditioning_step": 0, "inverse_every": 100,
          "rsvd_reset_every": 5}
  steps = list(range(0, 1200, 10))
  assert kfac_inversion.refresh_steps(args, steps) == list(
      range(0, 1200, 100))
  assert kfac_inversion.reset_steps(args, steps) == [500, 1000]


@pytest.mark.parametrize("override, error, match", [
    ("kfac.rnak=3", config_lib.ConfigError, "kfac.rnak"),
    ("kfac.rank=0", ValueError, "rank"),
    ("methods=[brand, brand]", config_lib.ConfigError, "repeats"),
    ("methods=[lanczos]", config_lib.ConfigError, "methods"),
])
def test_bad_config_raises_before_any_work(override, error, match):
  with pytest.raises(error, match=match):
    run.prepare(_config(), [override])
