"""Small training problems shared by the convergence tests.

* :func:`digits` -- scikit-learn's bundled 8×8 digits (no download),
  standardised, with a 64-32-10 tanh MLP and softmax cross-entropy.
* :func:`kronecker_quadratic` -- ``f(W) = ⟨W, H₀ W H₁⟩`` with
  ``H_i = Q_i diag(λ) Q_iᵀ``, ``λ_j = 10^{-s_j²}``, ``s_j`` evenly spaced on
  ``[0, √c]``, rescaled so that ``max λ = 10`` (docs/algorithms.md §2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.lru_cache(maxsize=None)
def _digits_data():
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def digits_params(seed=0, hidden=32):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {
      "w1": jax.random.normal(k1, (64, hidden)) / 8.0,
      "b1": jnp.zeros((hidden,)),
      "w2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
      "b2": jnp.zeros((10,)),
  }


def digits_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(tx, loss_fn, params, steps, *batch):
  """Full-batch training under one ``lax.scan``; returns the loss curve."""

  def step(carry, _):
    p, s = carry
    loss, g = jax.value_and_grad(loss_fn)(p, *batch)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), loss

  @jax.jit
  def run(p):
    (p, s), losses = jax.lax.scan(step, (p, tx.init(p)), None, length=steps)
    return losses, loss_fn(p, *batch), s

  return run(params)


def train_digits(tx, steps=200, seed=0):
  """(loss curve, final loss, final optimizer state) on the digits MLP."""
  x, y = _digits_data()
  return train(tx, digits_loss, digits_params(seed), steps, x, y)


def kronecker_quadratic(d, log10_condition, seed=0, dtype=np.float64):
  """``(H₀, H₁, W₀)`` of the ill-conditioned Kronecker quadratic."""
  rng = np.random.default_rng(seed)
  s = np.linspace(0.0, np.sqrt(log10_condition), d)
  lam = 10.0 ** (-s ** 2)
  lam = lam * 10.0 / lam.max()

  def factor():
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * lam) @ q.T

  return (factor().astype(dtype), factor().astype(dtype),
          rng.standard_normal((d, d)).astype(dtype))


def quadratic_loss(w, h0, h1):
  return jnp.sum(w * (h0 @ w @ h1))
