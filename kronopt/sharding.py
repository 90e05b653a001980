"""Sharding the stacked block axis over a device mesh (docs/sharding.md).

Every group of an engine-built preconditioner is one ``[N, *block]`` stack.
With ``shard_axis`` set, ``N`` is padded to a multiple of the size of the
named mesh axis (or axes) with identity blocks (zero statistics, identity
roots, zero gradient) and every group-state leaf, and the gradient blocks, are
constrained to ``NamedSharding(mesh, P(shard_axis))``: each device stores,
updates and refreshes only its ``N / size`` blocks. XLA's SPMD partitioner
does the rest (no pmap, no hand-written communication).

The mesh is the ``mesh=`` given to the transform or, if none, JAX's ambient
mesh (``with jax.set_mesh(mesh):``). Mesh axes may be ``Auto`` (the
constraint is ``jax.lax.with_sharding_constraint``) or ``Explicit`` (the
constraint is ``jax.sharding.reshard``).

Parameters sharded over ``Explicit`` mesh axes (their sharding is part of
their type, ``jax.typeof(x).sharding``) are gathered before blocking and the
updates are given the parameters' sharding back, with or without
``shard_axis``: blocking reshapes and pads across dimensions, which Explicit
sharding does not allow on sharded dimensions.

:func:`state_shardings` gives the shardings of a whole optax state, for
``jit(..., out_shardings=...)`` and for restoring checkpoints.
"""

import dataclasses
import math
from typing import Any, Optional, Union

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ShardAxis = Union[None, str, tuple]


def _axis_names(shard_axis) -> tuple:
  return (shard_axis,) if isinstance(shard_axis, str) else tuple(shard_axis)


def check_shard_axis(shard_axis: ShardAxis, mesh) -> None:
  """Construction-time validation of ``shard_axis`` and ``mesh``.

  Raises:
    ValueError: ``shard_axis`` is not a mesh axis name or a tuple of distinct
      names, ``mesh`` is not a ``jax.sharding.Mesh``, a name is not an axis of
      ``mesh``, or ``mesh`` is given without ``shard_axis``.
  """
  if shard_axis is None:
    if mesh is not None:
      raise ValueError(f"mesh={mesh!r} was given with shard_axis=None; expected "
                       "shard_axis to name the mesh axis (or axes) to shard "
                       "the block axis over.")
    return
  names = _axis_names(shard_axis) if isinstance(shard_axis, (str, tuple)) else ()
  if (not names or not all(isinstance(a, str) for a in names)
      or len(set(names)) != len(names)):
    raise ValueError(f"shard_axis={shard_axis!r} is not valid; expected None, "
                     "a mesh axis name (str) or a non-empty tuple of distinct "
                     "axis names.")
  if mesh is None:
    return
  if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
    raise ValueError(f"mesh={mesh!r} is not valid; expected a "
                     "jax.sharding.Mesh (or None for the ambient mesh).")
  _check_names_in(names, mesh)


def _check_names_in(names, mesh):
  missing = [a for a in names if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"shard_axis={names!r} names axes {missing!r} that are "
                     f"not in the mesh; expected names among "
                     f"{tuple(mesh.axis_names)!r}.")


@dataclasses.dataclass(frozen=True)
class BlockSharding:
  """Shards the leading (block) axis of stacked groups over mesh axes.

  Attributes:
    shard_axis: mesh axis name or tuple of names; ``None`` disables sharding.
    mesh: a ``jax.sharding.Mesh``; ``None`` uses the ambient mesh at trace
      time.
  """
  shard_axis: ShardAxis = None
  mesh: Optional[Any] = None

  @property
  def enabled(self) -> bool:
    return self.shard_axis is not None

  def _mesh(self):
    """The mesh to shard over: the given one, else the ambient one."""
    if self.mesh is not None:
      return self.mesh
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      raise ValueError(
          f"shard_axis={self.shard_axis!r} needs a mesh: pass mesh= to the "
          "transform or call init/update under `with jax.set_mesh(mesh):`.")
    _check_names_in(_axis_names(self.shard_axis), mesh)
    return mesh

  def size(self) -> int:
    """Number of devices along ``shard_axis`` (1 when disabled)."""
    if not self.enabled:
      return 1
    shape = dict(self._mesh().shape)
    return math.prod(shape[a] for a in _axis_names(self.shard_axis))

  def padded(self, n: int) -> int:
    """``n`` rounded up to a multiple of :meth:`size`."""
    size = self.size()
    return -(-n // size) * size

  def _explicit(self, mesh) -> bool:
    """Whether the shard axes are Explicit (else Auto) in ``mesh``."""
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    kinds = {types[a] for a in _axis_names(self.shard_axis)}
    if kinds == {AxisType.Explicit}:
      return True
    if kinds == {AxisType.Auto}:
      return False
    raise ValueError(f"shard_axis={self.shard_axis!r} has mesh axis types "
                     f"{sorted(map(str, kinds))}; expected all Auto or all "
                     "Explicit (not Manual, e.g. inside shard_map).")

  def constrain(self, x, n: int):
    """Shards a leaf whose leading axis is the block axis of length ``n``.

    Leaves of rank 0 or with another leading length are left as they are.
    """
    if not self.enabled or x.ndim == 0 or x.shape[0] != n:
      return x
    mesh = self._mesh()
    sharding = NamedSharding(mesh, P(_axis_names(self.shard_axis)))
    if self._explicit(mesh):
      return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)

  def constrain_tree(self, tree, n: int):
    """:meth:`constrain` on every leaf of ``tree``."""
    return jax.tree_util.tree_map(lambda x: self.constrain(x, n), tree)

  def gather(self, x):
    """Replicates ``x`` over Explicit mesh axes it is sharded on.

    Blocking reshapes and slices a parameter across its dimensions, which
    Explicit sharding does not allow on sharded dimensions; under Auto axes
    XLA inserts the communication itself and ``x`` is returned unchanged.
    This holds whether or not the blocks are sharded (``shard_axis``).
    """
    sharding = type_sharding(x)
    if not _is_sharded(sharding):
      return x
    return jax.sharding.reshard(x, NamedSharding(sharding.mesh, P()))

  def restore(self, x, like):
    """Gives ``x`` the Explicit sharding of ``like`` (see :meth:`gather`)."""
    sharding = type_sharding(like)
    if not _is_sharded(sharding):
      return x
    return jax.sharding.reshard(x, sharding)


def type_sharding(x):
  """The sharding in ``x``'s type (set by Explicit mesh axes), or ``None``."""
  return getattr(jax.typeof(x), "sharding", None)


def _is_sharded(sharding) -> bool:
  """Whether a (type) sharding splits some dimension over mesh axes."""
  spec = getattr(sharding, "spec", None)
  return spec is not None and any(s is not None for s in spec)


def _param_sharding(x, mesh):
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, NamedSharding):
    return sharding
  return NamedSharding(mesh, P())


def state_shardings(tx, params, mesh):
  """The ``NamedSharding`` of every leaf of ``tx.init(params)`` on ``mesh``.

  ``tx.init`` is lowered and compiled (not run) under ``jax.set_mesh(mesh)``
  with the parameters' own shardings (``NamedSharding`` of arrays or of
  ``jax.ShapeDtypeStruct``; anything else is taken as replicated). The result
  is a pytree with the structure of ``jax.eval_shape(tx.init, params)``,
  usable as ``jit(..., out_shardings=...)`` or to restore a checkpoint. The
  block-axis constraints of a sharded kronopt preconditioner show up as
  ``P(shard_axis)``; leaves XLA does not shard are replicated (``P()``).

  The engine constrains its stacked leaves in every update; other leaves
  (e.g. the graft's Adam moments) get whatever sharding XLA propagates unless
  the update is jitted with ``out_shardings=(..., state_shardings(...))``.
  Under Explicit mesh axes, leaves created like the parameters (``zeros_like``)
  follow the parameters' sharding.

  Args:
    tx: an optax transformation (anything with ``init``).
    params: a tree of arrays or ``jax.ShapeDtypeStruct``.
    mesh: the ``jax.sharding.Mesh`` the state lives on.

  Returns:
    A pytree of ``NamedSharding`` matching the state.
  """
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh={mesh!r} is not valid; expected a "
                     "jax.sharding.Mesh.")
  in_shardings = jax.tree_util.tree_map(lambda x: _param_sharding(x, mesh),
                                        params)
  abstract = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params, in_shardings)
  with jax.set_mesh(mesh):
    compiled = jax.jit(tx.init, in_shardings=(in_shardings,)).lower(
        abstract).compile()
  replicated = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
      lambda s: s if isinstance(s, NamedSharding) else replicated,
      compiled.output_shardings)
