"""Parameter shapes -> matrix blocks -> stacked groups (ALGORITHMS.md §0, Layout).

The layout is a pure function of the parameters' shapes and ``block_size``; it
is recomputed at trace time and never stored in optimizer state.

For one parameter of shape ``S``:

1. dimensions of size 1 are squeezed; a result of rank ≤ 1 is not
   Kronecker-preconditioned (:func:`kronecker_shape` returns ``None``);
2. adjacent dimensions are merged left to right while the product stays
   ``≤ block_size`` and at least two dimensions remain (``3×3×64×128`` becomes
   ``576×128`` at ``block_size=1024``);
3. every dimension larger than ``block_size`` is cut into blocks of
   ``block_size``, the last one zero-padded.

Blocks of equal shape, across all parameters, are stacked into one
``[N, b₁, …, b_k]`` array (a *group*), so every per-block computation is one
batched call. Zero padding stays zero: it adds nothing to ``G Gᵀ`` and the
padded part of every update is cut off by :func:`unblock`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax


def _squeeze(shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(int(d) for d in shape if d != 1)


def kronecker_shape(shape: Sequence[int], block_size: int
                    ) -> Optional[tuple[int, ...]]:
  """The merged tensor shape that is blocked, or ``None`` for rank ≤ 1."""
  dims = _squeeze(shape)
  if len(dims) <= 1:
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
  """Whether a parameter of this shape gets Kronecker factors (rank ≥ 2)."""
  return len(_squeeze(shape)) >= 2


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
  """
  shape: tuple[int, ...]
  merged: tuple[int, ...]
  block: tuple[int, ...]
  grid: tuple[int, ...]
  group: int
  offset: int

  @property
  def num_blocks(self) -> int:
    return math.prod(self.grid)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The layout of a whole parameter tree.

  Attributes:
    treedef: tree structure of the parameters.
    leaves: per leaf, a :class:`LeafLayout` or ``None`` (not preconditioned,
      including ``optax.MaskedNode`` leaves).
    group_shapes: per group, the block shape.
    group_sizes: per group, the number of stacked blocks ``N``.
  """
  treedef: Any
  leaves: tuple[Optional[LeafLayout], ...]
  group_shapes: tuple[tuple[int, ...], ...]
  group_sizes: tuple[int, ...]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _block_shape(merged, block_size):
  block = tuple(min(d, block_size) for d in merged)
  grid = tuple(-(-d // block_size) for d in merged)
  return block, grid


def make_layout(params, block_size: int) -> Layout:
  """Computes the :class:`Layout` of a tree of arrays (or shape structs)."""
  leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_masked)
  group_index: dict[tuple[int, ...], int] = {}
  sizes: list[int] = []
  out = []
  for leaf in leaves:
    merged = None if _is_masked(leaf) else kronecker_shape(
        leaf.shape, block_size)
    if merged is None:
      out.append(None)
      continue
    block, grid = _block_shape(merged, block_size)
    if block not in group_index:
      group_index[block] = len(sizes)
      sizes.append(0)
    g = group_index[block]
    out.append(LeafLayout(tuple(leaf.shape), merged, block, grid, g, sizes[g]))
    sizes[g] += math.prod(grid)
  shapes = tuple(sorted(group_index, key=group_index.get))
  return Layout(treedef, tuple(out), shapes, tuple(sizes))


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
