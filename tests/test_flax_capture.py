"""K-FAC statistics capture for Flax NNX and linen (kronopt.flax), §6.

The oracle for the statistics is a hand-written float64 numpy forward and
backward pass of a small tanh MLP (activations and the analytic output
gradients); for convolutions and DenseGeneral, the patches reproduce the
layer's output and ``Â Γ̂ᵀ`` is its gradient. Gradients are compared with
plain ``jax.grad`` / ``nnx.grad``.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import kronopt.flax
from kronopt.flax import _capture
from kronopt.preconditioners import kfac_layers

sys.path.insert(0, os.path.dirname(__file__))
from fast_jit import jit  # noqa: E402

B, D_IN, HIDDEN, CLASSES = 8, 5, 4, 3


def random_like(abstract, seed):
  """Random float32 arrays shaped like an abstract tree (no compilation:
  initialising the models eagerly or under jit costs seconds of XLA)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape) + (
          1.0 if s.ndim == 1 and s.shape[0] > 0 else 0.0), s.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape,
                                                             s.dtype),
      abstract)


def make_nnx(cls, seed):
  """An NNX model of ``cls`` with random parameters, built abstractly."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
  return nnx.merge(graphdef, random_like(state, seed))


def make_linen(model, x, seed):
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return random_like(abstract, seed)


def test_import_kronopt_does_not_import_flax():
  code = ("import sys, kronopt; "
          "bad = [m for m in sys.modules if m == 'flax' or "
          "m.startswith('flax.') or m.startswith('kronopt.flax')]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def batch(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((B, D_IN)).astype(np.float32),
          rng.integers(0, CLASSES, B))


def np_mlp_stats(w1, b1, w2, w3, b3, x, y):
  """float64 forward/backward of ``h = tanh(x W1 + b1)``,
  ``z = tanh(h W2)`` (no bias), ``logits = z W3 + b3``, mean cross-entropy.
  Returns ``{layer: (Â, Γ̂)}`` with ``Â = [x, 1]ᵀ/√B``, ``Γ̂ = √B ∂L/∂yᵀ``.
  """
  x = x.astype(np.float64)
  h = np.tanh(x @ w1 + b1)
  z = np.tanh(h @ w2)
  logits = z @ w3 + b3
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d3 = (p - np.eye(CLASSES)[y]) / B
  d2 = (d3 @ w3.T) * (1 - z ** 2)
  d1 = (d2 @ w2.T) * (1 - h ** 2)
  ones = np.ones((B, 1))
  r = np.sqrt(B)
  return {
      "l1": (np.hstack([x, ones]).T / r, d1.T * r),
      "l2": (h.T / r, d2.T * r),
      "l3": (np.hstack([z, ones]).T / r, d3.T * r),
  }


def assert_stats_close(stats, want, atol=1e-5):
  a, g = want
  np.testing.assert_allclose(np.asarray(stats.a), a, atol=atol)
  np.testing.assert_allclose(np.asarray(stats.g), g, atol=atol)


def assert_stats_are_gradient(params, layers, stats):
  """``Â Γ̂ᵀ`` is each registered layer's [kernel; bias] gradient block."""
  resolved = kfac_layers.resolve(params, layers)
  leaves = [x for _, x in kfac_layers.flat_params(params)]
  for layer, st in zip(resolved,
                       kfac_layers.align_stats(params, resolved, stats)):
    bias = None if layer.bias is None else leaves[layer.bias]
    block = np.asarray(kfac_layers.to_block(layer, leaves[layer.kernel],
                                            bias))
    got = np.asarray(st.a) @ np.asarray(st.g).T
    np.testing.assert_allclose(got, block, atol=1e-6 * np.abs(block).max()
                               + 1e-8, err_msg=str(layer.key))


# --- NNX ---------------------------------------------------------------------


class NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
    self.l2 = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=rngs)
    self.l3 = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def nnx_loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_mlp_statistics_match_hand_written_backprop():
  model = make_nnx(NnxMlp, 0)
  capture = kronopt.flax.nnx.KFACCapture(model)
  x, y = batch()

  @nnx.jit
  def both(m, x, y):
    return (capture.value_grad_and_stats(nnx_loss, m, x, y),
            nnx.value_and_grad(nnx_loss)(m, x, y))

  (loss, grads, stats), (ref_loss, ref_grads) = both(model, x, y)
  p = lambda v: np.asarray(v[...], np.float64)
  want = np_mlp_stats(p(model.l1.kernel), p(model.l1.bias), p(model.l2.kernel),
                      p(model.l3.kernel), p(model.l3.bias), x, y)
  for name in ("l1", "l2", "l3"):
    assert_stats_close(stats[name]["kernel"], want[name])
    assert stats[name].get("bias") is None
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      nnx.as_pure(grads), nnx.as_pure(ref_grads))
  specs = capture.layers
  assert specs["l1"]["kernel"] == kfac_layers.dense("bias")
  assert specs["l2"]["kernel"] == kfac_layers.dense(None)
  assert specs["l1"]["bias"] is None


class NnxMixed(nnx.Module):
  """Conv, LinearGeneral, a shared Linear called twice, BatchNorm, and a
  grouped conv (not registered)."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.grouped = nnx.Conv(4, 4, (1, 1), feature_group_count=2, rngs=rngs)
    self.general = nnx.LinearGeneral((3, 4), (2,), axis=(-2, -1), rngs=rngs)
    self.shared = nnx.Linear(3, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.out = nnx.Linear(6, CLASSES, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.grouped(self.conv(x)))      # [B, 3, 3, 4]
    h = self.general(h).reshape(x.shape[0], -1)      # [B, 6]
    h = jnp.concatenate([self.shared(h[:, :3]), self.shared(h[:, 3:])], -1)
    return self.out(jnp.tanh(self.bn(h)))


def test_nnx_conv_general_shared_and_batch_stats():
  model = make_nnx(NnxMixed, 1)
  twin = make_nnx(NnxMixed, 1)
  capture = kronopt.flax.nnx.KFACCapture(model)
  assert [e.key for e in capture.entries] == [
      ("conv", "kernel"), ("general", "kernel"), ("out", "kernel"),
      ("shared", "kernel")]
  assert capture.skipped == ((("grouped",), "Conv with feature_group_count "
                              "!= 1"),)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((B, 6, 6, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, B))

  def loss_aux(m, x, y):
    logits = m(x)
    return nnx_loss_from_logits(logits, y), logits

  @nnx.jit
  def both(m, twin, x, y):
    return (capture.value_grad_and_stats(loss_aux, m, x, y, has_aux=True),
            nnx.value_and_grad(loss_aux, has_aux=True)(twin, x, y))

  ((loss, logits), grads, stats), ((ref_loss, ref_logits), ref_grads) = (
      both(model, twin, x, y))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      nnx.as_pure(grads), nnx.as_pure(ref_grads))
  # Batch statistics were updated in place, as nnx.value_and_grad does.
  np.testing.assert_allclose(model.bn.mean[...], twin.bn.mean[...],
                             rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(model.bn.mean[...]).max()) > 0
  assert type(model.conv) is nnx.Conv  # the model's layers are untouched
  assert_stats_are_gradient(nnx.as_pure(grads), capture.layers, stats)
  assert stats["conv"]["kernel"].a.shape == (3 * 3 * 3 + 1, B * 3 * 3)
  assert stats["general"]["kernel"].a.shape == (3 * 4 + 1, B * 3)
  assert stats["shared"]["kernel"].a.shape == (3 + 1, 2 * B)
  assert stats["grouped"]["kernel"] is None


def nnx_loss_from_logits(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --- linen --------------------------------------------------------------------


class LinenMlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(HIDDEN, name="l1")(x))
    z = jnp.tanh(nn.Dense(HIDDEN, use_bias=False, name="l2")(h))
    return nn.Dense(CLASSES, name="l3")(z)


def test_linen_mlp_statistics_match_hand_written_backprop():
  model = LinenMlp()
  x, y = batch(3)
  params = make_linen(model, x, 0)
  capture = kronopt.flax.linen.KFACCapture(model, {"params": params}, x)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  (loss, grads, stats), (ref_loss, ref_grads) = jit(
      lambda p: (capture.value_grad_and_stats(loss_fn, p, x, y),
                 jax.value_and_grad(loss_fn)(p, x, y)))(params)
  p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()}
       for k, d in params.items()}
  want = np_mlp_stats(p["l1"]["kernel"], p["l1"]["bias"], p["l2"]["kernel"],
                      p["l3"]["kernel"], p["l3"]["bias"], x, y)
  for name in ("l1", "l2", "l3"):
    assert_stats_close(stats[name]["kernel"], want[name])
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      grads, ref_grads)
  assert capture.layers["l3"]["kernel"] == kfac_layers.dense("bias")
  assert capture.layers["l3"]["bias"] is None


CONVS = {
    "same_stride2": dict(kernel_size=(3, 3), strides=2, padding="SAME"),
    "valid_dilated": dict(kernel_size=(2, 3), padding="VALID",
                          kernel_dilation=(2, 1)),
    "circular": dict(kernel_size=(3, 3), padding="CIRCULAR"),
    "explicit_input_dilation": dict(kernel_size=(2, 2),
                                    padding=((1, 0), (0, 2)),
                                    input_dilation=2),
}


class LinenConvNet(nn.Module):
  """One branch per padding/stride/dilation variant, then a DenseGeneral
  over (width, channels) and a Dense."""

  @nn.compact
  def __call__(self, x):
    outs = []
    for name in sorted(CONVS):
      h = nn.relu(nn.Conv(2, name=name, **CONVS[name])(x))
      h = nn.DenseGeneral(2, axis=(-2, -1), name=name + "_general")(h)
      outs.append(h.reshape(x.shape[0], -1))
    return nn.Dense(CLASSES, name="out")(jnp.concatenate(outs, -1))


def test_linen_conv_patches_reproduce_the_layer_and_its_gradient():
  model = LinenConvNet()
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, 2))
  params = make_linen(model, x, 1)
  capture = kronopt.flax.linen.KFACCapture(model, {"params": params}, x)
  entries = {e.key[0]: e for e in capture.entries}
  assert sorted(entries) == sorted(
      ["out"] + list(CONVS) + [n + "_general" for n in CONVS])
  assert capture.layers["circular"]["kernel"] == kfac_layers.conv(2, "bias")
  assert capture.layers["circular_general"]["kernel"] == (
      kfac_layers.dense_general(2, 1, "bias"))

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def run(p):
    # The patches times the matricised kernel are each convolution.
    recon = {}
    for name in CONVS:
      out = nn.Conv(2, **CONVS[name]).apply({"params": p[name]}, x)
      rows, _ = entries[name].rows(x, out)
      k = jnp.reshape(p[name]["kernel"], (-1, 2))
      recon[name] = (rows @ k + p[name]["bias"], jnp.reshape(out, (-1, 2)))
    return recon, capture.value_grad_and_stats(loss_fn, p, x, y)

  recon, (_, grads, stats) = run(params)
  for name, (got, want) in recon.items():
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
  assert_stats_are_gradient(grads, capture.layers, stats)


def test_conv_rows_handle_unbatched_and_extra_batch_axes():
  rows = jit(_capture.conv_rows((2, 2), padding="SAME"))
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, 4, 4, 2)),
                  jnp.float32)
  dy = jnp.zeros((2, 3, 4, 4, 1))
  flat, _ = rows(x, dy)
  single, _ = rows(x[0, 0], dy[0, 0])
  assert flat.shape == (2 * 3 * 16, 8)
  np.testing.assert_array_equal(np.asarray(single), np.asarray(flat[:16]))


# --- complete training steps (the examples of kronopt.flax.nnx / .linen) ----


def test_nnx_training_step_example():
  model = make_nnx(NnxMlp, 5)
  capture = kronopt.flax.nnx.KFACCapture(model)
  optimizer = nnx.Optimizer(
      model, kronopt.kfac(1e-2, layers=capture.layers), wrt=nnx.Param)

  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, stats = capture.value_grad_and_stats(loss_fn, model, x, y)
    optimizer.update(model, grads, kfac_stats=stats)
    return loss

  x, y = batch(6)
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(6)]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  diag = kronopt.diagnostics(optimizer.opt_state)
  assert bool(diag["preconditioned"]) and int(diag["count"]) == 6


def test_linen_training_step_example():
  model = LinenMlp()
  x, y = batch(7)
  variables = {"params": make_linen(model, x, 8)}
  capture = kronopt.flax.linen.KFACCapture(model, variables, x)
  tx = kronopt.kfac(1e-2, layers=capture.layers)
  params = variables["params"]
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jit  # jax.jit with cheap compile options (tests/fast_jit.py)
  def train_step(params, opt_state, x, y):
    loss, grads, stats = capture.value_grad_and_stats(loss_fn, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   kfac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(6):
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(float(loss))
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert bool(kronopt.diagnostics(opt_state)["preconditioned"])
