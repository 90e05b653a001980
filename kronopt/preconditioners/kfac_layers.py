"""K-FAC layer registration and statistics (docs/algorithms.md §6).

K-FAC (Martens & Grosse, "Optimizing neural networks with Kronecker-factored
approximate curvature", ICML 2015) preconditions each registered layer's
kernel, with its bias folded in, by two factors whose axes are *semantic*:
the layer's input features (plus 1 for the bias) and its output features.
This module says which parameter is which layer and carries the statistics.

**Registration.** A tree aligned with the parameters holds a
:class:`KFACLayer` at each registered kernel and ``None`` elsewhere; the
optimizer takes it at construction (``layers=``), because ``init`` only sees
shapes. The Flax helpers (:mod:`kronopt.flax`) build it from the model.
Without one, :func:`default_layers` applies to plain parameter trees: every
rank-2 leaf named ``kernel`` is a dense layer and every rank-4 one a 2-D
convolution, with the sibling leaf ``bias`` (if present) folded in.

**Matricisation.** A kernel's gradient becomes the ``d_a × d_g`` block

    G = [ ∇W_(in, out) ]   (the kernel's ``in_axes`` flattened to rows,
        [ ∇bᵀ          ]    its ``out_axes`` to columns; the bias row last)

so a dense kernel ``(d_in, d_out)`` gives ``d_a = d_in + 1`` and
``d_g = d_out``, a convolution ``(kh, kw, c_in, c_out)`` gives
``d_a = kh·kw·c_in + 1``, ``d_g = c_out``. The K-FAC direction
``V = (A + λI)^{-1} G (Γ + λI)^{-1}`` is written back to both leaves.

**Statistics.** Per registered kernel, a :class:`KFACStats` of the batch
matrices ``Â`` (``d_a × n``: the layer inputs ``ā_i``, with a 1 appended for
the bias, over ``√n``) and ``Γ̂`` (``d_g × n``: the output gradients
``∂L/∂y_i`` times ``√n``), passed to ``update`` as the keyword extra argument
``kfac_stats`` in a tree like the parameters (``None`` elsewhere). With a loss
that is a mean over the ``n`` rows (examples, or positions for sequences and
convolutions), ``Â Âᵀ`` and ``Γ̂ Γ̂ᵀ`` are the means of ``ā āᵀ`` and of the
per-row gradient outer products, and ``Â Γ̂ᵀ = G`` is the layer's gradient
(:func:`stats_from_rows`).
"""

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax


class KFACStats(NamedTuple):
  """One layer's batch statistics for K-FAC.

  Attributes:
    a: ``[d_a, n]`` activations ``Â`` (the bias row of ones last, if any).
    g: ``[d_g, n]`` output gradients ``Γ̂``.
  """
  a: jax.Array
  g: jax.Array

  @staticmethod
  def dense(inputs, output_grads, *, bias: bool,
            num_in: int = 1) -> "KFACStats":
    """The statistics of a dense layer's call (see :func:`dense_stats`)."""
    return dense_stats(inputs, output_grads, bias=bias, num_in=num_in)


@dataclasses.dataclass(frozen=True)
class KFACLayer:
  """A registered kernel: how its gradient is matricised (static).

  Attributes:
    in_axes: the kernel axes contracted with the layer input, in the order in
      which the input features are flattened (the rows of the block).
    out_axes: the kernel axes of the output features (the columns).
    bias: the name of the sibling leaf holding the bias (shaped like the
      ``out_axes``), or ``None``.
    kind: ``"dense"``, ``"conv"`` or ``"dense_general"`` (informative).
  """
  in_axes: tuple
  out_axes: tuple
  bias: Optional[str] = None
  kind: str = "dense"

  def check(self, shape: Sequence[int], where: str):
    axes = tuple(self.in_axes) + tuple(self.out_axes)
    if not self.in_axes or not self.out_axes or sorted(axes) != list(
        range(len(shape))):
      raise ValueError(
          f"layers: the KFACLayer at {where} has in_axes={self.in_axes} and "
          f"out_axes={self.out_axes}, which must split the axes "
          f"0..{len(shape) - 1} of its kernel of shape {tuple(shape)} into "
          "two non-empty sets.")

  def dims(self, shape: Sequence[int]) -> tuple[int, int]:
    """``(d_in, d_out)`` of a kernel of this ``shape`` (no bias row)."""
    return (math.prod(shape[i] for i in self.in_axes),
            math.prod(shape[i] for i in self.out_axes))

  @staticmethod
  def dense(bias: Optional[str] = "bias") -> "KFACLayer":
    """A dense kernel ``(d_in, d_out)`` (see :func:`dense`)."""
    return dense(bias)

  @staticmethod
  def conv(num_spatial: int = 2, bias: Optional[str] = "bias"
           ) -> "KFACLayer":
    """A convolution kernel ``(*window, c_in, c_out)``."""
    return conv(num_spatial, bias)

  @staticmethod
  def dense_general(num_in: int, num_out: int,
                    bias: Optional[str] = "bias") -> "KFACLayer":
    """A kernel ``(*in_features, *out_features)``."""
    return dense_general(num_in, num_out, bias)


def dense(bias: Optional[str] = "bias") -> KFACLayer:
  """A dense kernel ``(d_in, d_out)``."""
  return KFACLayer((0,), (1,), bias, "dense")


def conv(num_spatial: int = 2, bias: Optional[str] = "bias") -> KFACLayer:
  """A convolution kernel ``(*window, c_in, c_out)``."""
  return KFACLayer(tuple(range(num_spatial + 1)), (num_spatial + 1,), bias,
                   "conv")


def dense_general(num_in: int, num_out: int,
                  bias: Optional[str] = "bias") -> KFACLayer:
  """A kernel ``(*in_features, *out_features)`` (``DenseGeneral``)."""
  return KFACLayer(tuple(range(num_in)),
                   tuple(range(num_in, num_in + num_out)), bias,
                   "dense_general")


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def path_key(path) -> tuple:
  """A key path as a tuple of plain dict keys, attribute names and indices.

  A trailing attribute ``value`` (the array inside a Flax NNX ``Variable``
  such as ``nnx.Param``) is dropped, so that a state of ``Variable``s and its
  pure form (``nnx.as_pure``) give the same keys.
  """
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == "value"):
    path = path[:-1]
  return tuple(_key(k) for k in path)


def _where(key: tuple) -> str:
  return "/".join(map(str, key)) or "<root>"


def flat_params(params):
  """``[(key, leaf)]`` of a parameter tree; ``optax.MaskedNode`` is a leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
  return [(path_key(p), x) for p, x in flat]


def default_layers(params):
  """The registration of plain parameter trees.

  Every rank-2 leaf named ``kernel`` is a :func:`dense` layer and every
  rank-4 one a 2-D :func:`conv`; the sibling leaf ``bias``, when present and
  shaped like the output features, is folded in. Other leaves are not
  registered (they get the graft's AdamW step).
  """
  keys = {k: x for k, x in flat_params(params) if not _is_masked(x)}

  def spec(path, x):
    key = path_key(path)
    if _is_masked(x) or not key or key[-1] != "kernel":
      return None
    if x.ndim not in (2, 4):
      return None
    bias = keys.get(key[:-1] + ("bias",))
    has_bias = bias is not None and tuple(bias.shape) == (x.shape[-1],)
    name = "bias" if has_bias else None
    return dense(name) if x.ndim == 2 else conv(2, name)

  return jax.tree_util.tree_map_with_path(spec, params, is_leaf=_is_masked)


class ResolvedLayer(NamedTuple):
  """A registered kernel located in the flattened parameters.

  Attributes:
    spec: its :class:`KFACLayer`.
    key: the kernel's key path.
    kernel: index of the kernel leaf.
    bias: index of the bias leaf, or ``None`` (no bias, or masked out).
    shape: the kernel's shape.
    d_a: rows of the block (input features, plus 1 with a bias).
    d_g: columns of the block (output features).
    stats_rows: rows of the statistics ``Â`` (``d_a``, or ``d_a + 1`` when
      the spec folds in a bias that is masked out: the capture still
      appends its row of ones, which is then dropped).
  """
  spec: KFACLayer
  key: tuple
  kernel: int
  bias: Optional[int]
  shape: tuple
  d_a: int
  d_g: int
  stats_rows: int = 0


def _is_spec(x) -> bool:
  return x is None or isinstance(x, KFACLayer)


def resolve(params, layers=None) -> list[ResolvedLayer]:
  """The registered kernels of ``params`` (a tree or a prefix of one).

  ``layers`` is aligned with ``params`` by key path (dict keys, attribute
  names and indices), so any container type works; ``None`` applies
  :func:`default_layers`. Kernels that are ``optax.MaskedNode`` are skipped;
  a masked bias is not folded in.

  Raises:
    ValueError: if ``layers`` names a parameter that does not exist, or a
      spec does not fit its kernel or bias.
  """
  flat = flat_params(params)
  index = {k: i for i, (k, _) in enumerate(flat)}
  if layers is None:
    layers = default_layers(params)
  specs, _ = jax.tree_util.tree_flatten_with_path(layers, is_leaf=_is_spec)
  out = []
  for path, spec in specs:
    if spec is None:
      continue
    if not isinstance(spec, KFACLayer):
      raise ValueError(f"layers: expected a KFACLayer or None at "
                       f"{_where(path_key(path))}, got {spec!r}.")
    key = path_key(path)
    if key not in index:
      raise ValueError(
          f"layers: a KFACLayer is registered at {_where(key)}, but the "
          "parameters have no leaf there; build layers from the same "
          "parameter tree (e.g. kronopt.flax.nnx.KFACCapture(model).layers).")
    kernel = flat[index[key]][1]
    if _is_masked(kernel):
      continue
    spec.check(kernel.shape, _where(key))
    d_in, d_out = spec.dims(kernel.shape)
    bias = None
    if spec.bias is not None:
      bias_key = key[:-1] + (spec.bias,)
      if bias_key not in index:
        raise ValueError(
            f"layers: the KFACLayer at {_where(key)} folds in the bias "
            f"{spec.bias!r}, but there is no parameter {_where(bias_key)}.")
      b = flat[index[bias_key]][1]
      if not _is_masked(b):
        out_shape = tuple(kernel.shape[i] for i in spec.out_axes)
        if math.prod(b.shape) != d_out:
          raise ValueError(
              f"layers: the bias {_where(bias_key)} has shape "
              f"{tuple(b.shape)}; expected the output features "
              f"{out_shape} of the kernel {_where(key)}.")
        bias = index[bias_key]
    out.append(ResolvedLayer(spec, key, index[key], bias,
                             tuple(kernel.shape),
                             d_in + (bias is not None), d_out,
                             d_in + (spec.bias is not None)))
  return out


def _is_stats(x) -> bool:
  return x is None or isinstance(x, KFACStats)


HOW_TO = (
    "Produce them in the same forward/backward pass as the gradient with "
    "kronopt.flax.nnx.KFACCapture(model).value_grad_and_stats(loss_fn, "
    "model, *batch) (Flax NNX) or kronopt.flax.linen.KFACCapture(model, "
    "variables, *batch).value_grad_and_stats(loss_fn, params, *batch) (Flax "
    "linen), or build one kronopt.KFACStats per kernel (e.g. "
    "kronopt.KFACStats.dense(inputs, output_grads, bias=True)), and call "
    "tx.update(grads, state, params, kfac_stats=stats).")


def align_stats(params, layers: Sequence[ResolvedLayer], kfac_stats):
  """Per resolved layer, its :class:`KFACStats` (or ``None``: not captured).

  ``kfac_stats`` is aligned with ``params`` by key path. Statistics at
  parameters that are ``optax.MaskedNode`` (masked out by ``optax.masked``
  or ``optax.partition``, which pass extra arguments through unmasked) are
  ignored, as are statistics of layers whose kernel is masked.

  Raises:
    ValueError: if ``kfac_stats`` is missing while some layer is registered,
      has statistics where no parameter or no registered kernel is, or
      statistics of the wrong shape.
  """
  return align_stats_flat(
      tuple((k, _is_masked(x)) for k, x in flat_params(params)), layers,
      kfac_stats)


def align_stats_flat(flat, layers: Sequence[ResolvedLayer], kfac_stats):
  """:func:`align_stats` given ``(key, is MaskedNode)`` per parameter leaf."""
  if not layers:
    return []
  if kfac_stats is None:
    raise ValueError(
        "K-FAC needs the layer statistics as the keyword extra argument "
        "kfac_stats of update(); none were given. " + HOW_TO)
  masked = dict(flat)
  registered = {layer.key: layer for layer in layers}
  given, _ = jax.tree_util.tree_flatten_with_path(kfac_stats,
                                                  is_leaf=_is_stats)
  found = {}
  for path, stats in given:
    key = path_key(path)
    if stats is None:
      continue
    if not isinstance(stats, KFACStats):
      raise ValueError(
          f"kfac_stats does not match the parameters: expected KFACStats or "
          f"None at {_where(key)}, got {type(stats).__name__}. " + HOW_TO)
    if key not in masked:
      raise ValueError(
          f"kfac_stats does not match the parameters: statistics at "
          f"{_where(key)}, where the parameters have no leaf. " + HOW_TO)
    if masked[key]:
      continue
    if key not in registered:
      raise ValueError(
          f"kfac_stats has statistics for {_where(key)}, but no K-FAC layer "
          "is registered there; pass layers= (e.g. the capture's .layers) "
          "when building the optimizer.")
    layer = registered[key]
    a, g = stats
    rows = layer.stats_rows or layer.d_a
    if (a.ndim != 2 or g.ndim != 2 or a.shape[0] != rows
        or g.shape[0] != layer.d_g or a.shape[1] != g.shape[1]):
      bias = "with" if layer.spec.bias is not None else "without"
      raise ValueError(
          f"kfac_stats at {_where(key)}: a{tuple(a.shape)}, "
          f"g{tuple(g.shape)}; expected a[{rows}, n] (input features "
          f"{bias} the bias row) and g[{layer.d_g}, n] for the kernel of "
          f"shape {layer.shape}.")
    found[key] = stats if rows == layer.d_a else KFACStats(a[:layer.d_a], g)
  return [found.get(layer.key) for layer in layers]


def stats_from_rows(inputs, output_grads, *, bias: bool) -> KFACStats:
  """:class:`KFACStats` from ``n`` rows of layer inputs and output gradients.

  ``inputs`` ``[n, d_in]`` and ``output_grads`` ``[n, d_out]`` (``∂L/∂y``,
  for a loss averaged over the rows) give ``Â = [x, 1]ᵀ/√n`` and
  ``Γ̂ = √n ∂L/∂yᵀ``, in float32.
  """
  n = inputs.shape[0]
  x = inputs.astype(jnp.float32)
  if bias:
    x = jnp.concatenate([x, jnp.ones((n, 1), jnp.float32)], axis=1)
  root = jnp.sqrt(jnp.float32(n))
  return KFACStats(a=x.T / root, g=output_grads.astype(jnp.float32).T * root)


def dense_stats(inputs, output_grads, *, bias: bool,
                num_in: int = 1) -> KFACStats:
  """:func:`stats_from_rows` of a dense layer; leading axes are rows.

  ``inputs`` ``[..., *in_features]`` (``num_in`` trailing axes) and
  ``output_grads`` ``[..., *out_features]`` with the same leading axes.
  """
  lead = inputs.shape[:inputs.ndim - num_in]
  n = math.prod(lead)
  d_out = math.prod(output_grads.shape[len(lead):])
  return stats_from_rows(jnp.reshape(inputs, (n, -1)),
                         jnp.reshape(output_grads, (n, d_out)), bias=bias)


def to_block(layer: ResolvedLayer, kernel, bias=None):
  """The ``[d_a, d_g]`` block of a kernel (and bias) gradient, float32."""
  axes = tuple(layer.spec.in_axes) + tuple(layer.spec.out_axes)
  d_in = layer.d_a - (layer.bias is not None)
  g = jnp.reshape(jnp.transpose(kernel.astype(jnp.float32), axes),
                  (d_in, layer.d_g))
  if layer.bias is None:
    return g
  row = jnp.reshape(bias.astype(jnp.float32), (1, layer.d_g))
  return jnp.concatenate([g, row], axis=0)


def from_block(layer: ResolvedLayer, block, kernel_like, bias_like=None):
  """Inverse of :func:`to_block`: ``(kernel, bias)`` in their dtypes."""
  axes = tuple(layer.spec.in_axes) + tuple(layer.spec.out_axes)
  d_in = layer.d_a - (layer.bias is not None)
  permuted = tuple(layer.shape[i] for i in axes)
  kernel = jnp.transpose(jnp.reshape(block[:d_in], permuted),
                         _inverse(axes)).astype(kernel_like.dtype)
  if layer.bias is None:
    return kernel, None
  bias = jnp.reshape(block[d_in], bias_like.shape).astype(bias_like.dtype)
  return kernel, bias


def _inverse(perm):
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)

