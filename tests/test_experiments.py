"""The experiments framework: CLI end to end, configs, loop, sweeps.

One tiny character-LM sweep through ``python -m experiments.run`` (module
fixture, shared by the tests that read its output) also gives the LM's few
steps with optax.adamw, kronopt.shampoo and kronopt.sketchy. No timings here.
"""

import contextlib
import io
import json
import math
import pathlib
import re

import jax
import numpy as np
import optax
import pytest

from experiments import config as config_lib
from experiments import grid
from experiments import optimizers
from experiments import run
from experiments import schedules
from experiments import sweep
from experiments import train
from experiments.workloads import quadratic

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
TINY_LM = """\
experiment: sweep
title: tiny
workload: {{name: char_lm, layers: 1, d_model: 16, heads: 2, seq_len: 16,
           batch_size: 4, mlp_ratio: 1, eval_windows: 8}}
steps: 12
eval_every: 6
seeds: [0, 1]
schedule: {{name: warmup_cosine, warmup_steps: 2}}
baseline: adamw
output_dir: {out}
progress: false
compiler_options: {{xla_backend_optimization_level: 0,
                   xla_llvm_disable_expensive_passes: true}}
optimizers:
  adamw:
    name: adamw
    learning_rate: [3e-3, 1e-2]
    sweep: {{b2: [0.95, 0.999]}}
  shampoo:
    name: shampoo
    learning_rate: 1e-2
    block_size: 16
    precondition_every: 3
    start_preconditioning_step: 1
  sketchy:
    name: sketchy
    learning_rate: 1e-2
    block_size: 16
    rank: 4
    start_preconditioning_step: 1
  missing:
    name: not_an_optimizer_yet
    optional: true
    learning_rate: 1e-3
"""


@pytest.fixture(scope="module")
def lm_sweep(tmp_path_factory):
  """``(output_dir, stdout, record)`` of the tiny LM sweep via the CLI."""
  tmp = tmp_path_factory.mktemp("lm")
  path = tmp / "tiny.yaml"
  path.write_text(TINY_LM.format(out=tmp / "wrong"))
  out = tmp / "out"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    record = run.main([str(path), "--set", f"output_dir={out}"])
  return out, stdout.getvalue(), record


def test_cli_writes_json_and_plots(lm_sweep):
  out, _, _ = lm_sweep
  for name in ("loss_vs_steps.png", "loss_vs_time.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  record = json.loads((out / "results.json").read_text())
  assert {"config", "versions", "machine", "summary", "runs"} <= set(record)
  assert record["config"]["output_dir"] == str(out)  # --set applied
  assert set(record["versions"]) >= {"jax", "jaxlib", "optax", "flax",
                                     "kronopt", "numpy"}
  assert all(record["versions"][k] for k in ("jax", "optax", "flax", "numpy"))
  assert {"platform", "cpu_count", "device"} <= set(record["machine"])
  assert record["skipped"] == {"missing": "not_an_optimizer_yet is not in "
                                          "kronopt or optax"}
  # Per-run curves: adamw 2 lr x 2 b2 x 2 seeds, the others 2 seeds.
  counts = {}
  for r in record["runs"]:
    counts[r["optimizer"]] = counts.get(r["optimizer"], 0) + 1
    assert len(r["train_loss"]) == 12
    assert r["eval"]["step"] == [0, 6, 12]
    assert len(r["eval"]["loss"]) == len(r["eval"]["accuracy"]) == 3
    assert len(r["chunk_seconds"]) == 2 and r["compile_seconds"] > 0
  assert counts == {"adamw": 8, "shampoo": 2, "sketchy": 2}
  assert record["summary"]["adamw"]["grid"] == {
      "learning_rate": [3e-3, 1e-2], "b2": [0.95, 0.999]}


def test_lm_trains_with_each_optimizer(lm_sweep):
  _, _, record = lm_sweep
  for r in record["runs"]:
    assert np.all(np.isfinite(r["train_loss"])), r["optimizer"]
    assert r["eval"]["loss"][-1] < r["eval"]["loss"][0], r["optimizer"]
  for name in ("shampoo", "sketchy"):
    diag = record["summary"][name]["diagnostics"]
    assert diag["refresh_failures"] == 0 and diag["preconditioned"] == 1
  assert record["summary"]["adamw"]["diagnostics"] is None  # optax's own


def test_cli_prints_the_table(lm_sweep):
  _, stdout, record = lm_sweep
  assert "skipping missing" in stdout
  header = next(l for l in stdout.splitlines() if l.startswith("| optimizer"))
  assert "steps to adamw's final val loss" in header
  rows = [l for l in stdout.splitlines() if l.startswith("| ")][1:]
  assert [r.split("|")[1].strip() for r in rows] == ["adamw", "shampoo",
                                                     "sketchy"]
  summary = record["summary"]
  assert summary["adamw"]["step_time_ratio"] == {"mean": 1.0, "median": 1.0}
  # AdamW reaches its own final loss, at the latest at its last evaluation.
  assert summary["adamw"]["steps_to_baseline"] <= 12
  best = summary["adamw"]["best"]
  scores = {grid.key(s["point"]): s["final_val_loss"]
            for s in summary["adamw"]["scores"]}
  assert scores[grid.key(best)] == min(scores.values())
  runs = [r for r in record["runs"] if r["optimizer"] == "adamw"
          and r["point"] == best]
  np.testing.assert_allclose(summary["adamw"]["final"]["loss"], np.mean(
      [r["eval"]["loss"][-1] for r in runs]))


def _config(**changes):
  config = config_lib.parse_value(TINY_LM.format(out="x"))
  return config_lib.apply_overrides(config, [f"{k}={v}" for k, v in
                                             changes.items()])


@pytest.mark.parametrize("key, value", [
    ("stepz", "3"),                                # unknown, top level
    ("workload.d_modle", "3"),                     # unknown, nested
    ("optimizers.shampoo.blok_size", "3"),         # not a keyword of it
    ("optimizers.adamw.sweep.b3", "[0.9]"),        # not a keyword of adamw
])
def test_unknown_key_is_named(key, value):
  with pytest.raises(config_lib.ConfigError,
                     match=re.escape(f"'{key}' is unknown")):
    run.prepare(_config(**{key: value}))


@pytest.mark.parametrize("key, value", [
    ("steps", "ten"),
    ("seeds", "0"),
    ("workload.layers", "1.5"),
    ("optimizers.shampoo.block_size", "16.5"),
    ("optimizers.adamw.learning_rate", "[1e-3, fast]"),
    ("optimizers.adamw.b1", "true"),
    ("schedule.name", "linear"),
])
def test_ill_typed_key_is_named(key, value):
  with pytest.raises(config_lib.ConfigError) as error:
    run.prepare(_config(**{key: value}))
  assert key in str(error.value)


def test_cli_reports_a_bad_key_without_traceback(tmp_path, capsys):
  path = tmp_path / "bad.yaml"
  path.write_text(TINY_LM.format(out=tmp_path))
  with pytest.raises(SystemExit) as exit_:
    run.main([str(path), "--set", "optimizers.adamw.lerning_rate=1e-3"])
  assert exit_.value.code == 2
  assert "'optimizers.adamw.lerning_rate' is unknown" in capsys.readouterr(
      ).err


def test_set_overrides_nested_keys():
  _, config = run.prepare(_config(), [
      "workload.d_model=32", "optimizers.adamw.learning_rate=[1e-3, 2e-3]",
      "optimizers.shampoo.sweep={b2: [0.99, 0.999]}",
      "schedule.warmup_steps=0"])
  assert config["workload"]["d_model"] == 32
  assert config["workload"]["heads"] == 2  # siblings kept
  assert config["optimizers"]["adamw"]["learning_rate"] == [1e-3, 2e-3]
  assert config["optimizers"]["shampoo"]["sweep"] == {"b2": [0.99, 0.999]}
  with pytest.raises(config_lib.ConfigError, match="also fixed"):
    run.prepare(_config(), ["optimizers.shampoo.sweep={block_size: [8]}"])
  assert config["schedule"] == {"name": "warmup_cosine", "warmup_steps": 0,
                                "end_factor": 0.0}
  with pytest.raises(config_lib.ConfigError, match="KEY=VALUE"):
    config_lib.apply_overrides({}, ["steps"])


def test_cross_key_checks():
  for changes, key in [({"eval_every": 5}, "eval_every"),
                       ({"baseline": "sgd"}, "baseline"),
                       ({"schedule.warmup_steps": 12}, "warmup_steps")]:
    with pytest.raises(config_lib.ConfigError, match=key):
      run.prepare(_config(**changes))


def test_shipped_configs_validate():
  _, config = run.prepare(config_lib.load(str(CONFIGS / "quickstart.yaml")))
  assert config["workload"]["name"] == "char_lm"
  assert {"adamw", "shampoo"} <= set(config["optimizers"])
  assert config["schedule"]["name"] == "warmup_cosine"
  assert config["steps"] == 200
  # Every shipped config validates, and a reproduction's own SCHEMA rejects
  # unknown keys and wrong types.
  for path in sorted(CONFIGS.glob("**/*.yaml")):
    run.prepare(config_lib.load(str(path)))
  _, config = run.prepare(config_lib.load(
      str(CONFIGS / "reproduce" / "kradagrad_quadratic.yaml")))
  with pytest.raises(config_lib.ConfigError, match="'dd' is unknown"):
    run.prepare({**config, "dd": 3})
  with pytest.raises(config_lib.ConfigError, match="'steps'"):
    run.prepare({**config, "steps": "many"})


def test_edge_flag():
  axes = {"learning_rate": [1e-3, 3e-3, 1e-2], "b2": [0.95, 0.99, 0.999]}
  def scores(best_lr, best_b2):
    return [(p, (math.log10(p["learning_rate"] / best_lr)) ** 2
             + (p["b2"] - best_b2) ** 2) for p in grid.points(axes)]
  interior = grid.best(scores(3e-3, 0.99))
  assert interior == {"learning_rate": 3e-3, "b2": 0.99}
  assert grid.edges(axes, interior) == []
  low_lr = grid.best(scores(1e-4, 0.99))
  assert grid.edges(axes, low_lr) == ["learning_rate"]
  corner = grid.best(scores(1.0, 0.5))
  assert grid.edges(axes, corner) == ["learning_rate", "b2"]
  assert grid.edges({"learning_rate": [1e-3]}, {"learning_rate": 1e-3}) == [
      "learning_rate"]  # a one-point grid brackets nothing
  assert grid.edges({"root_method": ["eigh", "newton"]},
                    {"root_method": "eigh"}) == []  # categorical
  # Non-finite scores never win.
  assert grid.best([({"learning_rate": 1.0}, math.nan),
                    ({"learning_rate": 2.0}, 3.0)]) == {"learning_rate": 2.0}
  assert grid.best([({"learning_rate": 1.0}, math.inf)]) is None


def _fake_run(lr, seed, final):
  return {"optimizer": "x", "point": {"learning_rate": lr}, "seed": seed,
          "train_loss": [final], "eval": {"step": [0, 1], "seconds": [0, 1],
                                          "loss": [9.0, final]},
          "chunk_seconds": [1.0], "wall_seconds": 1.0, "compile_seconds": 1.0,
          "diagnostics": {}}


def test_best_of_is_by_mean_over_seeds_and_flags_the_edge():
  axes = {"learning_rate": [1e-3, 1e-2, 1e-1]}
  # 1e-2 wins on the mean although 1e-1 has the single best seed.
  finals = {1e-3: (3.0, 3.0), 1e-2: (1.0, 1.2), 1e-1: (0.5, 4.0)}
  runs = [_fake_run(lr, s, f[s]) for lr, f in finals.items() for s in (0, 1)]
  summary = sweep.summarize_optimizer(runs, axes, 1, 2)
  assert summary["best"] == {"learning_rate": 1e-2}
  assert summary["edge"] == []
  np.testing.assert_allclose(summary["final"]["loss"], 1.1)
  finals[1e-1] = (0.5, 0.6)
  runs = [_fake_run(lr, s, f[s]) for lr, f in finals.items() for s in (0, 1)]
  summary = sweep.summarize_optimizer(runs, axes, 1, 2)
  assert summary["best"] == {"learning_rate": 1e-1}
  assert summary["edge"] == ["learning_rate"]


def test_steps_to():
  assert sweep.steps_to([0, 10, 20], [5.0, 2.0, 1.0], 2.0) == 10
  assert sweep.steps_to([0, 10, 20], [5.0, math.nan, 1.0], 1.5) == 20
  assert sweep.steps_to([0, 10, 20], [5.0, 4.0, 3.0], 1.0) is None
  assert sweep.steps_to([0, 10], [5.0, 4.0], None) is None


def test_schedule_matches_optax():
  peak, steps = 3e-3, 50
  unit = schedules.unit(steps, name="warmup_cosine", warmup_steps=5,
                        end_factor=0.1)
  ref = optax.warmup_cosine_decay_schedule(0.0, peak, 5, steps,
                                           end_value=0.1 * peak)
  t = np.arange(steps + 1)
  np.testing.assert_allclose(peak * jax.vmap(unit)(t), jax.vmap(ref)(t),
                             rtol=1e-6, atol=1e-12)
  assert float(schedules.unit(steps)(7)) == 1.0
  with pytest.raises(ValueError, match="warmup_steps=50"):
    schedules.unit(steps, name="warmup_cosine", warmup_steps=50)


@pytest.fixture(scope="module")
def small_quadratic():
  return quadratic.make(d=8, c=2.0)


def test_grid_compiles_once_and_matches_an_eager_loop(small_quadratic):
  """Two learning rates, two b2 and two seeds: one trace of the chunk; each
  run equals a plain Python loop of optax.adamw with the same schedule."""
  steps, shape = 8, schedules.unit(8, name="warmup_cosine", warmup_steps=2)
  traced = []

  def make_tx(hp):
    if isinstance(hp["learning_rate"], jax.core.Tracer):
      traced.append(hp)
    return optimizers.build_traced("adamw", {}, hp, shape)

  trainer = train.Trainer(small_quadratic, make_tx, steps=steps,
                          eval_every=4)
  for lr, b2, seed in [(1e-2, 0.99, 0), (3e-2, 0.9, 0), (3e-2, 0.9, 1)]:
    result = trainer.run(seed, {"learning_rate": lr, "b2": b2})
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, 2, steps),
                     b2=b2)
    params = train.init_params(small_quadratic, jax.random.split(
        jax.random.PRNGKey(seed))[0])
    state, losses = tx.init(params), []

    @jax.jit
    def step(params, state, tx=tx):
      loss, g = jax.value_and_grad(small_quadratic.loss)(params, None)
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
      params, state, loss = step(params, state)
      losses.append(loss)
    np.testing.assert_allclose(result["train_loss"], losses, rtol=2e-5)
    np.testing.assert_allclose(result["eval"]["loss"][-1],
                               small_quadratic.loss(params, None), rtol=2e-5)
  # Traced twice in all (the optimizer's init and the chunk), not per run.
  assert len(traced) == 2


def test_divergence_stops_the_run(small_quadratic):
  shape = schedules.unit(8)
  trainer = train.Trainer(
      small_quadratic, lambda hp: optimizers.build_traced("sgd", {}, hp,
                                                          shape),
      steps=8, eval_every=2)
  result = trainer.run(0, {"learning_rate": 1e30})
  assert result["diverged"]
  assert len(result["chunk_seconds"]) < 4
  assert math.isnan(result["eval"]["loss"][-1])
  with pytest.raises(ValueError, match="eval_every=3"):
    train.Trainer(small_quadratic, None, steps=8, eval_every=3)
