"""KrADagrad★ and KrADagrad (ALGORITHMS.md §2, §7.4).

* a dense float64 numpy oracle of both variants (its own blocking, padding,
  axis schedule and roots) against the transform, step by step;
* the approximation-domination property of the single step;
* the float32 claim on the ill-conditioned Kronecker quadratic;
* a small digits MLP, against optax.adam.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import kronopt
from kronopt.preconditioners import kradagrad as krad
from tests import problems

# ---------------------------------------------------------------------------
# Dense float64 oracle.


def _unfold(g, axis):
  return np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)


def _mode_product(g, m, axis):
  return np.moveaxis(np.tensordot(m, g, axes=([1], [axis])), 0, axis)


def _sym_power(x, power):
  lam, q = np.linalg.eigh((x + x.T) / 2)
  return (q * (np.maximum(lam, 0.0) + 1e-8) ** power) @ q.T


def oracle_star_step(x, m, b2=1.0):
  x = x / b2 if b2 < 1 else x
  c = np.trace(m @ x)
  x = x - x @ m @ x / (x.shape[0] * (1.0 + c))
  return (x + x.T) / 2


def oracle_single_axis_step(x, m, b2=1.0, eps=0.0):
  x = x / b2 if b2 < 1 else x
  x = x - eps * x @ x.T
  x = x - x @ m @ x / (1.0 + np.linalg.norm(x @ m))
  return (x + x.T) / 2


def oracle_axis(s, shape):
  k = len(shape)
  if s < k * k:
    return s % k
  e = s - math.isqrt(s) ** 2
  return e if e < k else int(np.argmax(shape))


class BlockOracle:
  """One block's KrAD state, in float64."""

  def __init__(self, shape, variant, eps, b2):
    self.variant, self.eps, self.b2 = variant, eps, b2
    x0 = 1.0 / eps if variant == "star" else 1.0
    self.x = [x0 * np.eye(d) for d in shape]
    self.p = [np.eye(d) for d in shape]

  def update(self, g, s):
    if self.variant == "star":
      self.x = [oracle_star_step(x, _unfold(g, i) @ _unfold(g, i).T, self.b2)
                for i, x in enumerate(self.x)]
      return
    i = oracle_axis(s, g.shape)
    gh = g
    for j, p in enumerate(self.p):
      if j != i:
        gh = _mode_product(gh, p, j)
    m = _unfold(gh, i) @ _unfold(gh, i).T
    self.x[i] = oracle_single_axis_step(self.x[i], m, self.b2, self.eps)

  def refresh(self):
    k = len(self.x)
    power = 1.0 / (2 * k) if self.variant == "star" else 0.5
    self.p = [_sym_power(x, power) for x in self.x]

  def direction(self, g):
    for i, p in enumerate(self.p):
      g = _mode_product(g, p, i)
    return g


class KradOracle:
  """scale_by_kradagrad on {name: array} gradients whose shapes need no merge."""

  def __init__(self, shapes, block_size, variant, eps, b2, every, start):
    self.b, self.every, self.start, self.count = block_size, every, start, 0
    self.blocks = {}
    for name, shape in shapes.items():
      if len(shape) < 2:
        continue
      grid = [-(-d // block_size) for d in shape]
      bshape = tuple(min(block_size, d) for d in shape)
      for idx in np.ndindex(*grid):
        self.blocks[name, idx] = BlockOracle(bshape, variant, eps, b2)

  def _block(self, g, idx):
    b = self.b
    sl = tuple(slice(i * b, (i + 1) * b) for i in idx)
    piece = g[sl]
    full = np.zeros(tuple(min(b, d) for d in g.shape))
    full[tuple(slice(0, s) for s in piece.shape)] = piece
    return full, sl, piece.shape

  def update(self, grads):
    finite = all(np.all(np.isfinite(g)) for g in grads.values())
    s = self.count
    self.count += int(finite)  # a skipped step does not count
    if finite:
      for (name, idx), blk in self.blocks.items():
        blk.update(self._block(grads[name], idx)[0], s)
    if finite and s >= self.start and (s - self.start) % self.every == 0:
      for blk in self.blocks.values():
        blk.refresh()
    if not finite:
      return {k: np.zeros_like(g) for k, g in grads.items()}
    out = {k: np.array(g, np.float64) for k, g in grads.items()}
    if s < self.start:
      return out
    for (name, idx), blk in self.blocks.items():
      full, sl, shape = self._block(grads[name], idx)
      d = blk.direction(full)
      out[name][sl] = d[tuple(slice(0, n) for n in shape)]
    return out


# block_size 5: (6, 10) is split and padded, (3, 5, 7) is an order-3 block
# split and padded along its last axis, (4, 5) is one unpadded block and the
# bias is passed through. None of them merges dimensions.
ORACLE_SHAPES = {"a": (6, 10), "b": (3, 5, 7), "c": (4, 5), "bias": (7,)}
ORACLE_STEPS = 14  # past k² for k = 2 and k = 3: the late axis schedule too
NAN_STEP = 5


def _oracle_grads(t):
  rng = np.random.default_rng(t)
  g = {k: rng.standard_normal(s) for k, s in ORACLE_SHAPES.items()}
  if t == NAN_STEP:
    g["a"][1, 2] = np.nan
  return g


@pytest.mark.parametrize("variant,eps", [("star", 0.1),
                                         ("single_axis", 0.01)])
def test_matches_float64_oracle(variant, eps):
  kw = dict(block_size=5, b2=0.9, precondition_every=2,
            start_preconditioning_step=1)
  tx = kronopt.scale_by_kradagrad(variant=variant, epsilon=eps, **kw)
  oracle = KradOracle(ORACLE_SHAPES, 5, variant, eps, 0.9, 2, 1)
  update = jax.jit(tx.update)
  state = tx.init({k: jnp.zeros(s) for k, s in ORACLE_SHAPES.items()})
  init_structure = jax.tree_util.tree_structure(state)
  init_leaves = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)]
  for t in range(ORACLE_STEPS):
    g = _oracle_grads(t)
    out, state = update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()},
                        state)
    expected = oracle.update(g)
    for k in ORACLE_SHAPES:
      err = np.linalg.norm(np.asarray(out[k], np.float64) - expected[k])
      scale = max(np.linalg.norm(expected[k]), 1e-30)
      assert err <= 2e-5 * scale or (t == NAN_STEP and err == 0.0), (t, k, err)
  assert jax.tree_util.tree_structure(state) == init_structure
  assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)] == \
      init_leaves
  assert int(state.skipped) == 1 and int(state.failures) == 0


def test_axis_schedule_and_isqrt():
  counts = np.concatenate([np.arange(300),
                           [2**31 - 1, 46340**2 - 1, 46340**2, 46340**2 + 1]])
  for shape in [(5, 5), (3, 5, 5), (4, 7), (6, 2, 6)]:
    got = np.asarray(krad.single_axis_schedule(jnp.asarray(counts, jnp.int32),
                                               shape))
    want = [oracle_axis(int(s), shape) for s in counts]
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(
      np.asarray(krad.isqrt(jnp.asarray(counts, jnp.int32))),
      [math.isqrt(int(s)) for s in counts])


# ---------------------------------------------------------------------------
# §7.4: (X⁻¹ + M)⁻¹ ⪯ X' ⪯ X and X' ≻ 0.


def _gen_eigs(a, b):
  """Eigenvalues of ``a v = λ b v`` (b ≻ 0): all ≤ 1 iff ``a ⪯ b``."""
  return scipy.linalg.eigh(a, b, eigvals_only=True)


def _domination_cases():
  rng = np.random.default_rng(0)
  for d, rank in [(6, 1), (6, 3), (9, 9)]:
    for _ in range(3):
      q, _ = np.linalg.qr(rng.standard_normal((d, d)))
      x = (q * 10.0 ** rng.uniform(-1, 1, d)) @ q.T
      g = rng.standard_normal((d, rank)) * 10.0 ** rng.uniform(-1, 1)
      yield x, g @ g.T, False
    # M = s v vᵀ with X v = λ v: then ‖XM‖_F = λ_max(XM) = tr(XM).
    v = q[:, :1] * 10.0 ** rng.uniform(-1, 1)
    yield x, v @ v.T, True


@pytest.mark.parametrize("variant", ["star", "single_axis"])
def test_domination_property(variant):
  oracle_step = (oracle_star_step if variant == "star"
                 else oracle_single_axis_step)
  step = jax.jit(krad.star_step if variant == "star"
                 else krad.single_axis_step)
  for x, m, aligned in _domination_cases():
    lower = np.linalg.inv(np.linalg.inv(x) + m)
    x64 = oracle_step(x, m)
    x32 = np.asarray(step(jnp.asarray(x[None], jnp.float32),
                          jnp.asarray(m[None], jnp.float32))[0], np.float64)
    for new, tol in [(x64, 1e-9), (x32, 1e-4)]:
      assert np.max(_gen_eigs(new, x)) <= 1 + tol          # X' ⪯ X
      assert np.max(_gen_eigs(lower, new)) <= 1 + tol      # (X⁻¹+M)⁻¹ ⪯ X'
      assert np.min(np.linalg.eigvalsh(new)) > 0           # X' ≻ 0
      if variant == "single_axis" and aligned:  # Sherman–Morrison: exact
        np.testing.assert_allclose(_gen_eigs(lower, new), 1.0, atol=10 * tol)
    # The step is not the identity: X' is strictly below X along M's range.
    assert np.min(_gen_eigs(x64, x)) < 1 - 1e-3


# ---------------------------------------------------------------------------
# The float32 claim (ALGORITHMS §2) at small scale: d = 32, β₂ = 1, roots
# every 3 steps, ε = 1e-8, SGD-norm grafting, 250 steps.

CLAIM = dict(d=32, steps=250, every=3, eps=1e-8, lr=1e-2)


def _claim_tx(direction):
  return optax.chain(kronopt.graft(direction, "sgd"),
                     optax.scale(-CLAIM["lr"]))


@pytest.fixture(scope="module")
def claim_runs():
  """Per log10 condition: kronopt float32 and numpy float64 final losses."""
  kw = dict(block_size=CLAIM["d"], b2=1.0, epsilon=CLAIM["eps"],
            precondition_every=CLAIM["every"], start_preconditioning_step=0)
  runners = {
      "kradagrad": _quadratic_runner(_claim_tx(
          kronopt.scale_by_kradagrad(variant="star", **kw))),
      "shampoo": _quadratic_runner(_claim_tx(
          kronopt.scale_by_shampoo(relative_epsilon=False, **kw))),
  }
  out = {}
  for c in (4, 8):
    h0, h1, w0 = problems.kronecker_quadratic(CLAIM["d"], c, seed=0)
    out[c] = {"init": float(np.sum(w0 * (h0 @ w0 @ h1)))}
    for name, runner in runners.items():
      loss, state = runner(*(jnp.asarray(a, jnp.float32) for a in (w0, h0, h1)))
      out[c][name + "32"] = (float(loss),
                             int(kronopt.diagnostics(state)["refresh_failures"]))
      out[c][name + "64"] = _numpy_quadratic(name, h0, h1, w0)
  return out


def _quadratic_runner(tx):
  def step(carry, _, h0, h1):
    w, s = carry
    g = jax.grad(problems.quadratic_loss)(w, h0, h1)
    u, s = tx.update(g, s, w)
    return (w + u, s), None

  @jax.jit
  def run(w, h0, h1):
    (w, s), _ = jax.lax.scan(lambda c, x: step(c, x, h0, h1),
                             (w, tx.init(w)), None, length=CLAIM["steps"])
    return problems.quadratic_loss(w, h0, h1), s
  return run


def _numpy_quadratic(name, h0, h1, w):
  """Final loss and rejected roots of the float64 run (KrAD★ or Shampoo)."""
  d, eps = w.shape[0], CLAIM["eps"]
  if name == "kradagrad":
    stats = [np.eye(d) / eps, np.eye(d) / eps]
  else:
    stats = [np.zeros((d, d)), np.zeros((d, d))]
  roots, failures = [np.eye(d), np.eye(d)], 0
  for t in range(CLAIM["steps"]):
    g = 2 * h0 @ w @ h1
    grams = [g @ g.T, g.T @ g]
    if name == "kradagrad":
      stats = [oracle_star_step(x, m) for x, m in zip(stats, grams)]
    else:
      stats = [s + m for s, m in zip(stats, grams)]
    if t % CLAIM["every"] == 0:
      for i, s in enumerate(stats):
        lam, q = np.linalg.eigh(s)
        if name == "kradagrad":
          root = (q * (np.maximum(lam, 0) + 1e-8) ** 0.25) @ q.T
        else:
          with np.errstate(invalid="ignore"):
            root = (q * (lam + eps) ** -0.25) @ q.T
        ok = np.all(np.isfinite(root))
        roots[i], failures = (root if ok else roots[i]), failures + (not ok)
    dirn = roots[0] @ g @ roots[1]
    w = w - CLAIM["lr"] * dirn * np.linalg.norm(g) / np.linalg.norm(dirn)
  return float(np.sum(w * (h0 @ w @ h1))), failures


@pytest.mark.parametrize("c", [4, 8])
def test_float32_claim_kradagrad_star_matches_float64(claim_runs, c):
  r = claim_runs[c]
  loss32, _ = r["kradagrad32"]
  loss64, failures64 = r["kradagrad64"]
  assert failures64 == 0 and loss64 < 0.01 * r["init"]
  assert np.isfinite(loss32)
  assert abs(loss32 - loss64) <= 0.05 * loss64, (loss32, loss64)


@pytest.mark.parametrize("c", [4, 8])
def test_float32_claim_shampoo_breaks_in_float32(claim_runs, c):
  r = claim_runs[c]
  loss64, failures64 = r["shampoo64"]
  loss32, failures32 = r["shampoo32"]
  assert failures64 == 0 and loss64 < 0.01 * r["init"]     # converges in f64
  assert not np.isfinite(loss32) or failures32 > 0          # breaks in f32


# ---------------------------------------------------------------------------
# Training and contracts.


# Learning rates tuned on the grid {1e-2, 3e-2, 1e-1, 3e-1} at 200 full-batch
# steps: adam is best at 1e-1 (final loss ≈ 2.8e-4; 3e-2: 1.4e-3, 3e-1:
# 3.9e-4); kradagrad (Adam grafting, Nesterov momentum) reaches ≈ 6e-6 at 1e-1.
DIGITS_STEPS = 200


@pytest.fixture(scope="module")
def adam_digits_loss():
  return float(problems.train_digits(optax.adam(1e-1), DIGITS_STEPS)[1])


@pytest.mark.parametrize("variant", ["star", "single_axis"])
def test_digits_mlp_beats_adam(adam_digits_loss, variant):
  tx = kronopt.kradagrad(1e-1, variant=variant, block_size=64,
                         precondition_every=5, start_preconditioning_step=1)
  _, loss, state = problems.train_digits(tx, DIGITS_STEPS)
  assert int(kronopt.diagnostics(state)["refresh_failures"]) == 0
  assert float(loss) < 0.1 * adam_digits_loss, (float(loss), adam_digits_loss)


@pytest.mark.parametrize("kwargs,name", [
    (dict(variant="both"), "variant"),
    (dict(b2=0.0), "b2"),
    (dict(b2=1.5), "b2"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(variant="single_axis", epsilon=1.0), "epsilon"),
    (dict(block_size=1), "block_size"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(inverse_failure_threshold=0.0), "inverse_failure_threshold"),
])
def test_invalid_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    kronopt.scale_by_kradagrad(**kwargs)
  with pytest.raises(ValueError, match=name):
    kronopt.kradagrad(1e-3, **kwargs)
