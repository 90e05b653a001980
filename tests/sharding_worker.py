"""Multi-device checks of block-axis sharding, run by tests/test_sharding.py.

Runs in its own process so that ``XLA_FLAGS`` can give JAX 8 CPU devices
before it starts. Each check prints ``PASS <name>`` or ``FAIL <name>`` with
the traceback; the exit code is the number of failed checks. Usage:

    python tests/sharding_worker.py [check ...]      # default: all checks
"""

import os
import functools
import sys
import time
import math
import re
import traceback

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kronopt
from kronopt import engine
from kronopt.preconditioners import shampoo as shampoo_lib

# Sharded and single-device runs differ only by float32 rounding (XLA tiles
# the batched matmuls differently for N and N/8 blocks): relative tolerance on
# the updates, measured ~3e-5 at worst.
RTOL = 1e-4
STEPS = 6
BLOCK = 8
AUTO = (AxisType.Auto, AxisType.Auto)


def make_params():
  """Two groups: [15, 8, 8] (12 + 1 + 2 blocks) and [1, 3, 4, 6]."""
  return {"a": jnp.zeros((32, 24)), "b": jnp.zeros((8, 8)),
          "c": jnp.zeros((16, 8)), "bias": jnp.zeros((5,)),
          "t": jnp.zeros((3, 4, 6))}


GROUP_SIZES = (15, 1)
# Per block dimension d, the blocks per device on 8 devices (N padded to 16
# and to 8): the most blocks any root computation holds on one device.
LOCAL_BLOCKS = {8: 2, 3: 1, 4: 1, 6: 1}


def grads_at(params, step):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  key = jax.random.PRNGKey(step)
  return treedef.unflatten([
      jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
      for i, x in enumerate(leaves)])


def shampoo_tx(root_method="eigh", **sharding):
  return kronopt.scale_by_shampoo(
      block_size=BLOCK, precondition_every=2, start_preconditioning_step=1,
      root_method=root_method, **sharding)


def place_like(x, like):
  """``x`` with the NamedSharding of ``like``, if it has one."""
  if isinstance(like.sharding, NamedSharding):
    return jax.device_put(x, like.sharding)
  return x


def run(tx, params, steps=STEPS, mesh=None, out_shardings=None):
  """Jitted init and ``steps`` updates; returns (updates per step, states).

  ``out_shardings``: the state's shardings, pinned in init and update.
  The gradients are placed like (sharded) parameters.
  """
  def go():
    state = jax.jit(tx.init, out_shardings=out_shardings)(params)
    update = jax.jit(tx.update, out_shardings=(None, out_shardings))
    states, updates = [state], []
    for t in range(steps):
      grads = jax.tree_util.tree_map(place_like, grads_at(params, t), params)
      u, state = update(grads, state, params)
      updates.append(u)
      states.append(state)
    return updates, states
  if mesh is None:
    return go()
  with jax.set_mesh(mesh):
    return go()


def assert_updates_close(got, want):
  for step, (g, w) in enumerate(zip(got, want)):
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(w)):
      a, b = np.asarray(a), np.asarray(b)
      err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
      assert err <= RTOL, f"step {step}: relative error {err:.2e} > {RTOL}"


def engine_state(state):
  return engine.find_states(state)[0]


def assert_padding_is_identity(state):
  """Real blocks as unsharded; padded blocks hold zero stats, identity roots."""
  for group, n in zip(engine_state(state).groups, GROUP_SIZES):
    for s, r in zip(group.stats, group.roots):
      eye = np.eye(s.shape[-1], dtype=np.float32)
      np.testing.assert_array_equal(np.asarray(s)[n:], 0.0)
      np.testing.assert_array_equal(np.asarray(r)[n:],
                                    np.broadcast_to(eye, r[n:].shape))


def assert_group_shardings(state, mesh, spec, devices_per_shard):
  """Every stacked leaf is P(spec) on ``mesh``; each shard holds N/size."""
  sharding = NamedSharding(mesh, P(spec))
  for group in engine_state(state).groups:
    for leaf in jax.tree_util.tree_leaves(group):
      assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
          leaf.sharding, sharding)
      n = leaf.shape[0]
      assert n % devices_per_shard == 0
      shapes = {s.data.shape for s in leaf.addressable_shards}
      assert shapes == {(n // devices_per_shard,) + leaf.shape[1:]}, shapes


def _local_root_blocks(text, markers):
  """``{d: most blocks}`` over the ``f32[…, d, d]`` shapes on the compiled
  HLO lines that contain one of ``markers`` (the root computations): the
  largest number of ``d × d`` blocks one device's root computation holds."""
  found = {}
  for line in text.splitlines():
    if any(m in line for m in markers):
      for lead, d, e in re.findall(r"f32\[((?:\d+,)*)(\d+),(\d+)\]", line):
        if d == e and int(d) > 1:  # block dims are never 1 (squeezed)
          k = math.prod(int(x) for x in lead.split(",") if x)
          found[int(d)] = max(found.get(int(d), 0), k)
  return found


def _check_matches_single_device(method, markers):
  """Sharded Shampoo equals single-device Shampoo over refreshes; the
  compiled update does the root computation on the local blocks only."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  params = make_params()
  want, _ = run(shampoo_tx(method), params)
  tx = shampoo_tx(method, shard_axis="x", mesh=mesh)
  got, states = run(tx, params)
  assert_updates_close(got, want)
  final = engine_state(states[-1])
  assert int(final.failures) == 0 and int(final.skipped) == 0
  assert_padding_is_identity(states[-1])
  text = jax.jit(tx.update).lower(
      grads_at(params, 0), states[-1], params).compile().as_text()
  local = _local_root_blocks(text, markers)
  assert local == LOCAL_BLOCKS, (method, local)


def check_matches_single_device_eigh():
  """eigh: the LAPACK custom-calls and the CPU loop over them (see
  kronopt.linalg.lapack) hold at most N/8 blocks per device."""
  _check_matches_single_device(
      "eigh", ('custom_call_target="lapack_ssyevd', " while("))


def check_matches_single_device_newton():
  """Coupled Newton: the batched while-loops carry [N/8, d, d] matrices."""
  _check_matches_single_device("newton", (" while(",))


def check_zero_statistics_roots_pass_guard():
  """An identity (padding) block's zero statistics give a finite root that
  passes the guard, with eigh and with Newton."""
  for method in ("eigh", "newton"):
    precond = shampoo_lib.Shampoo(root_method=method)
    state = precond.init_group((8, 8), 2)
    candidate, residual = precond.refresh(state)
    assert bool(jnp.all(engine._block_ok(candidate, residual, 0.1))), method


class _FailsOnZeroStats(shampoo_lib.Shampoo):
  """Shampoo whose refresh reports an infinite residual for zero statistics."""

  def refresh(self, state, ctx=None):
    candidate, residual = super().refresh(state, ctx)
    zero = jnp.all(state.stats[0] == 0.0, axis=(1, 2))
    return candidate, jnp.where(zero, jnp.inf, residual)


def check_padding_never_counts_as_failure():
  """Padded blocks are masked out of the guard, whatever their refresh."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  tx = engine.preconditioner_transform(
      _FailsOnZeroStats(), block_size=BLOCK, precondition_every=2,
      start_preconditioning_step=1, inverse_failure_threshold=0.1,
      shard_axis="x", mesh=mesh)
  _, states = run(tx, make_params(), steps=3)
  final = engine_state(states[-1])
  assert int(final.failures) == 0, int(final.failures)
  assert float(final.residual) < 0.1, float(final.residual)


def check_declared_shardings():
  """The stacked leaves carry P(shard_axis) after init (eager and jit), after
  updates and in the compiled update's output shardings, without pinning;
  state_shardings() declares them, and pins the whole state (also the
  graft's leaves) as out_shardings. Each device holds N/8 blocks."""
  mesh = jax.make_mesh((2, 4), ("d", "m"), axis_types=AUTO)
  axes = ("d", "m")
  params = make_params()
  tx = kronopt.shampoo(1e-2, block_size=BLOCK, precondition_every=2,
                       start_preconditioning_step=1, shard_axis=axes,
                       mesh=mesh)
  declared = kronopt.state_shardings(tx, params, mesh)
  abstract = jax.eval_shape(tx.init, params)
  assert (jax.tree_util.tree_structure(declared)
          == jax.tree_util.tree_structure(abstract))
  for s, a in zip(jax.tree_util.tree_leaves(declared),
                  jax.tree_util.tree_leaves(abstract)):
    assert isinstance(s, NamedSharding) and s.mesh == mesh
    stacked = (a.ndim == 3 and a.shape[0] in (16, 8)
               and a.shape[1] == a.shape[2])
    want = P(axes) if stacked else P()
    assert s.is_equivalent_to(NamedSharding(mesh, want), a.ndim), (s, a)

  eager = tx.init(params)
  assert_group_shardings(eager, mesh, axes, 8)
  abstract_shapes = [(x.shape, x.dtype)
                     for x in jax.tree_util.tree_leaves(abstract)]
  _, states = run(tx, params, steps=3, out_shardings=declared)
  for state in states:
    assert_group_shardings(state, mesh, axes, 8)
    assert abstract_shapes == [(x.shape, x.dtype)
                               for x in jax.tree_util.tree_leaves(state)]
    for got, want in zip(jax.tree_util.tree_leaves(state),
                         jax.tree_util.tree_leaves(declared)):
      assert got.sharding.is_equivalent_to(want, got.ndim), (got, want)
  compiled = jax.jit(tx.update).lower(  # unpinned: the engine's constraints
      grads_at(params, 0), eager, params).compile()
  out_groups = engine.find_states(compiled.output_shardings[1])[0].groups
  for got in jax.tree_util.tree_leaves(out_groups):
    assert got.is_equivalent_to(NamedSharding(mesh, P(axes)), 3), got


def _kfac_with_stats(method, **kw):
  """K-FAC of one dense layer ``a`` (32×24; N = 1, padded to 8 when
  sharded), its statistics taken from the gradient so that run() passes
  none; rank 6 puts both factors on Brand's QR path and the RSVD below d."""
  tx = kronopt.scale_by_kfac(
      method=method, rank=6, layers={"a": kronopt.KFACLayer.dense(None)},
      cov_every=1, inverse_every=2, start_preconditioning_step=1, **kw)

  def update(g, state, params=None, **extra):
    stats = {"a": kronopt.KFACStats(g["a"][:, :5], g["a"].T[:, :5])}
    return tx.update(g, state, params, kfac_stats=stats, **extra)

  return optax.GradientTransformationExtraArgs(tx.init, update)


OTHER_ALGORITHMS = {
    "caspr": lambda **kw: kronopt.scale_by_caspr(**COMMON, **kw),
    "sketchy": lambda **kw: kronopt.scale_by_sketchy(rank=4, **COMMON, **kw),
    "kradagrad_star": lambda **kw: kronopt.scale_by_kradagrad(
        variant="star", **COMMON, **kw),
    "kradagrad_single_axis": lambda **kw: kronopt.scale_by_kradagrad(
        variant="single_axis", **COMMON, **kw),
    "shampoo2_alias": lambda **kw: kronopt.shampoo2(1e-2, **COMMON, **kw),
    **{f"kfac_{m}": functools.partial(_kfac_with_stats, m)
       for m in ("eigh", "rsvd", "brand", "brand_rsvd", "brand_corrected")},
    # Bases from eigh at count 0 (8×8 blocks: one gradient is full rank),
    # QR at count 2; M and V are [N, 8, 8] leaves sharded like the factors.
    "soap_alias": lambda **kw: kronopt.soap(
        1e-2, **dict(COMMON, start_preconditioning_step=0), **kw),
}
COMMON = dict(block_size=BLOCK, precondition_every=2,
              start_preconditioning_step=1)


def check_other_algorithms_match_single_device():
  """Every engine-built preconditioner (and an alias) shards the same way:
  same updates as one device, stacked leaves P("x") with N/8 per device."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  params = {"a": jnp.zeros((32, 24))}  # [12, 8, 8] -> 16 padded
  for name, make in OTHER_ALGORITHMS.items():
    want, _ = run(make(), params, steps=4)
    got, states = run(make(shard_axis="x", mesh=mesh), params, steps=4)
    try:
      assert_updates_close(got, want)
      assert_group_shardings(states[-1], mesh, "x", 8)
      assert int(engine_state(states[-1]).failures) == 0
    except AssertionError as e:
      raise AssertionError(f"{name}: {e}") from e


def check_optax_wrappers():
  """Sharded Shampoo inside optax.masked (MaskedNode leaves),
  optax.MultiSteps and optax.inject_hyperparams: the stacked leaves stay
  sharded, and the injected optimizer equals the plain one."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  params = {"a": jnp.zeros((32, 24)), "b": jnp.zeros((8, 8))}
  kw = dict(COMMON, shard_axis="x", mesh=mesh)
  plain, _ = run(kronopt.shampoo(1e-2, **kw), params, steps=3)
  injected = optax.inject_hyperparams(
      kronopt.shampoo, static_args=tuple(kw))(learning_rate=1e-2, **kw)
  got, states = run(injected, params, steps=3)
  assert_updates_close(got, plain)
  assert_group_shardings(states[-1], mesh, "x", 8)
  masked = optax.masked(kronopt.scale_by_shampoo(**kw),
                        {"a": True, "b": False})
  _, states = run(masked, params, steps=3)
  assert_group_shardings(states[-1], mesh, "x", 8)
  multi = optax.MultiSteps(kronopt.shampoo(1e-2, **kw), every_k_schedule=2)
  _, states = run(multi, params, steps=4)
  assert_group_shardings(states[-1], mesh, "x", 8)
  assert int(engine_state(states[-1]).count) == 2


def check_fsdp_2x4():
  """Parameters sharded over one mesh axis ("data", FSDP), the block axis
  over the other ("model"): same updates as one device, N/4 per device."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=AUTO)
  params = make_params()
  fsdp = {k: NamedSharding(mesh, P("data") if v.shape[0] % 2 == 0 else P())
          for k, v in params.items()}
  sharded_params = jax.device_put(params, fsdp)
  want, _ = run(shampoo_tx(), params)
  tx = shampoo_tx(shard_axis="model", mesh=mesh)
  got, states = run(tx, sharded_params)
  assert_updates_close(got, want)
  for state in states:
    assert_group_shardings(state, mesh, "model", 4)
  assert_padding_is_identity(states[-1])


def check_explicit_ambient_mesh():
  """Explicit mesh axes from the ambient mesh (jax.set_mesh, mesh=None),
  parameters sharded over another explicit axis: same updates, sharded
  state, updates sharded like the parameters."""
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  params = {"a": jnp.zeros((20, 12)), "b": jnp.zeros((8, 8))}
  fsdp = NamedSharding(mesh, P("data"))
  sharded_params = jax.device_put(params, fsdp)
  want, _ = run(shampoo_tx(), params, steps=3)
  got, states = run(shampoo_tx(shard_axis="model"), sharded_params, steps=3,
                    mesh=mesh)
  assert_updates_close(got, want)
  for state in states:
    assert_group_shardings(state, mesh, "model", 4)
  for u in jax.tree_util.tree_leaves(got[-1]):
    assert u.sharding.is_equivalent_to(fsdp, u.ndim), u.sharding


def check_explicit_mesh_other_algorithms():
  """Sketchy and SOAP on FSDP parameters over Explicit mesh axes: the same
  updates as one device, and every state leaf's type (sharding included)
  unchanged by an update. Sketchy also with ``shard_axis``; SOAP's QR
  refresh with its block axis sharded over an Explicit axis is refused by
  ``jnp.linalg.qr``'s own sharding rule (jax 0.10), so SOAP runs without
  ``shard_axis`` there."""
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  params = {"a": jnp.zeros((32, 24))}
  sharded = jax.device_put(params, NamedSharding(mesh, P("data")))
  types = lambda s: [jax.typeof(x) for x in jax.tree_util.tree_leaves(s)]
  for name, sharding_kw in (("sketchy", {}),
                            ("sketchy", {"shard_axis": "model",
                                         "mesh": mesh}),
                            ("soap_alias", {})):
    make = OTHER_ALGORITHMS[name]
    want, _ = run(make(), params, steps=4)
    try:
      got, states = run(make(**sharding_kw), sharded, steps=4, mesh=mesh)
      assert_updates_close(got, want)
      assert types(states[1]) == types(states[-1])
    except Exception as e:
      raise AssertionError(f"{name} {sorted(sharding_kw)}: {e}") from e


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items())
          if name.startswith("check_") and callable(fn)}


def main(names):
  assert jax.device_count() == 8, jax.devices()
  failed = 0
  for name in names or sorted(CHECKS):
    start = time.perf_counter()
    try:
      CHECKS[name]()
      print(f"PASS {name} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception:  # pylint: disable=broad-except
      failed += 1
      print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
  return failed


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
