"""CASPR (ALGORITHMS §4) against dense float64 numpy, and its sandwich (§7.2).

The oracle is written from ALGORITHMS §0/§4 with numpy only (layout helpers
from tests/reference.py): Shampoo's statistics, roots
``(max(λ, 0) + ε·tr(L)/d)^{-1/(2k)}`` by float64 eigh, and the direction as the
dense matrix ``((1/k) Σ_i I⊗…⊗P_i⊗…⊗I)^k`` applied to ``vec G``. It works on
every block's unpadded sub-block (``d`` its real size), so agreement on the
split/padded parameter also shows that padding does not change the
trace-relative damping. Tolerance ``RTOL = 1e-4`` on
``max|Δ| / max|expected|`` (float32 vs float64; observed ≈1e-6).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kronopt
from kronopt.linalg import roots
from kronopt.preconditioners import caspr as caspr_lib
from kronopt.preconditioners import shampoo as shampoo_lib

sys.path.insert(0, os.path.dirname(__file__))
import problems  # noqa: E402
import reference as ref  # noqa: E402

RTOL = 1e-4
# block_size 4: "w" stays a 3x4 matrix, "t" an order-3 block, "p" (6x7) is cut
# into 4x4 blocks of which three are zero-padded; "b" is not preconditioned.
SHAPES = {"w": (3, 4), "t": (2, 3, 4), "p": (6, 7), "b": (4,)}
# The first refresh (step 2) sees 3 gradients, so every real statistic is
# full rank and float32 roots are accurate.
CONFIG = dict(block_size=4, b2=0.9, epsilon=1e-4, precondition_every=2,
              start_preconditioning_step=2)
STEPS = 7
NAN_STEP = 3  # this step's gradient has a NaN: it must change nothing


def caspr_root(s, k, epsilon):
  """``(max(λ, 0) + ε·tr(L)/d)^{-1/(2k)}`` in float64."""
  lam, q = np.linalg.eigh(s)
  lam = np.maximum(lam, 0.0) + epsilon * np.trace(s) / s.shape[0]
  return (q * lam ** (-1.0 / (2 * k))) @ q.T


def kronecker_sum_power(roots):
  """The dense ``((1/k) Σ_i I⊗…⊗P_i⊗…⊗I)^k``."""
  k = len(roots)
  eyes = [np.eye(r.shape[0]) for r in roots]
  terms = [ref.kron(*(eyes[:i] + [r] + eyes[i + 1:]))
           for i, r in enumerate(roots)]
  return np.linalg.matrix_power(sum(terms) / k, k)


class CasprOracle:
  """CASPR's direction per real sub-block, float64 (ALGORITHMS §4)."""

  def __init__(self, shapes, *, block_size, b2, epsilon, precondition_every,
               start_preconditioning_step):
    self.b2, self.epsilon = b2, epsilon
    self.every, self.start = precondition_every, start_preconditioning_step
    self.count = 0
    self.blocks = {}
    for name, shape in shapes.items():
      merged = ref.merged_shape(shape, block_size)
      if merged is None:
        continue
      blocks = []
      for idx in ref.block_index(merged, block_size):
        dims = [s.stop - s.start for s in idx]
        blocks.append(dict(index=idx, stats=[np.zeros((d, d)) for d in dims],
                           roots=[np.eye(d) for d in dims]))
      self.blocks[name] = (merged, blocks)

  def update(self, grads):
    t, finite = self.count, ref.all_finite(grads)
    due = t >= self.start and (t - self.start) % self.every == 0
    out = {}
    for name, g in grads.items():
      if name not in self.blocks:
        out[name] = np.asarray(g) if finite else np.zeros(np.shape(g))
        continue
      merged, blocks = self.blocks[name]
      gm = np.asarray(g, np.float64).reshape(merged)
      d = np.zeros(merged)
      for blk in blocks:
        gb = gm[blk["index"]] if finite else np.zeros(gm[blk["index"]].shape)
        k = gb.ndim
        if finite:
          blk["stats"] = [self.b2 * s + (1 - self.b2) * ref.mode_gram(gb, a)
                          for a, s in enumerate(blk["stats"])]
        if due and finite:
          blk["roots"] = [caspr_root(s, k, self.epsilon)
                          for s in blk["stats"]]
        db = gb
        if t >= self.start:
          db = (kronecker_sum_power(blk["roots"]) @ ref.vec(gb)).reshape(
              gb.shape)
        d[blk["index"]] = db
      out[name] = d.reshape(np.shape(g))
    self.count += int(finite)  # a skipped step does not count
    return out


def gradient_sequence():
  rng = np.random.default_rng(0)
  seq = []
  for t in range(STEPS):
    g = {k: rng.standard_normal(s).astype(np.float32)
         for k, s in SHAPES.items()}
    if t == NAN_STEP:
      g["t"][0, 1, 2] = np.inf
    seq.append(g)
  return seq


@pytest.fixture(scope="module")
def runs():
  """kronopt's and the oracle's directions over the same gradients."""
  tx = kronopt.scale_by_caspr(**CONFIG)
  oracle = CasprOracle(SHAPES, **CONFIG)
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  state, update = tx.init(params), jax.jit(tx.update)
  got, expected, states = [], [], [state]
  for g in gradient_sequence():
    u, state = update(g, state)
    got.append(u)
    states.append(state)
    expected.append(oracle.update(g))
  return got, expected, states


def test_direction_matches_dense_float64_oracle(runs):
  got, expected, _ = runs
  for t, (u, e) in enumerate(zip(got, expected)):
    for name in SHAPES:
      if t == NAN_STEP:
        np.testing.assert_array_equal(u[name], 0.0)
      else:
        err = ref.max_rel_err(u[name], e[name])
        assert err <= RTOL, (t, name, err)


def test_nan_step_is_skipped_and_state_is_stable(runs):
  _, _, states = runs
  assert int(states[-1].skipped) == 1
  assert int(states[-1].failures) == 0
  for s0, s1 in zip(states[NAN_STEP].groups, states[NAN_STEP + 1].groups):
    for a, b in zip(s0.stats, s1.stats):
      np.testing.assert_array_equal(a, b)
  shapes = lambda s: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), s)
  assert all(shapes(s) == shapes(states[0]) for s in states)


def sym_power(a, power):
  lam, q = np.linalg.eigh(0.5 * (a + a.T))
  return (q * lam ** power) @ q.T


def loewner_ratio(a, b):
  """``λ_max(B^{-1/2} A B^{-1/2})``: ``A ⪯ B`` iff it is ≤ 1."""
  w = sym_power(b, -0.5)
  return np.linalg.eigvalsh(w @ a @ w).max()


SANDWICH_EPS = 1e-2


@pytest.mark.parametrize("m,n,rank,steps", [(6, 8, 1, 12), (16, 25, 16, 6)])
def test_sandwich_between_shampoo_and_full_matrix_adagrad(m, n, rank, steps):
  """ALGORITHMS §7.2: ``L^{-1/4}⊗R^{-1/4} ⪯ P_CASPR ⪯ √r S^{-1/2}``.

  ``L = εI + Σ G Gᵀ``, ``R = εI + Σ Gᵀ G``, ``S = εI + Σ g gᵀ`` (the paper's
  absolute ε: ``relative_epsilon=False``), ``r`` the gradients' rank;
  ``P_CASPR`` is kronopt's operator, read column by column from its
  float64 direction on the ``mn`` basis matrices.
  """
  rng = np.random.default_rng(m)
  gs = np.stack([rng.standard_normal((m, rank)) @
                 rng.standard_normal((rank, n)) for _ in range(steps)])
  caspr = caspr_lib.Caspr(b2=1.0, epsilon=SANDWICH_EPS, relative_epsilon=False)
  with jax.enable_x64(True):
    state = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64),
                                   caspr.init_group((m, n), 1))
    for g in gs:
      state = caspr.update_statistics(state, jnp.asarray(g[None]))
    state, _ = caspr.refresh(state)
    basis = jnp.eye(m * n, dtype=jnp.float64).reshape(m * n, m, n)
    roots = tuple(jnp.broadcast_to(r, (m * n,) + r.shape[1:])
                  for r in state.roots)
    cols = caspr.precondition(state._replace(roots=roots), basis)
    p_caspr = np.asarray(cols).reshape(m * n, m * n).T
  eps = SANDWICH_EPS
  left = eps * np.eye(m) + np.einsum("tij,tkj->ik", gs, gs)
  right = eps * np.eye(n) + np.einsum("tji,tjk->ik", gs, gs)
  flat = gs.reshape(steps, -1)
  s = eps * np.eye(m * n) + flat.T @ flat
  pl, pr = sym_power(left, -0.25), sym_power(right, -0.25)
  np.testing.assert_allclose(
      p_caspr, kronecker_sum_power([pl, pr]), rtol=1e-10,
      atol=1e-10 * np.abs(p_caspr).max())
  tol = 1e-8
  assert loewner_ratio(np.kron(pl, pr), p_caspr) <= 1 + tol
  assert loewner_ratio(p_caspr, np.sqrt(rank) * sym_power(s, -0.5)) <= 1 + tol


def test_damping_is_relative_to_the_mean_eigenvalue():
  """``ε_r = ε·tr(L)/d``: a diagonal ``L`` gives ``(λ + ε·mean λ)^{-1/4}``.

  ``d`` counts the dimensions with a positive diagonal entry (3 of 4 here).
  """
  lam = np.array([4.0, 1.0, 0.25, 0.0])
  caspr = caspr_lib.Caspr(epsilon=0.1)
  stats = jnp.asarray(np.diag(lam)[None], jnp.float32)
  state = shampoo_lib.ShampooGroupState(stats=(stats, stats),
                                        roots=(stats, stats))
  new, _ = caspr.refresh(state)
  expected = (lam + 0.1 * lam.sum() / 3) ** -0.25  # 3 dims have seen data
  np.testing.assert_allclose(np.diag(new.roots[0][0]), expected, rtol=1e-5)


def test_newton_root_with_mean_damping_matches_eigh():
  """Both root methods honour ``relative_to="mean"`` (CASPR's ``ε_r``)."""
  a, _ = ref.random_psd(np.random.default_rng(7), 6, 1e3, n=2)
  a = jnp.asarray(a, jnp.float32)
  kw = dict(epsilon=1e-2, relative_to="mean")
  newton, residual = roots.inverse_root_newton(a, 4, **kw)
  eigh, _ = roots.inverse_root_eigh(a, 4, **kw)
  expected = np.stack([caspr_root(np.asarray(x, np.float64), 2, 1e-2)
                       for x in a])
  assert float(jnp.max(residual)) < 1e-3
  assert ref.max_rel_err(eigh, expected) < 1e-5
  assert ref.max_rel_err(newton, expected) < 1e-3


@pytest.mark.parametrize("kwargs,name", [
    (dict(b2=0.0), "b2"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(root_method="svd"), "root_method"),
    (dict(precondition_every=0), "precondition_every"),
    (dict(newton_max_iters=0), "newton_max_iters"),
])
def test_bad_hyperparameters_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    kronopt.scale_by_caspr(**kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(learning_rate=1e-2, b1=1.5), "b1"),
    (dict(learning_rate=1e-2, epsilon=-1.0), "epsilon"),
])
def test_caspr_alias_validates(kwargs, name):
  with pytest.raises(ValueError, match=name):
    kronopt.caspr(**kwargs)


# Learning rates tuned once on {1e-3, 3e-3, 1e-2, 3e-2, 1e-1} (and 3e-1, 1
# for Adam) on the full-batch digits MLP, 200 steps, seed 0: Adam's best is
# 1e-1 (final loss 2.8e-4); CASPR reaches 4.9e-6 at the same rate.
CASPR_LR, ADAM_LR, TRAIN_STEPS = 1e-1, 1e-1, 200


def test_trains_digits_mlp_better_than_adam():
  tx = kronopt.caspr(CASPR_LR, block_size=64, precondition_every=5,
                     start_preconditioning_step=1)
  _, loss, state = problems.train_digits(tx, steps=TRAIN_STEPS)
  _, loss_adam, _ = problems.train_digits(optax.adam(ADAM_LR),
                                          steps=TRAIN_STEPS)
  assert int(kronopt.diagnostics(state)["refresh_failures"]) == 0
  assert np.isfinite(float(loss))
  assert float(loss) < float(loss_adam)
