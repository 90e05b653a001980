"""What the NNX and linen captures share: taps, rows and statistics trees.

A capture registers each supported layer explicitly (no jaxpr matching) as
an :class:`Entry`: the key path of its kernel, its
:class:`kronopt.preconditioners.kfac_layers.KFACLayer` and a function that
turns one call's input ``x`` and output gradient ``∂L/∂y`` into rows.

The statistics come from the same forward and backward pass as the gradient:
each registered call's output ``y`` is replaced by ``y + p`` with ``p = 0``
a perturbation that is differentiated along with the parameters, so
``∂L/∂p = ∂L/∂y`` (the perturbation trick of ``flax.linen.Module.perturb``),
and its input is returned as an auxiliary output. A first abstract pass
(``eval_shape``, no computation) gives the shapes of the perturbations. A
layer called several times (shared weights) contributes the rows of every
call.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.linen import linear as linen_linear

from kronopt.preconditioners import kfac_layers


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered layer.

  Attributes:
    key: the key path of its kernel in the parameters.
    spec: how the kernel is matricised.
    rows: ``(x, dy) -> (x_rows [n, d_in], dy_rows [n, d_out])`` for a call.
  """
  key: tuple
  spec: kfac_layers.KFACLayer
  rows: Callable[[Any, Any], tuple]


class Recorder:
  """Trace-time record of the registered layers' calls.

  With ``perturbations=None`` (the shape pass) it records each call's output
  shape; otherwise it adds the call's perturbation to the output. Either way
  it records the inputs.
  """

  def __init__(self, num_layers: int, perturbations=None):
    self.perturbations = perturbations
    self.inputs = [[] for _ in range(num_layers)]
    self.shapes = [[] for _ in range(num_layers)]

  def tap(self, index: int, x, y):
    calls = self.inputs[index]
    calls.append(x)
    if self.perturbations is None:
      self.shapes[index].append(jax.ShapeDtypeStruct(y.shape, y.dtype))
      return y
    mine = self.perturbations[index]
    if len(calls) > len(mine):
      raise RuntimeError(
          "kronopt.flax: a registered layer was called more often than in "
          "the shape pass; the loss function must call the model the same "
          "way every time it is traced.")
    return y + mine[len(calls) - 1]

  def zeros(self):
    """The zero perturbations of the calls recorded in a shape pass."""
    return [[jnp.zeros(s.shape, s.dtype) for s in calls]
            for calls in self.shapes]


def build_stats(entries, inputs, output_grads) -> list:
  """Per entry, the :class:`KFACStats` of all its calls (``None``: no call)."""
  out = []
  for entry, xs, dys in zip(entries, inputs, output_grads):
    if not xs:
      out.append(None)
      continue
    rows = [entry.rows(x, dy) for x, dy in zip(xs, dys)]
    x = jnp.concatenate([r[0] for r in rows], axis=0)
    dy = jnp.concatenate([r[1] for r in rows], axis=0)
    out.append(kfac_layers.stats_from_rows(
        x, dy, bias=entry.spec.bias is not None))
  return out


def tree_like(params, by_key: dict):
  """A tree like ``params`` with ``by_key[key]`` at each leaf (else None)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: by_key.get(kfac_layers.path_key(path)), params)


def layers_tree(params, entries):
  return tree_like(params, {e.key: e.spec for e in entries})


def stats_tree(params, entries, stats):
  return tree_like(params, {e.key: s for e, s in zip(entries, stats)})


def normalize_axes(axes, ndim: int) -> tuple:
  """Flax's normalisation of contraction axes: non-negative, sorted."""
  return tuple(sorted(a if a >= 0 else ndim + a for a in axes))


def linear_rows(axis=(-1,)):
  """Rows of a dense or DenseGeneral call contracting the input's ``axis``.

  The contracted axes (sorted, as Flax contracts them with the kernel's
  leading axes) are moved last and flattened; all other axes are rows.
  """

  def rows(x, dy):
    ax = normalize_axes(axis, x.ndim)
    k = len(ax)
    x = jnp.moveaxis(x, ax, tuple(range(x.ndim - k, x.ndim)))
    x = jnp.reshape(x, (-1, math.prod(x.shape[x.ndim - k:])))
    return x, jnp.reshape(dy, (x.shape[0], -1))

  return rows


def _broadcast(x, n):
  if x is None:
    x = 1
  if isinstance(x, int):
    return (x,) * n
  return tuple(x)


def conv_rows(kernel_size, strides=1, padding="SAME", input_dilation=1,
              kernel_dilation=1):
  """Rows of a (shared-weight, ungrouped) convolution call: its patches.

  Replicates Flax's ``Conv`` (batch axes flattened or added, ``CIRCULAR``,
  ``REFLECT`` and ``CAUSAL`` padding by padding the input) and extracts the
  patches with ``lax.conv_general_dilated_patches``, whose features come as
  ``(c_in, *window)``; they are reordered to the kernel's ``(*window,
  c_in)``. Each output position is a row.
  """
  kernel_size = tuple(kernel_size)
  nd = len(kernel_size)

  def rows(x, dy):
    lead = x.ndim - (nd + 1)
    if lead == 0:
      x, dy = x[None], dy[None]
    elif lead > 1:
      x = jnp.reshape(x, (-1,) + x.shape[lead:])
      dy = jnp.reshape(dy, (-1,) + dy.shape[lead:])
    dilation = _broadcast(kernel_dilation, nd)
    pad = linen_linear.canonicalize_padding(padding, nd)
    if pad in ("CIRCULAR", "REFLECT"):
      sizes = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
      pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in sizes] + [(0, 0)]
      x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap",
                                 "REFLECT": "reflect"}[pad])
      pad = "VALID"
    elif pad == "CAUSAL":
      x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0),
                      (0, 0)])
      pad = "VALID"
    lhs = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
    rhs = (x.ndim - 1, x.ndim - 2) + tuple(range(x.ndim - 2))
    numbers = jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel_size, _broadcast(strides, nd), pad,
        lhs_dilation=_broadcast(input_dilation, nd), rhs_dilation=dilation,
        dimension_numbers=numbers)
    c = x.shape[-1]
    patches = jnp.reshape(patches, patches.shape[:-1] + (c,) + kernel_size)
    patches = jnp.moveaxis(patches, -nd - 1, -1)
    return (jnp.reshape(patches, (-1, c * math.prod(kernel_size))),
            jnp.reshape(dy, (-1, dy.shape[-1])))

  return rows
