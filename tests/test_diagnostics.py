"""kronopt.diagnostics (docs/diagnostics.md).

Every key is checked against the engine's own counters after a run with a
non-finite gradient, an overflowing one and rejected refreshes; several
preconditioners in one state are summed or maxed as documented; and Flax
NNX's views of a state (the optimizer, its ``opt_state``, ``nnx.state``, the
state of ``nnx.split``, a pure dict) give the same values as the optax state.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kronopt
from kronopt import engine

sys.path.insert(0, os.path.dirname(__file__))
from fast_jit import jit  # noqa: E402  (cheap XLA options)

KEYS = ("refresh_failures", "skipped_gradients", "overflowed_statistics",
        "worst_residual", "preconditioned", "count")
COMMON = dict(block_size=8, precondition_every=1, start_preconditioning_step=1)


def make_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return {"w": jax.random.normal(k1, (6, 4)), "v": jax.random.normal(k2, (5, 3)),
          "b": jnp.zeros((4,))}


def grads_at(params, t, bad=None):
  """Pseudo-gradients of step ``t``; ``bad`` sets ``w[0, 0]``."""
  key = jax.random.PRNGKey(10 + t)
  g = jax.tree_util.tree_map(
      lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape),
      params)
  return g if bad is None else dict(g, w=g["w"].at[0, 0].set(bad))


def run(tx, bads):
  """Steps with ``grads_at(t, bads[t])``; returns every state."""
  params = make_params()
  update = jit(tx.update)
  states = [jit(tx.init)(params)]
  for t, bad in enumerate(bads):
    states.append(update(grads_at(params, t, bad), states[-1], params)[1])
  return states


def as_python(diag):
  return {k: np.asarray(v).item() for k, v in diag.items()}


def test_keys_follow_the_engine_counters():
  # Steps: good, NaN (skipped), 1e25 (its square overflows: skipped), good,
  # good. Three steps are taken; the refreshes run at counts 1 and 2.
  states = run(kronopt.shampoo(1e-2, **COMMON),
               [None, jnp.nan, 1e25, None, None])
  assert as_python(kronopt.diagnostics(states[0])) == dict(
      refresh_failures=0, skipped_gradients=0, overflowed_statistics=0,
      worst_residual=0.0, preconditioned=False, count=0)
  # After the first step: not yet preconditioned (count 0 < 1), no refresh.
  assert as_python(kronopt.diagnostics(states[1])) == dict(
      refresh_failures=0, skipped_gradients=0, overflowed_statistics=0,
      worst_residual=0.0, preconditioned=False, count=1)
  diag = kronopt.diagnostics(states[-1])
  assert tuple(diag) == KEYS
  for key in KEYS:
    assert diag[key].shape == (), key
  (inner,) = engine.find_states(states[-1])
  got = as_python(diag)
  assert got == dict(refresh_failures=0, skipped_gradients=1,
                     overflowed_statistics=1,
                     worst_residual=float(inner.residual),
                     preconditioned=True, count=3)
  assert 0.0 < got["worst_residual"] < 1e-4  # eigh's reconstruction error
  assert diag["refresh_failures"].dtype == jnp.int32
  assert diag["count"].dtype == jnp.int32
  assert diag["worst_residual"].dtype == jnp.float32
  assert diag["preconditioned"].dtype == jnp.bool_
  assert as_python(jax.jit(kronopt.diagnostics)(states[-1])) == got


def test_several_preconditioners_are_summed_or_maxed():
  # Part "a" (w, b) rejects every refresh and skips the NaN step; part "v"
  # (v, inside inject_hyperparams) takes every step and accepts its
  # refreshes.
  labels = {"w": "a", "b": "a", "v": "v"}
  injected = optax.inject_hyperparams(kronopt.shampoo,
                                      static_args=("block_size",))
  tx = optax.partition({
      "a": kronopt.shampoo(1e-2, inverse_failure_threshold=1e-30, **COMMON),
      "v": injected(learning_rate=1e-2, **COMMON)}, labels)
  state = run(tx, [None, jnp.nan, None, None, None])[-1]
  parts = engine.find_states(state)
  assert len(parts) == 2
  assert sorted(int(s.count) for s in parts) == [4, 5]
  # "a" refreshed at counts 1, 2, 3 and rejected each (one block).
  assert sorted(int(s.failures) for s in parts) == [0, 3]
  diag = as_python(kronopt.diagnostics(state))
  assert diag["refresh_failures"] == 3
  assert diag["skipped_gradients"] == 1
  assert diag["count"] == 5
  assert diag["worst_residual"] == max(float(s.residual) for s in parts)
  assert diag["preconditioned"] is True


def test_state_without_a_preconditioner_raises_with_a_hint():
  state = optax.adam(1e-3).init(make_params())
  with pytest.raises(ValueError, match=r"optimizer\.opt_state"):
    kronopt.diagnostics(state)
  with pytest.raises(ValueError, match="no kronopt preconditioner"):
    kronopt.diagnostics({"count": jnp.zeros([], jnp.int32)})


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 6, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


@pytest.fixture(scope="module")
def nnx_optimizer():
  """An ``nnx.Optimizer`` after 4 steps, the third with a NaN gradient."""
  def create():
    model = MLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, kronopt.shampoo(1e-2, **COMMON),
                                wrt=nnx.Param)

  model, optimizer = nnx.jit(create)()  # one compile, not op-by-op init

  @nnx.jit
  def step(model, optimizer, x, y, poison):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    grads = jax.tree_util.tree_map(lambda g: g * poison, grads)
    optimizer.update(model, grads)

  key = jax.random.PRNGKey(1)
  for t, poison in enumerate([1.0, 1.0, jnp.nan, 1.0]):
    kx, ky = jax.random.split(jax.random.fold_in(key, t))
    step(model, optimizer, jax.random.normal(kx, (4, 5)),
         jax.random.normal(ky, (4, 3)), jnp.asarray(poison))
  return optimizer


def test_reads_every_nnx_view_of_the_state(nnx_optimizer):
  optimizer = nnx_optimizer
  want = as_python(kronopt.diagnostics(optimizer.opt_state))
  assert want["count"] == 3 and want["skipped_gradients"] == 1
  assert want["preconditioned"] is True and want["refresh_failures"] == 0
  views = {
      "optimizer": optimizer,
      "nnx.state": nnx.state(optimizer),
      "nnx.split": nnx.split(optimizer)[1],
      "pure dict": nnx.to_pure_dict(nnx.state(optimizer)),
      "opt_state only": nnx.state(optimizer)["opt_state"],
  }
  for name, view in views.items():
    assert as_python(kronopt.diagnostics(view)) == want, name
  jitted = nnx.jit(lambda opt: kronopt.diagnostics(nnx.state(opt)))
  assert as_python(jitted(optimizer)) == want


def test_nnx_values_equal_the_plain_optax_state(nnx_optimizer):
  # The engine fields of the NNX state are the very arrays of opt_state.
  (inner,) = engine.find_states(nnx_optimizer.opt_state)
  direction = nnx.state(nnx_optimizer)["opt_state"][0]["direction"]
  for field in engine.PreconditionerState._fields:
    if field == "groups":
      continue
    np.testing.assert_array_equal(
        np.asarray(jax.tree_util.tree_leaves(direction[field])[0]),
        np.asarray(jax.tree_util.tree_leaves(getattr(inner, field))[0]),
        err_msg=field)


def test_core_kronopt_imports_and_reads_states_without_flax():
  code = (
      "import sys; sys.modules['flax'] = None\n"
      "import jax.numpy as jnp, kronopt\n"
      "tx = kronopt.shampoo(1e-2, block_size=8)\n"
      "d = kronopt.diagnostics(tx.init({'w': jnp.ones((3, 2))}))\n"
      "assert int(d['count']) == 0\n"
      "assert 'flax' not in {m.split('.')[0] for m in sys.modules\n"
      "                      if sys.modules[m] is not None}\n"
      "print('ok')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
