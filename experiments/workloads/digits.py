"""Workloads on scikit-learn's bundled 8×8 handwritten digits (no download).

1797 images of 64 pixels, 10 classes; one fixed stratified split into
training and held-out sets. Minibatches are drawn uniformly with replacement
from the training set, on device.

* :func:`mlp`: ReLU MLP classifier on standardized pixels.
* :func:`cnn`: two 3×3 ReLU convolutions, 2×2 average pooling and a dense
  layer, on the standardized 8×8×1 image.
* :func:`autoencoder`: ``64 → 32 → 16 → 32 → 64`` with tanh hidden layers,
  a linear code and a sigmoid output, trained on the pixels scaled to
  ``[0, 1]`` with the binary cross-entropy summed over pixels (the deep
  autoencoder of Hinton & Salakhutdinov 2006, which KrADagrad (Mei et al.
  2023) and the K-FAC papers train on MNIST, scaled to 8×8).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn import datasets
from sklearn import model_selection

from experiments.workloads import base

PIXELS, CLASSES = 64, 10


def load(test_size: float = 0.25, seed: int = 0):
  """``(x_train, y_train, x_test, y_test)``: pixels in ``[0, 16]``, float32."""
  x, y = datasets.load_digits(return_X_y=True)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x.astype(np.float32), y.astype(np.int32), test_size=test_size,
      random_state=seed, stratify=y)
  return x_tr, y_tr, x_te, y_te


def standardize(x_train, x_test):
  """Both sets standardized with the training set's per-pixel statistics."""
  mean, std = x_train.mean(0), x_train.std(0)
  std = np.where(std > 0, std, 1.0)
  return (x_train - mean) / std, (x_test - mean) / std


class MLP(nnx.Module):
  """ReLU layers of widths ``hidden``, then a linear layer to the logits."""

  def __init__(self, hidden: Sequence[int], *, rngs: nnx.Rngs):
    widths = (PIXELS, *hidden)
    self.hidden = nnx.List([nnx.Linear(m, n, rngs=rngs)
                            for m, n in zip(widths[:-1], widths[1:])])
    self.out = nnx.Linear(widths[-1], CLASSES, rngs=rngs)

  def __call__(self, x):
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.out(x)


class CNN(nnx.Module):
  """``[B, 64]`` → 8×8×1 → conv3×3 → ReLU → conv3×3 → ReLU → avg-pool 2×2
  → dense to the logits."""

  def __init__(self, channels: Sequence[int], *, rngs: nnx.Rngs):
    c1, c2 = channels
    self.conv1 = nnx.Conv(1, c1, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (3, 3), rngs=rngs)
    self.out = nnx.Linear(4 * 4 * c2, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(*x.shape[:-1], 8, 8, 1)
    x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
    x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    return self.out(x.reshape(*x.shape[:-3], -1))


class Autoencoder(nnx.Module):
  """``64 → widths → 64``: tanh hidden layers, a linear code (the middle
  width), output logits (the reconstruction is their sigmoid)."""

  def __init__(self, widths: Sequence[int], *, rngs: nnx.Rngs):
    if len(widths) % 2 != 1:
      raise ValueError(f"widths={tuple(widths)} must have an odd length (a "
                       "code layer in the middle).")
    dims = (PIXELS, *widths, PIXELS)
    self.layers = nnx.List([nnx.Linear(m, n, rngs=rngs)
                            for m, n in zip(dims[:-1], dims[1:])])
    self.code = len(widths) // 2  # index of the layer producing the code

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i != self.code and i != len(self.layers) - 1:
        x = jnp.tanh(x)
    return x


@base.register
class DigitsClassifier(base.Workload):
  """Softmax cross-entropy of an NNX classifier on standardized digits."""
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  model: base.Model = base.static()
  graphdef: nnx.GraphDef = base.static()
  batch_size: int = base.static()

  def init(self, key):
    return self.model.init(key)

  def batch(self, key):
    return base.sample_rows(key, (self.x_train, self.y_train),
                            self.batch_size)

  def loss(self, params, batch):
    x, y = batch
    return base.classification_metrics(
        nnx.merge(self.graphdef, params)(x), y)["loss"]

  def evaluate(self, params):
    return base.classification_metrics(
        nnx.merge(self.graphdef, params)(self.x_test), self.y_test)


@base.register
class DigitsAutoencoder(base.Workload):
  """Binary cross-entropy (summed over pixels, mean over images) of the
  reconstruction of pixels in ``[0, 1]``."""
  x_train: jax.Array
  x_test: jax.Array
  model: base.Model = base.static()
  graphdef: nnx.GraphDef = base.static()
  batch_size: int = base.static()

  def init(self, key):
    return self.model.init(key)

  def batch(self, key):
    return base.sample_rows(key, self.x_train, self.batch_size)

  def loss(self, params, batch):
    return self._metrics(params, batch)["loss"]

  def evaluate(self, params):
    return self._metrics(params, self.x_test)

  def _metrics(self, params, x):
    logits = nnx.merge(self.graphdef, params)(x)
    bce = optax.sigmoid_binary_cross_entropy(logits, x).sum(-1)
    return {"loss": jnp.mean(bce),
            "mse": jnp.mean((jax.nn.sigmoid(logits) - x) ** 2)}


def _classifier(model, batch_size, test_size, split_seed):
  x_tr, y_tr, x_te, y_te = load(test_size, split_seed)
  x_tr, x_te = standardize(x_tr, x_te)
  return DigitsClassifier(jnp.asarray(x_tr), jnp.asarray(y_tr),
                          jnp.asarray(x_te), jnp.asarray(y_te), model,
                          model.graphdef(), batch_size)


def mlp(hidden: Sequence[int] = (128, 128), batch_size: int = 128,
        test_size: float = 0.25, split_seed: int = 0) -> DigitsClassifier:
  """The digits MLP ``64 → hidden → 10`` (ReLU)."""
  return _classifier(base.model(MLP, tuple(hidden)), batch_size, test_size,
                     split_seed)


def cnn(channels: Sequence[int] = (16, 32), batch_size: int = 128,
        test_size: float = 0.25, split_seed: int = 0) -> DigitsClassifier:
  """The digits CNN: two 3×3 convolutions of ``channels``, pool, dense."""
  if len(channels) != 2:
    raise ValueError(f"channels={tuple(channels)} must be two widths.")
  return _classifier(base.model(CNN, tuple(channels)), batch_size,
                     test_size, split_seed)


def autoencoder(widths: Sequence[int] = (32, 16, 32), batch_size: int = 128,
                test_size: float = 0.25, split_seed: int = 0
                ) -> DigitsAutoencoder:
  """The digits autoencoder ``64 → widths → 64``."""
  x_tr, _, x_te, _ = load(test_size, split_seed)
  model = base.model(Autoencoder, tuple(widths))
  return DigitsAutoencoder(jnp.asarray(x_tr / 16.0), jnp.asarray(x_te / 16.0),
                           model, model.graphdef(), batch_size)
