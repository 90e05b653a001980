"""A short soak: 2,000 steps of a small model with a NaN burst and a spike.

Every optimizer (one case per ready-made optimizer and statistics
algorithm, ``tests/optimizer_cases.py``) trains a 2-layer tanh regression
network on a fixed batch twice in one compiled program: clean, and with a
burst of ten non-finite gradients at steps 1000–1009 (NaN and ±inf) and one
finite gradient of entries ±1e19 at step 1500 (its squares overflow
float32, so the statistics would become inf: the step is skipped as
overflowing). The faulty run must end within 1.2× of the clean run's loss,
finite, with every bad step skipped and counted. (A spike whose squares do
not overflow is a gradient like any other: it stays in any Adam-like second
moment for thousands of steps, ``optax.adamw``'s included.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronopt
from fast_jit import jit
import optimizer_cases

REPS = optimizer_cases.representatives()
STEPS, BURST, SPIKE = 2000, range(1000, 1010), 1500


def problem():
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(k[0], (64, 8))
  teacher = jnp.tanh(x @ jax.random.normal(k[1], (8, 6))) @ jax.random.normal(
      k[2], (6, 4))
  params = {"w1": jax.random.normal(k[3], (8, 16)) / jnp.sqrt(8.0),
            "b1": jnp.zeros((16,)),
            "w2": jax.random.normal(k[4], (16, 4)) / 4.0,
            "b2": jnp.zeros((4,))}

  def loss(p):
    pred = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return jnp.mean(jnp.square(pred - teacher))

  return params, loss


def corrupt(g, t, faulty):
  """``g`` at step ``t``: NaN/inf during the burst, ±1e19 at the spike."""
  in_burst = faulty & (t >= BURST.start) & (t < BURST.stop)
  bad = jnp.where(t % 2 == 0, jnp.nan, jnp.inf)
  return jax.tree_util.tree_map(
      lambda x: jnp.where(in_burst, bad * jnp.ones_like(x),
                          jnp.where(faulty & (t == SPIKE),
                                    jnp.where(x < 0, -1e19, 1e19), x)), g)


@pytest.mark.parametrize("name", REPS)
def test_recovers_from_a_nan_burst_and_a_spike(name):
  params, loss = problem()
  tx, extra = optimizer_cases.build_for(name, params, learning_rate=1e-2)

  def step(carry, t, faulty):
    p, state = carry
    g = corrupt(jax.grad(loss)(p), t, faulty)
    u, state = tx.update(g, state, p, **extra(g))
    return (optax.apply_updates(p, u), state), None

  @jit
  def train(faulty):
    (p, state), _ = jax.lax.scan(
        lambda c, t: step(c, t, faulty), (params, tx.init(params)),
        jnp.arange(STEPS))
    return loss(p), p, state

  clean, _, _ = train(jnp.bool_(False))
  faulty, p, state = train(jnp.bool_(True))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(p))
  assert float(faulty) <= 1.2 * float(clean), (name, faulty, clean)
  diag = kronopt.diagnostics(state)
  skipped = int(diag["skipped_gradients"]) + int(diag["overflowed_statistics"])
  assert skipped == len(BURST) + 1, (name, diag)
