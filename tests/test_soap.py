"""kronopt's SOAP against the dense float64 numpy oracle in reference_soap.py.

The oracle (tests/reference_soap.py) is written from docs/algorithms.md §8
without jax or kronopt and works on every block's *unpadded* sub-block, so
agreement on split and padded layouts also shows that padding never leaks
into the rotation or the second moment.

Tolerances (kronopt in float32, the oracle in float64), as
``max|actual − expected| / max|expected|`` per leaf and step:
``RTOL = 1e-4`` on directions and moments (observed ≤ 1e-5). While
``Q = I`` SOAP is Adam: ``RTOL_ADAM = 1e-6`` against ``optax.adam`` (two
jitted programs differ by an ulp or two).

Gradients are Gaussian with row scales that swap every 3 steps, so the
eigenvalue order changes and the refresh's column sort (and the matching
permutation of ``V``) is exercised; the first refresh comes after enough
steps that every statistic is full rank, so the eigenbases are unique up to
signs (the direction does not depend on the signs).
"""

import functools
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronopt
from kronopt import engine
from kronopt.linalg import eigenbasis
from kronopt.preconditioners import soap as soap_lib

sys.path.insert(0, os.path.dirname(__file__))
import reference_soap as ref  # noqa: E402  (the numpy-only oracle)

RTOL = 1e-4
RTOL_ADAM = 1e-6

# block_size 5, max_precond_dim 13: p = 13×7 splits into 5+5+3 × 5+2 (five
# padded blocks), t is an order-3 block, e = 4×20 rotates only its first
# axis (20 > 13: not rotated, not split), x = 14×15 has no axis ≤ 13 and b
# is rank 1: both plain Adam.
SHAPES = {"p": (13, 7), "t": (3, 4, 5), "e": (4, 20), "x": (14, 15),
          "b": (5,)}
SOAP_KW = dict(block_size=5, max_precond_dim=13, precondition_every=2,
               start_preconditioning_step=4, b1=0.9, b2=0.95,
               shampoo_b2=0.9)
STEPS = 12
# The ready-made chain, refreshed every step with β_s = β₂ from the first
# step on (square and order-3 blocks: one gradient gives full-rank factors).
CHAIN_SHAPES = {"w": (6, 6), "t": (3, 4, 5), "b": (6,)}
CHAIN_KW = dict(learning_rate=0.1, weight_decay=0.1, block_size=6,
                precondition_every=1, b1=0.9, b2=0.95)
CHAIN_STEPS = 6


def grads_at(shapes, t):
  """Gaussian gradients whose row scales swap every 3 steps."""
  rng = np.random.default_rng(1000 + t)
  out = {}
  for name, shape in shapes.items():
    g = rng.standard_normal(shape)
    if len(shape) >= 2:
      scale = np.linspace(0.5, 2.0, shape[0]) ** (-1) ** (t // 3)
      g = g * scale.reshape((-1,) + (1,) * (len(shape) - 1))
    out[name] = g.astype(np.float32)
  return out


def params_of(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in shapes.items()}


@pytest.fixture(scope="module")
def soap_run():
  """scale_by_soap and its oracle over ``STEPS`` steps."""
  params = params_of(SHAPES)
  tx = kronopt.scale_by_soap(**SOAP_KW)
  oracle = ref.SoapOracle(params, **SOAP_KW)
  update = jax.jit(tx.update)
  states, got, want = [tx.init(params)], [], []
  for t in range(STEPS):
    g = grads_at(SHAPES, t)
    u, s = update(g, states[-1])
    states.append(s)
    got.append(u)
    want.append(oracle.update(g))
  return dict(params=params, states=states, got=got, want=want,
              oracle=oracle)


def test_directions_match_oracle(soap_run):
  for t, (got, want) in enumerate(zip(soap_run["got"], soap_run["want"])):
    for name in SHAPES:
      err = ref.max_rel_err(got[name], want[name])
      assert err <= RTOL, (t, name, err)


def _blocks_of_leaf(lay, state, name, keys):
  """The group, the indices of the blocks of leaf ``name`` in it (in order)
  and the rotated axes."""
  leaf = lay.leaves[keys.index(name)]
  group = engine.find_states(state)[0].groups[leaf.group]
  return (group, range(leaf.offset, leaf.offset + leaf.num_blocks),
          leaf.axes)


def test_moments_and_statistics_match_oracle(soap_run):
  """``M``, ``V`` (sign-free) and ``L_i`` of every block, on the real
  sub-block, after the last step; zero on the padding."""
  lay = kronopt.make_layout(soap_run["params"], SOAP_KW["block_size"],
                            SOAP_KW["max_precond_dim"])
  keys = sorted(SHAPES)
  final = soap_run["states"][-1]
  for name in ("p", "t", "e"):
    group, indices, axes = _blocks_of_leaf(lay, final, name, keys)
    for j, blk in zip(indices, soap_run["oracle"].leaves[name]["blocks"]):
      real = tuple(slice(0, s.stop - s.start) for s in blk["index"])
      for field in ("mu", "nu"):
        x = np.asarray(getattr(group, field)[j])
        expected = blk["m" if field == "mu" else "v"]
        assert ref.max_rel_err(x[real], expected) <= RTOL, (name, j, field)
        padding = np.ones(x.shape, bool)
        padding[real] = False
        np.testing.assert_array_equal(x[padding], 0.0)
      for s, e, axis in zip(group.stats, blk["stats"], axes):
        r = real[axis]
        assert ref.max_rel_err(np.asarray(s[j])[r, r], e) <= RTOL, name


def test_refresh_sort_is_exercised(soap_run):
  """Some refresh reordered some basis (so the V permutation is tested)."""
  orders = soap_run["oracle"].orders
  assert any(not np.array_equal(o, np.arange(len(o))) for o in orders)


def test_identity_bases_are_exactly_adam(soap_run):
  """Until the first refresh (steps 0..start, the direction of step
  ``start`` still uses Q = I) every leaf's update is optax.adam's."""
  start = SOAP_KW["start_preconditioning_step"]
  adam = optax.scale_by_adam(SOAP_KW["b1"], SOAP_KW["b2"], 1e-8)
  update = jax.jit(adam.update)
  state = adam.init(soap_run["params"])
  for t in range(start + 1):
    want, state = update(grads_at(SHAPES, t), state)
    for name in SHAPES:
      err = ref.max_rel_err(soap_run["got"][t][name], want[name])
      assert err <= RTOL_ADAM, (t, name, err)
  after = soap_run["got"][start + 1]
  want, _ = update(grads_at(SHAPES, start + 1), state)
  assert ref.max_rel_err(after["p"], want["p"]) > 1e-2  # now rotated


def test_state_padding_and_diagnostics(soap_run):
  """Padded coordinates: zero statistics, identity bases (no mixing with
  real ones); an exactly zero direction there; no rejected refresh."""
  lay = kronopt.make_layout(soap_run["params"], SOAP_KW["block_size"],
                            SOAP_KW["max_precond_dim"])
  final = soap_run["states"][-1]
  pre = engine.find_states(final)[0]
  precond = soap_lib.Soap(b1=SOAP_KW["b1"], b2=SOAP_KW["b2"],
                          shampoo_b2=SOAP_KW["shampoo_b2"])
  blocks = lay.block(grads_at(SHAPES, STEPS))
  for group, g, real, axes in zip(pre.groups, blocks, lay.real_sizes(),
                                  lay.group_axes):
    for axis, s, q in zip(axes, group.stats, group.bases):
      d = s.shape[-1]
      for j, r in enumerate(real[axis]):
        np.testing.assert_array_equal(np.asarray(s[j])[r:], 0.0)
        np.testing.assert_array_equal(np.asarray(s[j])[:, r:], 0.0)
        np.testing.assert_array_equal(np.asarray(q[j])[r:, :r], 0.0)
        np.testing.assert_array_equal(np.asarray(q[j])[:r, r:], 0.0)
        np.testing.assert_array_equal(np.asarray(q[j])[r:, r:],
                                      np.eye(d - r))
    if g.shape[1:] != (5, 5):
      continue
    # p's group (5 of its 6 blocks padded): the direction, exactly 0 there.
    ctx = engine.GroupContext(count=pre.count, index=None,
                              real=tuple(jnp.asarray(r) for r in real),
                              aux=None, axes=axes)
    direction = np.asarray(jax.jit(
        lambda st, x: precond.precondition(st, x, ctx))(group, g))
    mask = np.asarray(soap_lib.real_mask(ctx.real, g.shape[1:]))
    assert not np.all(mask)
    np.testing.assert_array_equal(direction[~mask], 0.0)
    assert np.all(np.abs(direction[mask]) > 0)
  diag = kronopt.diagnostics(final)
  assert int(diag["refresh_failures"]) == 0
  assert 0.0 < float(diag["worst_residual"]) <= 1.0


@pytest.fixture(scope="module")
def chain_run():
  """kronopt.soap (every step refreshed, from step 0) and its oracle."""
  params = params_of(CHAIN_SHAPES, seed=1)
  tx = kronopt.soap(**CHAIN_KW)
  oracle = ref.SoapOracle(params, **CHAIN_KW)
  update = jax.jit(tx.update)
  state, got, want = tx.init(params), [], []
  for t in range(CHAIN_STEPS):
    g = grads_at(CHAIN_SHAPES, t)
    u, state = update(g, state, params)
    got.append(u)
    want.append(oracle.update(g, params))
  return dict(params=params, got=got, want=want)


def test_ready_made_soap_matches_oracle(chain_run):
  for t, (got, want) in enumerate(zip(chain_run["got"], chain_run["want"])):
    for name in CHAIN_SHAPES:
      err = ref.max_rel_err(got[name], want[name])
      assert err <= RTOL, (t, name, err)


def test_first_step_is_adamw(chain_run):
  """With the default start (0) the first step uses Q = I: AdamW's step."""
  adamw = optax.adamw(CHAIN_KW["learning_rate"], b1=CHAIN_KW["b1"],
                      b2=CHAIN_KW["b2"], eps=1e-8,
                      weight_decay=CHAIN_KW["weight_decay"])
  params = chain_run["params"]
  want, _ = adamw.update(grads_at(CHAIN_SHAPES, 0), adamw.init(params),
                         params)
  chex.assert_trees_all_close(chain_run["got"][0], want, rtol=RTOL_ADAM,
                              atol=1e-9)


# ------------------------------------------------ refresh, one group, eager --

def _ctx(count, real, axes=(0, 1)):
  return engine.GroupContext(count=jnp.asarray(count, jnp.int32), index=None,
                             real=tuple(jnp.asarray(r) for r in real),
                             aux=None, axes=axes)


def _crafted_state():
  """One 4×3 block, real 3×3 (the last row is padding), Q = I, diagonal
  statistics whose order is (1, 2, 0) on the rows and (2, 0, 1) on the
  columns."""
  precond = soap_lib.Soap(precondition_every=2, start=4)
  state = precond.init_group((4, 3), 1)
  nu = jnp.arange(12.0).reshape(1, 4, 3) * jnp.asarray(
      [1.0, 1.0, 1.0, 0.0])[None, :, None]
  state = state._replace(
      stats=(jnp.diag(jnp.asarray([1.0, 3.0, 2.0, 0.0]))[None],
             jnp.diag(jnp.asarray([2.0, 1.0, 5.0]))[None]), nu=nu)
  return precond, state


def test_warm_refresh_sorts_columns_and_permutes_v():
  precond, state = _crafted_state()
  new, residual = precond.refresh(state, _ctx(6, ([3], [3])))
  rows, cols = [1, 2, 0, 3], [2, 0, 1]
  np.testing.assert_array_equal(
      new.nu[0], np.asarray(state.nu[0])[rows][:, cols])
  # qr(L Q[:, order]) of a diagonal L is the sorted permutation matrix.
  np.testing.assert_allclose(new.bases[0][0], np.eye(4)[:, rows], atol=1e-7)
  np.testing.assert_allclose(new.bases[1][0], np.eye(3)[:, cols], atol=1e-7)
  np.testing.assert_array_equal(residual, [0.0])


def test_first_refresh_is_eigh_and_keeps_before_start():
  precond, state = _crafted_state()
  kept, residual = precond.refresh(state, _ctx(2, ([3], [3])))
  chex.assert_trees_all_equal(kept, state)
  np.testing.assert_array_equal(residual, [0.0])
  rng = np.random.default_rng(0)
  a = rng.standard_normal((3, 3))
  stats = np.zeros((1, 4, 4), np.float32)
  stats[0, :3, :3] = a @ a.T + np.diag([0.0, 0.0, 20.0])
  state = state._replace(stats=(jnp.asarray(stats), state.stats[1]))
  first, residual = precond.refresh(state, _ctx(4, ([3], [3])))
  q = np.asarray(first.bases[0][0], np.float64)
  lam = np.diag(q.T @ stats[0] @ q)
  np.testing.assert_allclose(q.T @ stats[0] @ q, np.diag(lam), atol=1e-4)
  assert np.all(np.diff(lam[:3]) <= 0) and lam[2] >= 0
  np.testing.assert_array_equal(q[3], [0, 0, 0, 1])
  # V follows the order of diag(L) in the old basis (I): the row of the
  # largest diagonal entry (2, boosted by 20) comes first.
  order = list(np.argsort(-np.diag(stats[0])[:3], kind="stable")) + [3]
  np.testing.assert_array_equal(first.nu[0],
                                np.asarray(state.nu[0])[order][:, [2, 0, 1]])
  assert 0.0 < float(residual[0]) <= 1.0


def test_descending_order_keeps_padding_last_in_place():
  est = jnp.asarray([[0.0, 2.0, 1.0, 2.0, 0.0], [5.0, -1.0, 3.0, 4.0, 9.0]])
  order = eigenbasis.descending_order(est, jnp.asarray([4, 3]))
  np.testing.assert_array_equal(order, [[1, 3, 2, 0, 4], [0, 2, 1, 3, 4]])


def test_sort_columns_gives_sorted_product():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((2, 5, 5)).astype(np.float32)
  a = a @ np.swapaxes(a, -1, -2)
  q, _ = np.linalg.qr(rng.standard_normal((2, 5, 5)))
  q = q.astype(np.float32)
  aq, order, mass = eigenbasis.sort_columns(jnp.asarray(a), jnp.asarray(q))
  est = np.einsum("nij,nik,nkj->nj", q, a, q)
  for n in range(2):
    np.testing.assert_array_equal(order[n], np.argsort(-est[n]))
    np.testing.assert_allclose(aq[n], (a[n] @ q[n])[:, order[n]], rtol=1e-5,
                               atol=1e-5)
  assert np.all((np.asarray(mass) > 0) & (np.asarray(mass) <= 1))


# ---------------------------------------------------------- state, checks --

@pytest.mark.parametrize("kw", [dict(), dict(block_size=8, max_precond_dim=20),
                                dict(block_size=5, max_precond_dim=None)])
def test_state_bytes_equal_prediction(kw):
  params = {"w": jnp.zeros((40, 24)), "e": jnp.zeros((30, 6)),
            "t": jnp.zeros((3, 4, 6)), "b": jnp.zeros((6,), jnp.bfloat16)}
  for tx in (kronopt.scale_by_soap(**kw), kronopt.soap(1e-3, **kw)):
    state = jax.eval_shape(tx.init, params)
    arrays = sum(x.size * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(state) if x.ndim >= 1)
    assert arrays == soap_lib.predicted_state_bytes(params, **kw)


@pytest.mark.parametrize("name, value", [
    ("b1", 1.0), ("b1", -0.1), ("b2", 1.0), ("shampoo_b2", 0.0),
    ("shampoo_b2", 1.5), ("eps", 0.0), ("start_preconditioning_step", -1),
    ("block_size", 1), ("max_precond_dim", 0), ("precondition_every", 0)])
def test_bad_arguments_raise(name, value):
  for fn in (kronopt.scale_by_soap, functools.partial(kronopt.soap, 1e-3)):
    with pytest.raises(ValueError, match=name):
      fn(**{name: value})
  with pytest.raises(ValueError, match="learning_rate"):
    kronopt.soap(-1.0)
