"""Sketchy (docs/algorithms.md §5): dense float64 oracle, §7.6, memory,
extreme gradients, training."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronopt
from kronopt import layout
from kronopt.linalg import sketch as sketch_lib

# Parameters whose merged shapes equal their shapes (no merging), so that the
# oracle's blocking is plain zero-padding: w is cut into 6×6 blocks (padded),
# t into 3×4×6 blocks (padded), b is not preconditioned.
PARAMS = {"b": (7,), "t": (3, 4, 8), "w": (10, 7)}
BLOCK = 6
STEPS = 5


def grads_at(step):
  rng = np.random.default_rng(10 + step)
  return {k: rng.standard_normal(s) * np.linspace(2.0, 0.3, s[-1])
          for k, s in PARAMS.items()}


def as_jax(tree):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)


def zeros_params():
  return {k: jnp.zeros(s, jnp.float32) for k, s in PARAMS.items()}


# ---------------------------------------------------------------- the oracle


def np_blocks(x, bs):
  """Zero-padded blocks of ``x`` keyed by their grid index."""
  block = [min(d, bs) for d in x.shape]
  grid = [-(-d // b) for d, b in zip(x.shape, block)]
  padded = np.zeros([g * b for g, b in zip(grid, block)])
  padded[tuple(slice(0, d) for d in x.shape)] = x
  return {idx: padded[tuple(slice(i * b, (i + 1) * b)
                            for i, b in zip(idx, block))]
          for idx in np.ndindex(*grid)}


def np_unblock(blocks, shape, bs):
  block = [min(d, bs) for d in shape]
  grid = [-(-d // b) for d, b in zip(shape, block)]
  padded = np.zeros([g * b for g, b in zip(grid, block)])
  for idx, x in blocks.items():
    padded[tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))] = x
  return padded[tuple(slice(0, d) for d in shape)]


def np_mode(x, m, axis):
  return np.moveaxis(np.tensordot(m, x, axes=(1, axis)), 0, axis)


class NumpySketchy:
  """Sketchy per block and axis in float64 with dense d×d roots."""

  def __init__(self, shapes, *, rank, bs, b2, epsilon, every, start):
    self.rank, self.bs, self.b2, self.eps = rank, bs, b2, epsilon
    self.every, self.start, self.count = every, start, 0
    self.state, self.roots = {}, {}
    for name, shape in shapes.items():
      if len(shape) < 2:
        continue
      for idx, blk in np_blocks(np.zeros(shape), bs).items():
        axes = []
        for d in blk.shape:
          k = min(rank, d)
          axes.append([np.zeros((d, k)), np.zeros(k), 0.0])
        self.state[name, idx] = axes
        self.roots[name, idx] = [np.eye(d) for d in blk.shape]

  def fd(self, axis_state, g_mat):
    u, sigma, rho = axis_state
    k = len(sigma)
    z = np.concatenate([np.sqrt(self.b2) * u * sigma, g_mat], axis=1)
    v, s, _ = np.linalg.svd(z, full_matrices=False)
    c = s[k] if len(s) > k else 0.0
    return [v[:, :k], np.sqrt(np.maximum(s[:k] ** 2 - c ** 2, 0)),
            self.b2 * rho + c ** 2]

  def root(self, axis_state, p):
    u, sigma, rho = axis_state
    lam = sigma ** 2 + rho
    eps = self.eps * max(lam.max(), 1e-30)
    proj = u @ u.T
    return ((u * (lam + eps) ** (-1 / p)) @ u.T
            + (rho + eps) ** (-1 / p) * (np.eye(len(u)) - proj))

  def update(self, grads):
    finite = all(np.all(np.isfinite(g)) for g in grads.values())
    due = (self.count >= self.start
           and (self.count - self.start) % self.every == 0)
    out = {}
    for name, g in grads.items():
      if g.ndim < 2:
        out[name] = g
        continue
      blocks = {}
      for idx, gb in np_blocks(g, self.bs).items():
        axes = self.state[name, idx]
        for i in range(gb.ndim):
          g_mat = np.moveaxis(gb, i, 0).reshape(gb.shape[i], -1)
          axes[i] = self.fd(axes[i], g_mat)
        if due and finite:
          self.roots[name, idx] = [self.root(a, 2 * gb.ndim) for a in axes]
        if self.count >= self.start:
          for i, p in enumerate(self.roots[name, idx]):
            gb = np_mode(gb, p, i)
        blocks[idx] = gb
      out[name] = np_unblock(blocks, g.shape, self.bs)
    self.count += int(finite)  # a skipped step does not count
    return out


def run_tx(tx, steps=STEPS, grads_fn=grads_at):
  params = zeros_params()
  state = tx.init(params)
  init_state = state
  update = jax.jit(tx.update)
  outs = []
  for t in range(steps):
    u, state = update(as_jax(grads_fn(t)), state, params)
    outs.append(jax.tree_util.tree_map(np.asarray, u))
  return outs, state, init_state, update


ORACLE_ARGS = dict(rank=3, b2=0.9, epsilon=1e-3, precondition_every=2,
                   start_preconditioning_step=1, fd_method="exact")


@pytest.fixture(scope="module")
def oracle_run():
  tx = kronopt.scale_by_sketchy(block_size=BLOCK, **ORACLE_ARGS)
  return run_tx(tx)


def test_matches_dense_float64_oracle(oracle_run):
  """Blocked, padded matrix and order-3 tensor, rank < d, cached roots."""
  outs = oracle_run[0]
  ref = NumpySketchy(PARAMS, rank=3, bs=BLOCK, b2=0.9, epsilon=1e-3,
                     every=2, start=1)
  for t, got in enumerate(outs):
    expected = ref.update(grads_at(t))
    for name in PARAMS:
      scale = np.abs(expected[name]).max()
      np.testing.assert_allclose(got[name] / scale, expected[name] / scale,
                                 atol=2e-4, err_msg=f"{name} step {t}")
  rho = [float(np.max(a[2])) for axes in ref.state.values() for a in axes]
  assert max(rho) > 0  # rank < d: mass did escape


def test_state_structure_is_stable(oracle_run):
  _, state, init_state, _ = oracle_run
  chex.assert_trees_all_equal_shapes_and_dtypes(state, init_state)
  assert isinstance(state.groups[0], kronopt.SketchyGroupState)
  assert int(state.failures) == 0 and int(state.skipped) == 0


def dense_low_rank_root(root, b):
  u = np.asarray(root.basis[b], np.float64)
  a, t = np.asarray(root.scale[b]), float(root.tail[b])
  return (u * a) @ u.T + t * (np.eye(len(u)) - u @ u.T)


def test_rank_at_least_d_equals_shampoo_up_to_scale():
  """§7.6: with k ≥ d, equal grafted directions; factors L/(1−β₂).

  Sketchy's factor is ``L/(1−β₂)``, so for an order-q block each root is
  ``(1−β₂)^{1/(2q)}`` times Shampoo's and the direction ``(1−β₂)^{1/2}``
  times Shampoo's.
  ε = 1e-3 (relative, as in Shampoo) keeps both float32 roots above the
  rounding noise of the rank-deficient statistics of the padded blocks.
  """
  b2 = 0.9
  common = dict(block_size=BLOCK, b2=b2, epsilon=1e-3, precondition_every=2,
                start_preconditioning_step=1)
  sk_out, sk_state, _, _ = run_tx(kronopt.graft(
      kronopt.scale_by_sketchy(rank=BLOCK, **common), "adam"))
  sh_out, sh_state, _, _ = run_tx(kronopt.graft(
      kronopt.scale_by_shampoo(**common), "adam"))
  for a, b in zip(sk_out, sh_out):
    chex.assert_trees_all_close(a, b, rtol=1e-3, atol=1e-6)
  for sk, sh in zip(sk_state.direction.groups, sh_state.direction.groups):
    order = len(sk.sketches)
    for sketch, root, stat, sh_root in zip(sk.sketches, sk.roots, sh.stats,
                                           sh.roots):
      for b in range(stat.shape[0]):
        u = np.asarray(sketch.basis[b], np.float64)
        dense = (u * np.asarray(sketch.sigma[b]) ** 2) @ u.T
        np.testing.assert_allclose(dense * (1 - b2), stat[b], rtol=1e-4,
                                   atol=1e-5 * np.abs(stat[b]).max())
        np.testing.assert_allclose(
            dense_low_rank_root(root, b),
            (1 - b2) ** (1 / (2 * order)) * np.asarray(sh_root[b]),
            rtol=1e-3, atol=1e-3 * np.abs(sh_root[b]).max())


def test_non_finite_gradient_leaves_sketch_unchanged(oracle_run):
  _, state, _, update = oracle_run
  bad = grads_at(0)
  bad["w"][2, 3] = np.nan
  updates, new_state = update(as_jax(bad), state, zeros_params())
  chex.assert_trees_all_equal([g.sketches for g in new_state.groups],
                              [g.sketches for g in state.groups])
  assert int(new_state.skipped) == int(state.skipped) + 1
  assert all(np.all(np.isfinite(x))
             for x in jax.tree_util.tree_leaves(new_state))
  assert all(np.all(np.asarray(x) == 0)
             for x in jax.tree_util.tree_leaves(updates))


def test_randomized_matches_the_oracle_on_a_low_rank_stream():
  """The range step inside the engine (per-block keys): a stream of rank
  2 < k is sketched exactly, so the default method gives the oracle's
  (exact FD) direction."""
  shapes = {"w": (40, 32)}
  params = {"w": jnp.zeros(shapes["w"], jnp.float32)}
  rng = np.random.default_rng(4)
  left, right = rng.standard_normal((40, 2)), rng.standard_normal((2, 32))
  grads = lambda t: {"w": left @ np.random.default_rng(t).standard_normal(
      (2, 2)) @ right}
  assert sketch_lib.uses_range_step(40, 4, 32, 4)
  assert sketch_lib.uses_range_step(32, 4, 40, 4)
  tx = kronopt.scale_by_sketchy(
      rank=4, block_size=40, b2=0.9, epsilon=1e-3, fd_oversample=4,
      precondition_every=1, start_preconditioning_step=1)
  ref = NumpySketchy(shapes, rank=4, bs=40, b2=0.9, epsilon=1e-3, every=1,
                     start=1)
  update, state = jax.jit(tx.update), tx.init(params)
  for t in range(4):
    u, state = update(as_jax(grads(t)), state, params)
    want = ref.update(grads(t))["w"]
    np.testing.assert_allclose(np.asarray(u["w"]), want,
                               atol=2e-4 * np.abs(want).max())


# ---------------------------------------------------------------- extremes


CHAIN_PARAMS = {"w": (10, 7)}  # one matrix: a smaller chain to compile


@pytest.fixture(scope="module")
def chain():
  """The ready-made chain and Adam with its graft's settings, jitted."""
  tx = kronopt.sketchy(1.0, rank=3, block_size=BLOCK,
                       start_preconditioning_step=0)
  adam = optax.adam(1.0, b1=0.9, b2=0.999, eps=1e-8, nesterov=True)
  return tx, jax.jit(tx.update), adam, jax.jit(adam.update)


def test_overflowing_gradient_is_skipped_and_counted(oracle_run):
  """A 1e25 entry squares past float32: the step is skipped and counted,
  no state changes (so one spike does not take over the preconditioner)."""
  _, state, _, update = oracle_run
  bad = grads_at(0)
  bad["w"][2, 3] = 1e25
  updates, new_state = update(as_jax(bad), state, zeros_params())
  for leaf in jax.tree_util.tree_leaves(updates):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert int(new_state.overflows) == int(state.overflows) + 1
  chex.assert_trees_all_equal(new_state._replace(overflows=0),
                              state._replace(overflows=0))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e17, 1e20, 1e30])
def test_extreme_gradients_take_adams_step(chain, scale):
  """Finite updates: Adam's norm on a step taken, 0 on a skipped one.

  A step is skipped (and counted) when Shampoo's statistic
  ``(1−β₂)(σ₁² + ρ)`` exceeds float32: always at 1e30, for some steps at
  1e20 (a 6×6 block of these gradients has ``(1−β₂) σ₁² ≈ 4e38`` there);
  Adam's own update is then 0 on every entry whose square overflows.
  """
  tx, update, adam, adam_update = chain
  params = {"w": jnp.zeros(CHAIN_PARAMS["w"], jnp.float32)}
  state, adam_state = tx.init(params), adam.init(params)
  skips = []
  for t in range(3):
    g = as_jax({"w": scale * grads_at(t)["w"]})
    before = int(kronopt.engine.find_states(state)[0].overflows)
    u, state = update(g, state, params)
    want, next_adam = adam_update(g, adam_state, params)
    skips.append(int(kronopt.engine.find_states(state)[0].overflows) > before)
    got = np.asarray(u["w"], np.float64)
    adam_u = np.asarray(want["w"], np.float64)
    assert np.all(np.isfinite(got))
    if skips[-1]:  # Adam is compared on the steps the chain takes
      np.testing.assert_array_equal(got, 0.0)
      big = np.abs(np.asarray(g["w"], np.float64)) > 2e19
      np.testing.assert_array_equal(adam_u[big], 0.0)
    else:
      np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(adam_u),
                                 rtol=1e-4)
      adam_state = next_adam
  if scale < 1e18:
    assert not any(skips)
  if scale > 1e25:
    assert all(skips)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e15])
def test_direction_is_scale_free(oracle_run, scale):
  """``s·G`` gives ``G``'s direction (times ``s`` where not preconditioned)."""
  outs, _, state, update = oracle_run
  for t in range(STEPS):
    g = jax.tree_util.tree_map(lambda x: scale * x, grads_at(t))
    u, state = update(as_jax(g), state, zeros_params())
    for name in PARAMS:
      factor = scale if t < 1 or name == "b" else 1.0
      want = outs[t][name] * factor
      np.testing.assert_allclose(np.asarray(u[name], np.float64), want,
                                 atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------- memory


def state_bytes(tx, params):
  shapes = jax.eval_shape(tx.init, params)
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for x in jax.tree_util.tree_leaves(shapes))


# count, failures, skipped, overflows, residual, preconditioned
ENGINE_SCALAR_BYTES = 4 + 4 + 4 + 4 + 4 + 1


def formula_bytes(params, rank, block_size):
  """Per block and axis: U, σ, √ρ and the cached root U, a, t in float32."""
  lay = layout.make_layout(params, block_size)
  total = 0
  for shape, n in zip(lay.group_shapes, lay.group_sizes):
    for d in shape:
      k = min(rank, d)
      total += n * 4 * (2 * d * k + 2 * k + 2)
  return total + ENGINE_SCALAR_BYTES


@pytest.mark.parametrize("rank", [4, 16, 64])
def test_state_bytes_are_linear_in_width(rank):
  sizes = []
  widths = [128, 256, 512, 1024]
  for width in widths:
    params = {"w": jax.ShapeDtypeStruct((width, 96), jnp.float32),
              "v": jax.ShapeDtypeStruct((3, width, 40), jnp.float32),
              "b": jax.ShapeDtypeStruct((width,), jnp.float32)}
    tx = kronopt.scale_by_sketchy(rank=rank, block_size=4096)
    got = state_bytes(tx, params)
    assert got == formula_bytes(params, rank, 4096)
    sizes.append(got)
  steps = np.diff(sizes) / np.diff(widths)
  np.testing.assert_allclose(steps, steps[0])  # exactly affine in the width


def test_rank_64_on_4096_layer_is_under_an_eighth_of_shampoo():
  params = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
  sk = state_bytes(kronopt.scale_by_sketchy(rank=64, block_size=4096), params)
  sh = state_bytes(kronopt.scale_by_shampoo(block_size=4096), params)
  assert sk == formula_bytes(params, 64, 4096)
  assert sk < sh / 8


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,name", [
    (dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(b2=0.0), "b2"),
    (dict(b2=1.5), "b2"), (dict(epsilon=-1.0), "epsilon"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(block_size=1), "block_size"), (dict(fd_method="svd"), "fd_method"),
    (dict(fd_oversample=0), "fd_oversample"),
    (dict(fd_power_iters=-1), "fd_power_iters"), (dict(seed=-1), "seed"),
])
def test_bad_hyperparameters_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    kronopt.scale_by_sketchy(**kwargs)
  with pytest.raises(ValueError, match=name):
    kronopt.sketchy(1e-3, **kwargs)
