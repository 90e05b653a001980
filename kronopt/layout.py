"""Parameter shapes -> matrix blocks -> stacked groups (docs/algorithms.md §0).

The layout is a pure function of the parameters' shapes and the config; it is
recomputed at trace time and never stored in optimizer state.

For one parameter of shape ``S``:

1. dimensions of size 1 are squeezed; a result of rank ≤ 1, or a parameter
   with no entries, is not Kronecker-preconditioned
   (:func:`kronecker_shape` returns ``None``);
2. adjacent dimensions are merged left to right while the product stays
   ``≤ block_size`` and at least two dimensions remain (``3×3×64×128`` becomes
   ``576×128`` at ``block_size=1024``);
3. a merged dimension larger than ``max_precond_dim`` is not preconditioned
   (it gets no factor, and is not split); a parameter left with no
   preconditioned dimension is not preconditioned at all;
4. every other dimension larger than ``block_size`` is cut into blocks of
   ``block_size``, the last one zero-padded.

Blocks of equal shape and equal preconditioned axes, across all parameters,
are stacked into one ``[N, b₁, …, b_k]`` array (a *group*), so every
per-block computation is one batched call. Zero padding stays zero: it adds
nothing to ``G Gᵀ`` and the padded part of every update is cut off by
:func:`unblock`. :meth:`Layout.real_sizes` tells an algorithm, per block and
axis, how many coordinates are real (SOAP keeps padding out of its rotation).

A :class:`Layout` is what :func:`kronopt.engine.preconditioner_transform`
calls a layout: ``block``/``unblock``, ``real_sizes``, ``block_aux`` (none
here) and ``covered`` (which leaves it preconditions). K-FAC brings a layout
of its own with the same methods.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kronopt import checks


def _squeeze(shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(d) for d in shape if d != 1)


def kronecker_shape(shape: Sequence[int], block_size: int
                    ) -> Optional[tuple[int, ...]]:
  """The merged tensor shape that is blocked, or ``None`` (rank ≤ 1, empty)."""
  dims = _squeeze(shape)
  if len(dims) <= 1 or 0 in dims:
    return None
  merged = [dims[0]]
  for i, d in enumerate(dims[1:], start=1):
    remaining_after = len(dims) - i - 1  # dims not yet visited after this one
    fits = merged[-1] * d <= block_size
    keeps_two = len(merged) + remaining_after >= 2
    if fits and keeps_two:
      merged[-1] *= d
    else:
      merged.append(d)
  return tuple(merged)


def is_preconditioned(shape: Sequence[int]) -> bool:
  """Whether a parameter of this shape can get Kronecker factors (rank ≥ 2).

  The default rule of :func:`kronopt.graft` for directions that do not say
  which leaves they precondition.
  """
  dims = _squeeze(shape)
  return len(dims) >= 2 and 0 not in dims


@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """How one parameter is cut into blocks.

  Attributes:
    shape: the parameter's shape.
    merged: the merged tensor shape (after squeezing and merging).
    block: the shape of each block.
    grid: the number of blocks along each merged dimension.
    group: index of the group the blocks are stacked in.
    offset: index of this parameter's first block inside the group.
    axes: the merged dimensions that are preconditioned.
  """
  shape: tuple[int, ...]
  merged: tuple[int, ...]
  block: tuple[int, ...]
  grid: tuple[int, ...]
  group: int
  offset: int
  axes: tuple[int, ...] = ()

  @property
  def num_blocks(self) -> int:
    return math.prod(self.grid)

  def real_sizes(self) -> list[np.ndarray]:
    """Per axis, the real (unpadded) extent of each block, in block order."""
    index = np.indices(self.grid).reshape(len(self.grid), -1)
    return [np.minimum(b, d - j * b).astype(np.int32)
            for d, b, j in zip(self.merged, self.block, index)]


@dataclasses.dataclass(frozen=True)
class Layout:
  """The layout of a whole parameter tree.

  Attributes:
    treedef: tree structure of the parameters.
    leaves: per leaf, a :class:`LeafLayout` or ``None`` (not preconditioned,
      including ``optax.MaskedNode`` leaves).
    group_shapes: per group, the block shape.
    group_sizes: per group, the number of stacked blocks ``N``.
    group_axes: per group, the block axes that are preconditioned.
  """
  treedef: Any
  leaves: tuple[Optional[LeafLayout], ...]
  group_shapes: tuple[tuple[int, ...], ...]
  group_sizes: tuple[int, ...]
  group_axes: tuple[tuple[int, ...], ...] = ()

  def block(self, tree) -> list:
    """See :func:`block`."""
    return block(self, tree)

  def unblock(self, groups, like):
    """See :func:`unblock`."""
    return unblock(self, groups, like)

  def real_sizes(self) -> list[tuple[np.ndarray, ...]]:
    """Per group, per axis, the real extent of each of its ``N`` blocks."""
    parts = [[] for _ in self.group_shapes]
    for lay in self.leaves:
      if lay is not None:
        parts[lay.group].append(lay.real_sizes())
    return [tuple(np.concatenate(axis) for axis in zip(*p)) for p in parts]

  def block_aux(self, extra_args) -> None:
    """Shampoo-family layouts take no auxiliary input."""
    del extra_args

  def covered(self) -> tuple[bool, ...]:
    """Per leaf (in ``treedef`` order), whether it is preconditioned."""
    return tuple(lay is not None for lay in self.leaves)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _block_shape(merged, axes, block_size):
  """Preconditioned dimensions are split at ``block_size``, others kept."""
  block = tuple(min(d, block_size) if i in axes else d
                for i, d in enumerate(merged))
  grid = tuple(-(-d // b) for d, b in zip(merged, block))
  return block, grid


def precond_axes(merged, max_precond_dim: Optional[int]) -> tuple[int, ...]:
  """The merged dimensions of size ``≤ max_precond_dim`` (all for ``None``)."""
  return tuple(i for i, d in enumerate(merged)
               if max_precond_dim is None or d <= max_precond_dim)


def _is_array_leaf(leaf) -> bool:
  """Inexact (float or complex) leaves are laid out; others are skipped."""
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def make_layout(params, block_size: int,
                max_precond_dim: Optional[int] = None) -> Layout:
  """Computes the :class:`Layout` of a tree of arrays (or shape structs).

  Args:
    params: a tree of arrays or ``jax.ShapeDtypeStruct`` (``MaskedNode``
      leaves, integer and ``float0`` leaves are not preconditioned).
    block_size: largest block dimension (≥ 2).
    max_precond_dim: merged dimensions larger than this get no factor (and
      are not split); ``None`` preconditions every dimension.

  Raises:
    ValueError: ``block_size`` is not an integer ``≥ 2`` or
      ``max_precond_dim`` not ``None`` or an integer ``≥ 1``.
  """
  checks.check_int("block_size", block_size, low=2, static=True)
  checks.check_int("max_precond_dim", max_precond_dim, low=1, allow_none=True,
                   static=True)
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_masked)
  group_index: dict[tuple, int] = {}
  sizes: list[int] = []
  out = []
  for leaf in leaves:
    merged = None
    if not _is_masked(leaf) and _is_array_leaf(leaf):
      merged = kronecker_shape(leaf.shape, block_size)
    axes = () if merged is None else precond_axes(merged, max_precond_dim)
    if not axes:
      out.append(None)
      continue
    block, grid = _block_shape(merged, axes, block_size)
    key = (block, axes)
    if key not in group_index:
      group_index[key] = len(sizes)
      sizes.append(0)
    g = group_index[key]
    out.append(LeafLayout(tuple(leaf.shape), merged, block, grid, g, sizes[g],
                          axes))
    sizes[g] += math.prod(grid)
  keys = sorted(group_index, key=group_index.get)
  return Layout(treedef, tuple(out), tuple(k[0] for k in keys), tuple(sizes),
                tuple(k[1] for k in keys))


def _to_blocks(x, lay: LeafLayout):
  """One parameter -> its ``[n, *block]`` blocks (float32, zero-padded)."""
  x = jnp.reshape(x.astype(jnp.float32), lay.merged)
  pad = [(0, g * b - d) for d, b, g in zip(lay.merged, lay.block, lay.grid)]
  x = jnp.pad(x, pad)
  k = len(lay.block)
  x = jnp.reshape(x, [s for gb in zip(lay.grid, lay.block) for s in gb])
  x = jnp.transpose(x, list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))
  return jnp.reshape(x, (lay.num_blocks,) + lay.block)


def _from_blocks(blocks, lay: LeafLayout, dtype):
  """Inverse of :func:`_to_blocks`: ``[n, *block]`` -> the parameter."""
  k = len(lay.block)
  x = jnp.reshape(blocks, lay.grid + lay.block)
  perm = [i for pair in zip(range(k), range(k, 2 * k)) for i in pair]
  x = jnp.transpose(x, perm)
  x = jnp.reshape(x, [g * b for g, b in zip(lay.grid, lay.block)])
  x = x[tuple(slice(0, d) for d in lay.merged)]
  return jnp.reshape(x, lay.shape).astype(dtype)


def block(layout: Layout, tree) -> list:
  """A tree laid out by ``layout`` -> a list of ``[N, *block]`` group arrays."""
  leaves = layout.treedef.flatten_up_to(tree)
  parts = [[] for _ in layout.group_shapes]
  for leaf, lay in zip(leaves, layout.leaves):
    if lay is not None:
      parts[lay.group].append(_to_blocks(leaf, lay))
  return [p[0] if len(p) == 1 else jnp.concatenate(p, axis=0) for p in parts]


def unblock(layout: Layout, groups: Sequence, like):
  """Group arrays -> a tree like ``like``; leaves without a layout are copied.

  Each parameter's blocks are cut out of its group, un-padded and cast to the
  dtype of the corresponding leaf of ``like``.
  """
  leaves = layout.treedef.flatten_up_to(like)
  out = []
  for leaf, lay in zip(leaves, layout.leaves):
    if lay is None:
      out.append(leaf)
    else:
      blocks = groups[lay.group][lay.offset:lay.offset + lay.num_blocks]
      out.append(_from_blocks(blocks, lay, leaf.dtype))
  return layout.treedef.unflatten(out)
