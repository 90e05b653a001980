"""optax's own checks for contributed optimizers, run on kronopt's.

Written for kronopt after optax's ``contrib/_common_test.py`` (the checks
optax applies to every optimizer in ``optax.contrib``), parameterised over
one case per ready-made optimizer and statistics algorithm
(:func:`optimizer_cases.representatives`); K-FAC registers every matrix
leaf and derives its statistics from the gradient (``tests/
optimizer_cases.py``). The checks the conformance suite already makes for
every case (extra arguments, no recompilation, ``inject_hyperparams``,
bfloat16 updates, ``MultiSteps`` inside a chain) are not repeated here.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fast_jit import jit
import optimizer_cases
from test_conformance import CASES

REPS = optimizer_cases.representatives()
STEPS = 3000


def rosenbrock(dtype):
  """``(1 − x₀)² + 100 (x₁ − x₀²)²`` from 0; minimum at ``(1, 1)``."""
  x0 = jnp.zeros((2,), dtype)
  target = jnp.ones((2,), dtype)
  return x0, target, lambda x: (jnp.square(1.0 - x[0])
                                + 100.0 * jnp.square(x[1] - x[0] ** 2))


def matrix_parabola(dtype):
  """A 2×2 parameter (preconditioned by every Kronecker method)."""
  x0 = jnp.zeros((2, 2), dtype)
  target = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return x0, target, lambda x: jnp.sum(jnp.square(x - target))


def mixed(dtype):
  """A vector and a 2×2 matrix together."""
  x0 = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))
  target = (jnp.array([1.0, -1.0, 2.0], dtype),
            jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
  return x0, target, lambda x: (jnp.sum(jnp.square(x[0] - target[0]))
                                + jnp.sum(jnp.square(x[1] - target[1])))


# optax's vector parabola is the vector half of ``mixed``.
TARGETS = {"rosenbrock": rosenbrock, "matrix_parabola": matrix_parabola,
           "mixed": mixed}

# The cases' own settings (block_size 4, refresh every 2 steps) with a
# schedule that optax's fixed learning rate cannot express: warm-up, then
# a cosine decay to 1e-3 of the peak, so that every optimizer settles
# instead of circling the minimum at its last step size.
PEAK = {"rosenbrock": 3e-2}


def schedule(target):
  return optax.warmup_cosine_decay_schedule(
      0.0, PEAK.get(target, 1e-1), 100, STEPS, end_value=1e-4)


def build(name, params, **overrides):
  return optimizer_cases.build_for(name, params, **overrides)


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("name", REPS)
def test_converges_on_optaxs_targets(name, target):
  x0, want, loss = TARGETS[target](jnp.float32)
  tx, extra = build(name, x0, learning_rate=schedule(target))

  def step(carry, _):
    x, state = carry
    g = jax.grad(loss)(x)
    u, state = tx.update(g, state, x, **extra(g))
    return (optax.apply_updates(x, u), state), None

  run = jit(lambda x: jax.lax.scan(step, (x, tx.init(x)), length=STEPS)[0])
  x, _ = run(x0)
  for got, expected in zip(jax.tree_util.tree_leaves(x),
                           jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=3e-2, atol=3e-2,
                               err_msg=f"{name} on {target}")


# bfloat16 and float32 parameters are every conformance case's.
@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize("name", REPS)
def test_state_and_params_keep_dtypes_under_cond(name, dtype):
  """An update in one branch of ``lax.cond`` and the unchanged parameters
  and state in the other type-check, for every parameter dtype; a float16
  loss value passed along is ignored."""
  with jax.enable_x64(dtype == "float64"):
    x0, _, loss = matrix_parabola(jnp.dtype(dtype))
    tx, extra = build(name, x0)

    @jit
    def step(x, state, key):
      value, g = jax.value_and_grad(loss)(x)
      pick = jax.random.randint(key, (), 0, 2) == 0
      u, state = jax.lax.cond(
          pick, lambda: tx.update(g, state, x, value=value.astype(
              jnp.float16), **extra(g)),
          lambda: (jax.tree_util.tree_map(jnp.zeros_like, x), state))
      return optax.apply_updates(x, u), state

    x, state = x0, tx.init(x0)
    for t in range(3):
      new_x, new_state = step(x, state, jax.random.PRNGKey(t))
      assert new_x.dtype == jnp.dtype(dtype)
      assert (jax.tree_util.tree_structure(new_state)
              == jax.tree_util.tree_structure(state))
      for a, b in zip(jax.tree_util.tree_leaves(new_state),
                      jax.tree_util.tree_leaves(state)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), name
      x, state = new_x, new_state


@pytest.mark.parametrize("name", REPS)
def test_gradient_accumulation_first_micro_steps_are_zero(name):
  x0, _, loss = matrix_parabola(jnp.float32)
  tx, extra = build(name, x0)
  tx = optax.MultiSteps(tx, every_k_schedule=4)
  g = jax.grad(loss)(x0)
  updates, _ = jit(lambda g, s, x: tx.update(g, s, x, **extra(g)))(
      g, jit(tx.init)(x0), x0)
  np.testing.assert_array_equal(updates, jnp.zeros_like(g))


@pytest.mark.parametrize("name", sorted({CASES[n].fn.__name__: n
                                         for n in CASES}.values()))
def test_learning_rate_is_annotated_as_a_schedule(name):
  """optax's checks pass a schedule only where ``learning_rate`` is
  annotated ``optax.ScalarOrSchedule`` (a module with ``from __future__
  import annotations`` hides it as a string)."""
  annotation = inspect.signature(CASES[name].fn).parameters[
      "learning_rate"].annotation
  assert annotation in (optax.ScalarOrSchedule, optax.Schedule), annotation


@pytest.mark.parametrize("name", REPS)
def test_constant_schedule_equals_constant_learning_rate(name):
  x0, _, loss = mixed(jnp.float32)
  runs = []
  for lr in (1e-2, optax.constant_schedule(1e-2)):
    tx, extra = build(name, x0, learning_rate=lr)
    x, state = x0, tx.init(x0)
    update = jit(lambda g, s, x, tx=tx, extra=extra: tx.update(
        g, s, x, **extra(g)))
    for _ in range(6):
      g = jax.grad(loss)(x)
      u, state = update(g, state, x)
      x = optax.apply_updates(x, u)
    runs.append(x)
  for a, b in zip(*map(jax.tree_util.tree_leaves, runs)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
