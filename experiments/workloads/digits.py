"""An MLP on scikit-learn's bundled 8x8 handwritten digits (no download).

1797 images of 64 pixels, 10 classes; a fixed stratified train/test split,
pixels standardized with the training set's statistics. Training is
full-batch, so a run is a deterministic function of the optimizer and seed.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets
from sklearn import model_selection
from sklearn import preprocessing


class Data(NamedTuple):
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array


class TrainResult(NamedTuple):
  """What :func:`train` returns.

  Attributes:
    losses: training-set loss before each step, then after the last one
      (``steps + 1`` floats).
    test_accuracy: accuracy of the final parameters on the test set.
    wall_time: seconds for the whole run, compilation included.
    params: the final parameters.
  """
  losses: np.ndarray
  test_accuracy: float
  wall_time: float
  params: optax.Params


def load(test_size: float = 0.25, seed: int = 0) -> Data:
  """The standardized digits, split once with ``seed``."""
  x, y = datasets.load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x, y, test_size=test_size, random_state=seed, stratify=y)
  scaler = preprocessing.StandardScaler().fit(x_tr)
  f32 = lambda a: jnp.asarray(scaler.transform(a), jnp.float32)
  return Data(f32(x_tr), jnp.asarray(y_tr), f32(x_te), jnp.asarray(y_te))


class MLP(nn.Module):
  """ReLU layers of widths ``hidden``, then a linear layer to the logits."""
  hidden: Sequence[int] = (128, 128)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def loss_fn(model: nn.Module, params, x, y) -> jax.Array:
  """Mean softmax cross-entropy."""
  logits = model.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(model: nn.Module, params, x, y) -> jax.Array:
  return jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == y)


def train(tx: optax.GradientTransformation, steps: int, *,
          data: Optional[Data] = None, hidden: Sequence[int] = (128, 128),
          seed: int = 0) -> TrainResult:
  """Trains the MLP full-batch for ``steps`` steps of ``tx`` from a fixed init.

  Args:
    tx: the optimizer.
    steps: number of updates.
    data: the data set; :func:`load` by default.
    hidden: widths of the hidden layers.
    seed: seed of the parameter initialization.

  Returns:
    A :class:`TrainResult`.
  """
  data = load() if data is None else data
  model = MLP(hidden=tuple(hidden))
  loss = lambda p: loss_fn(model, p, data.x_train, data.y_train)

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  start = time.perf_counter()
  params = model.init(jax.random.PRNGKey(seed), data.x_train[:1])
  opt_state = tx.init(params)
  losses = []
  for _ in range(steps):
    params, opt_state, value = step(params, opt_state)
    losses.append(value)
  losses.append(jax.jit(loss)(params))
  losses = np.asarray(jax.device_get(losses), np.float64)
  wall_time = time.perf_counter() - start
  test_acc = accuracy(model, params, data.x_test, data.y_test)
  return TrainResult(losses, float(test_acc), wall_time, params)
