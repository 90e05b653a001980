"""Layout: squeeze, merge, split, pad, stack (docs/algorithms.md §0, Layout)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kronopt import layout


@pytest.mark.parametrize("shape, block_size, expected", [
    ((3, 3, 64, 128), 1024, (576, 128)),   # conv kernel
    ((16, 32), 1024, (16, 32)),            # never merged below rank 2
    ((2, 3, 4), 1024, (6, 4)),
    ((1, 7, 1, 9), 1024, (7, 9)),          # unit dims squeezed
    ((40, 50, 60), 64, (40, 50, 60)),      # nothing fits: order 3
    ((2, 2, 3, 4), 4, (4, 3, 4)),
    ((5,), 1024, None),                    # bias
    ((1, 5), 1024, None),
    ((), 1024, None),
])
def test_kronecker_shape(shape, block_size, expected):
  assert layout.kronecker_shape(shape, block_size) == expected
  assert layout.is_preconditioned(shape) == (expected is not None)


def test_blocks_groups_and_roundtrip():
  params = {"a": jnp.arange(13 * 7, dtype=jnp.float32).reshape(13, 7),
            "b": jnp.ones((5,)), "c": jnp.ones((5, 5), jnp.bfloat16)}
  lay = layout.make_layout(params, block_size=5)
  # 13x7 -> grid 3x2 of 5x5 blocks (padded), 5x5 -> one more 5x5 block.
  assert lay.group_shapes == ((5, 5),)
  assert lay.group_sizes == (7,)
  leaves = dict(zip(sorted(params), lay.leaves))
  assert leaves["b"] is None and leaves["a"].grid == (3, 2)
  assert leaves["c"].offset == 6
  groups = layout.block(lay, params)
  assert groups[0].shape == (7, 5, 5) and groups[0].dtype == jnp.float32
  # Block (i, j) of "a" is rows 5i.., cols 5j.. zero-padded.
  a = np.asarray(params["a"])
  padded = np.zeros((15, 10), np.float32)
  padded[:13, :7] = a
  for i in range(3):
    for j in range(2):
      np.testing.assert_array_equal(groups[0][2 * i + j],
                                    padded[5 * i:5 * i + 5, 5 * j:5 * j + 5])
  back = layout.unblock(lay, groups, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  assert back["c"].dtype == jnp.bfloat16


def test_layout_of_shape_structs_matches_arrays():
  params = {"k": jnp.ones((3, 3, 8, 16)), "w": jnp.ones((40, 24))}
  structs = jax.eval_shape(lambda p: p, params)
  assert layout.make_layout(structs, 16) == layout.make_layout(params, 16)
