"""Block-axis sharding (kronopt.sharding, engine ``shard_axis``/``mesh``).

The multi-device checks need 8 CPU devices, which JAX only creates when
``XLA_FLAGS`` is set before it starts, so they run once in a subprocess
(tests/sharding_worker.py) and each check is reported here as its own test.
Argument validation runs in this process.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import fast_jit
import kronopt

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
CHECKS = (
    "declared_shardings",
    "explicit_ambient_mesh",
    "explicit_mesh_other_algorithms",
    "fsdp_2x4",
    "matches_single_device_eigh",
    "matches_single_device_newton",
    "optax_wrappers",
    "other_algorithms_match_single_device",
    "padding_never_counts_as_failure",
    "zero_statistics_roots_pass_guard",
)


@pytest.fixture(scope="module")
def worker():
  """Runs every check of the worker once; returns (exit code, output)."""
  # The worker adds its device count to the session's compile flags.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=fast_jit.XLA_FLAGS)
  proc = subprocess.run([sys.executable, WORKER], capture_output=True,
                        text=True, env=env, timeout=400, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def test_worker_exits_cleanly_and_runs_every_check(worker):
  code, output = worker
  reported = sorted(line.split()[1] for line in output.splitlines()
                    if line.startswith(("PASS ", "FAIL ")))
  assert code == 0 and reported == sorted(CHECKS), output


@pytest.mark.parametrize("name", CHECKS)
def test_multi_device_check(worker, name):
  _, output = worker
  assert any(line.startswith(f"PASS {name} ")
             for line in output.splitlines()), output


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((1,), ("x",))


@pytest.mark.parametrize("shard_axis", [3, ("x", "x"), (), ("x", 1)])
def test_bad_shard_axis_raises(shard_axis):
  with pytest.raises(ValueError, match="shard_axis"):
    kronopt.scale_by_shampoo(shard_axis=shard_axis)


def test_shard_axis_not_in_mesh_raises(mesh):
  with pytest.raises(ValueError, match=r"shard_axis.*'y'.*\('x',\)"):
    kronopt.shampoo(1e-3, shard_axis="y", mesh=mesh)


def test_mesh_without_shard_axis_raises(mesh):
  with pytest.raises(ValueError, match="mesh=.*shard_axis=None"):
    kronopt.scale_by_shampoo(mesh=mesh)


def test_mesh_of_wrong_type_raises():
  with pytest.raises(ValueError, match="mesh=.*jax.sharding.Mesh"):
    kronopt.scale_by_shampoo(shard_axis="x", mesh="x")
  with pytest.raises(ValueError, match="mesh=.*jax.sharding.Mesh"):
    kronopt.state_shardings(kronopt.scale_by_shampoo(), {}, mesh="x")


def test_missing_mesh_raises_at_init():
  tx = kronopt.scale_by_shampoo(shard_axis="x")
  with pytest.raises(ValueError, match="needs a mesh.*jax.set_mesh"):
    jax.eval_shape(tx.init, {"w": jnp.zeros((4, 4))})
