"""Smoke test of the main job's code path (no timings here)."""

import json
import math

from experiments import run

CONFIG = """\
experiment: quickstart
output_dir: {out}
steps: 3
seed: 0
hidden: [16]
optimizers:
  shampoo: {{name: shampoo, learning_rate: 1e-2, block_size: 64, precondition_every: 2, start_preconditioning_step: 1}}
  adam: {{name: adam, learning_rate: 1e-2}}
"""


def test_quickstart_writes_results(tmp_path):
  out = tmp_path / "out"
  config = tmp_path / "tiny.yaml"
  config.write_text(CONFIG.format(out=out))

  run.main([str(config)])

  assert (out / "loss.png").stat().st_size > 0
  results = json.loads((out / "results.json").read_text())["results"]
  assert set(results) == {"shampoo", "adam"}
  for r in results.values():
    assert len(r["losses"]) == 4
    assert all(math.isfinite(x) for x in r["losses"])
    assert 0.0 <= r["test_accuracy"] <= 1.0
