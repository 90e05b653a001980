"""Workloads: data, models and metrics against numpy, and a few training
steps of each with optax.adamw, kronopt.shampoo and kronopt.sketchy.

The character LM's few steps with the three optimizers run in
tests/test_experiments.py, through the command line (one LM compilation per
optimizer for both files). No timings here.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import kronopt
from experiments import optimizers
from experiments import schedules
from experiments import train
from experiments.workloads import char_lm
from experiments.workloads import digits
from experiments.workloads import quadratic

STEPS, EVERY = 12, 6
# Optimizer, keywords, peak learning rate. Blocks of 16 keep every tiny
# model's layout to one or two stacked shapes (cheap to compile).
OPTIMIZERS = {
    "adamw": ({}, 1e-2),
    "shampoo": ({"block_size": 16, "precondition_every": 3,
                 "start_preconditioning_step": 1}, 1e-2),
    "sketchy": ({"block_size": 16, "rank": 4,
                 "start_preconditioning_step": 1}, 1e-2),
}
TINY = {
    "digits_mlp": lambda: digits.mlp(hidden=(16,), batch_size=32),
    "digits_cnn": lambda: digits.cnn(channels=(4, 4), batch_size=32),
    "digits_autoencoder": lambda: digits.autoencoder(widths=(16, 16, 16),
                                                     batch_size=32),
    "kronecker_quadratic": lambda: quadratic.make(d=16, c=2.0),
}


@pytest.fixture(scope="module")
def tiny_lm():
  return char_lm.make(layers=1, d_model=16, heads=2, seq_len=16,
                      batch_size=4, mlp_ratio=1, eval_windows=8)


@pytest.fixture(scope="module")
def workload_cache():
  return {}


@jax.jit
def _logits(workload, params, tokens):
  return workload.logits(params, tokens)


@jax.jit
def _reconstruction_logits(workload, params, x):
  return nnx.merge(workload.graphdef, params)(x)


def _workload(name, cache):
  if name not in cache:
    cache[name] = TINY[name]()
  return cache[name]


def _train(workload, name):
  kwargs, lr = OPTIMIZERS[name]
  shape = schedules.unit(STEPS)
  trainer = train.Trainer(
      workload, lambda hp: optimizers.build_traced(name, kwargs, hp, shape),
      steps=STEPS, eval_every=EVERY, compiler_options=train.QUICK_COMPILE)
  return trainer.run(0, {"learning_rate": lr})


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("workload", list(TINY))
def test_few_steps(workload, optimizer, workload_cache):
  result = _train(_workload(workload, workload_cache), optimizer)
  assert len(result["train_loss"]) == STEPS
  assert np.all(np.isfinite(result["train_loss"]))
  assert not result["diverged"]
  val = result["eval"]["loss"]
  assert len(val) == STEPS // EVERY + 1 and np.all(np.isfinite(val))
  assert val[-1] < val[0]  # held-out loss goes down in 12 steps
  if optimizer != "adamw":
    assert result["diagnostics"]["refresh_failures"][-1] == 0
    assert result["diagnostics"]["preconditioned"][-1] == 1.0


def test_lm_parameters_have_users_shapes(tiny_lm):
  shapes = train.param_shapes(tiny_lm)
  vocab = len(set(char_lm.load_text()))
  block = "['blocks'][0]"
  for proj in ("query", "key", "value"):
    assert shapes[f"{block}['attn']['{proj}']['kernel']"] == [16, 2, 8]
  assert shapes[f"{block}['attn']['out']['kernel']"] == [2, 8, 16]
  assert shapes["['embed']['embedding']"] == [vocab, 16]
  assert shapes["['pos']['embedding']"] == [16, 16]
  assert shapes["['head']['kernel']"] == [16, vocab]  # untied
  for rank1 in ("['head']['bias']", f"{block}['fc1']['bias']",
                f"{block}['ln1']['scale']", f"{block}['ln2']['bias']"):
    assert len(shapes[rank1]) == 1
  params = train.init_params(tiny_lm, jax.random.PRNGKey(0))
  assert isinstance(params, nnx.State)
  # The optimizer sees the rank-3 kernels as they are (merged into blocks).
  layout = kronopt.make_layout(params, 16)
  assert (16, 2, 8) in [leaf.shape for leaf in layout.leaves if leaf]


def test_lm_data_split_and_batches(tiny_lm):
  ids, vocab = char_lm.encode(char_lm.load_text())
  assert "".join(vocab[i] for i in ids[:200]) == char_lm.load_text()[:200]
  n_train = tiny_lm.train_tokens.shape[0]
  assert n_train == round(0.9 * len(ids))
  np.testing.assert_array_equal(tiny_lm.train_tokens, ids[:n_train])
  # Every held-out window lies in the held-out tail of the text.
  val = ids[n_train:]
  for w in np.asarray(tiny_lm.val_windows):
    starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
        val, len(w)) == w, axis=1))
    assert starts.size > 0
  batch = tiny_lm.batch(jax.random.PRNGKey(1))
  assert batch.shape == (4, 17)
  for row in np.asarray(batch):  # a contiguous window of the training text
    windows = np.lib.stride_tricks.sliding_window_view(ids[:n_train], 17)
    assert np.any(np.all(windows == row, axis=1))


def test_lm_is_causal(tiny_lm):
  params = train.init_params(tiny_lm, jax.random.PRNGKey(0))
  tokens = tiny_lm.val_windows[:, :-1]
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 7)
  a, b = _logits(tiny_lm, params, tokens), _logits(tiny_lm, params, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert not np.allclose(a[:, 10:], b[:, 10:])


def test_lm_loss_is_next_character_cross_entropy(tiny_lm):
  params = train.init_params(tiny_lm, jax.random.PRNGKey(0))
  windows = np.asarray(tiny_lm.val_windows)
  logits = np.asarray(_logits(tiny_lm, params, windows[:, :-1]), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = windows[:, 1:]
  nll = -np.take_along_axis(logp, target[..., None], -1).mean()
  acc = np.mean(logits.argmax(-1) == target)
  metrics = train.evaluate(tiny_lm, params)
  np.testing.assert_allclose(metrics["loss"], nll, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], acc)
  np.testing.assert_allclose(metrics["bits_per_char"], nll / np.log(2),
                             rtol=1e-5)


def test_digits_split_and_standardization():
  x_tr, y_tr, x_te, y_te = digits.load()
  assert x_tr.shape == (1347, 64) and x_te.shape == (450, 64)
  assert set(np.unique(y_te)) == set(range(10))
  wl = digits.mlp(hidden=(16,), batch_size=32)
  np.testing.assert_allclose(np.asarray(wl.x_train).mean(0), 0, atol=1e-5)
  x, y = wl.batch(jax.random.PRNGKey(0))
  assert x.shape == (32, 64) and y.shape == (32,)
  ae = digits.autoencoder(batch_size=32)
  assert 0.0 <= float(ae.x_train.min()) and float(ae.x_train.max()) <= 1.0


def test_autoencoder_loss_is_summed_binary_cross_entropy(workload_cache):
  ae = _workload("digits_autoencoder", workload_cache)
  params = train.init_params(ae, jax.random.PRNGKey(0))
  x = np.asarray(ae.x_test, np.float64)
  z = np.asarray(_reconstruction_logits(ae, params, ae.x_test), np.float64)
  p = 1.0 / (1.0 + np.exp(-z))
  bce = -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(-1).mean()
  metrics = train.evaluate(ae, params)
  np.testing.assert_allclose(metrics["loss"], bce, rtol=1e-5)
  np.testing.assert_allclose(metrics["mse"], np.mean((p - x) ** 2),
                             rtol=1e-5)
  shapes = sorted(train.param_shapes(ae).values())
  assert shapes == sorted([[64, 16], [16], [16, 16], [16], [16, 16], [16],
                          [16, 64], [64]])


def test_cnn_parameters_are_conv_kernels(workload_cache):
  shapes = train.param_shapes(_workload("digits_cnn", workload_cache))
  assert sorted(shapes.values()) == sorted(
      [[3, 3, 1, 4], [4], [3, 3, 4, 4], [4], [64, 10], [10]])


def test_quadratic_against_numpy(workload_cache):
  wl = _workload("kronecker_quadratic", workload_cache)
  h0, h1 = np.asarray(wl.h0, np.float64), np.asarray(wl.h1, np.float64)
  for h in (h0, h1):  # symmetric, largest eigenvalue 10, condition 10^c
    lam = np.linalg.eigvalsh(h)
    np.testing.assert_allclose(h, h.T, atol=1e-6)
    np.testing.assert_allclose(lam.max(), 10.0, rtol=1e-5)
    np.testing.assert_allclose(lam.max() / lam.min(), 1e2, rtol=1e-3)
  params = wl.init(jax.random.PRNGKey(3))
  w = np.asarray(params["w"], np.float64)
  np.testing.assert_allclose(wl.loss(params, None),
                             np.sum(w * (h0 @ w @ h1)), rtol=1e-5)
  grad = jax.grad(wl.loss)(params, None)["w"]
  np.testing.assert_allclose(grad, 2 * h0 @ w @ h1, rtol=1e-4, atol=1e-4)
  assert wl.batch(jax.random.PRNGKey(0)) is None
  assert set(wl.evaluate(params)) == {"loss"}


def test_constructors_reject_bad_arguments():
  with pytest.raises(ValueError, match="d_model=10"):
    char_lm.make(d_model=10, heads=4)
  with pytest.raises(ValueError, match="val_fraction"):
    char_lm.make(val_fraction=1.5)
  with pytest.raises(ValueError, match="widths"):
    digits.autoencoder(widths=(16, 8))
  with pytest.raises(ValueError, match="channels"):
    digits.cnn(channels=(4,))
  with pytest.raises(ValueError, match="c=0"):
    quadratic.make(c=0)
