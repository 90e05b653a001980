"""K-FAC statistics from Flax linen models (docs/algorithms.md §6).

:class:`KFACCapture` registers a model's ``nn.Dense``, ``nn.DenseGeneral``
and ``nn.Conv`` submodules explicitly (by module path and type, found by an
abstract ``apply``; no jaxpr matching), tells the optimizer their factor
layout (:attr:`KFACCapture.layers`) and computes the loss, the gradient and
the layer statistics in one forward and backward pass. A complete training
step::

  import flax.linen as nn
  import kronopt

  model = MLP()
  variables = model.init(jax.random.key(0), x)
  capture = kronopt.flax.linen.KFACCapture(model, variables, x)
  tx = kronopt.kfac(1e-2, layers=capture.layers)
  params = variables["params"]
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(params, opt_state, x, y):
    loss, grads, stats = capture.value_grad_and_stats(loss_fn, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   kfac_stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

The registered calls are intercepted with ``flax.linen.intercept_methods``:
the input is recorded and a zero perturbation (as ``Module.perturb`` would
add) is added to the output, so ``∂L/∂y`` comes out of the same backward
pass (see :mod:`kronopt.flax._capture`). The model needs no change. The loss
function must call the model directly (``model.apply``), not inside its own
``jax.jit``, ``nn.remat``, ``nn.scan`` or ``nn.vmap``.
"""

from typing import Any, Callable

import flax.linen as nn
import jax

from kronopt.flax import _capture
from kronopt.preconditioners import kfac_layers

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _entry(path: tuple, module) -> tuple:
  """``(Entry, None)`` for a supported module, ``(None, reason)`` otherwise."""
  bias = "bias" if module.use_bias else None
  key = tuple(path) + ("kernel",)
  if type(module) is nn.Dense:
    return _capture.Entry(key, kfac_layers.dense(bias),
                          _capture.linear_rows((-1,))), None
  if type(module) is nn.DenseGeneral:
    if _tuple(module.batch_dims):
      return None, "DenseGeneral with batch_dims"
    spec = kfac_layers.dense_general(len(_tuple(module.axis)),
                                     len(_tuple(module.features)), bias)
    return _capture.Entry(key, spec,
                          _capture.linear_rows(_tuple(module.axis))), None
  if module.feature_group_count != 1:
    return None, "Conv with feature_group_count != 1"
  if module.mask is not None:
    return None, "Conv with a kernel mask"
  kernel_size = _tuple(module.kernel_size)
  spec = kfac_layers.conv(len(kernel_size), bias)
  rows = _capture.conv_rows(kernel_size, module.strides, module.padding,
                            module.input_dilation, module.kernel_dilation)
  return _capture.Entry(key, spec, rows), None


def _tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _is_registered_call(context) -> bool:
  return (context.method_name == "__call__"
          and type(context.module) in _SUPPORTED)


def _first_input(args, kwargs):
  return args[0] if args else kwargs["inputs"]


class KFACCapture:
  """Explicit K-FAC registration of a linen model's submodules.

  The model is applied once abstractly (``jax.eval_shape``, nothing is
  computed) to the example arguments, and every ``nn.Dense``,
  ``nn.DenseGeneral`` (without ``batch_dims``) and ungrouped, unmasked
  ``nn.Conv`` called (exact types) is registered under its module path,
  with its ``bias`` folded in when it has one. Other parameters get the
  graft's AdamW step.

  Attributes:
    layers: a tree like ``variables["params"]`` with a
      :class:`kronopt.preconditioners.kfac_layers.KFACLayer` at each
      registered kernel and ``None`` elsewhere; pass it as
      ``kronopt.kfac(..., layers=capture.layers)``.
    entries: the registered layers, in call order.
    skipped: ``(path, reason)`` of supported module types left out.
  """

  def __init__(self, model: nn.Module, variables, *args, method=None,
               **kwargs):
    """Registers the layers that ``model.apply(variables, *args)`` calls.

    Args:
      model: the linen module.
      variables: its variables (with a ``"params"`` collection), e.g. from
        ``model.init``.
      *args: example arguments of ``model.apply`` (shapes are what count).
      method: the method ``apply`` calls (default ``__call__``).
      **kwargs: further keyword arguments of ``model.apply`` (``rngs``,
        flags such as ``train=True``).
    """
    found = {}

    def discover(next_fun, a, kw, context):
      if _is_registered_call(context):
        found.setdefault(tuple(context.module.path), context.module)
      return next_fun(*a, **kw)

    with nn.intercept_methods(discover):
      jax.eval_shape(lambda v: model.apply(v, *args, method=method,
                                           mutable=True, **kwargs),
                     variables)
    params = variables["params"]
    present = {k for k, _ in kfac_layers.flat_params(params)}
    entries, skipped = [], []
    for path, module in found.items():
      entry, reason = _entry(path, module)
      if entry is not None and entry.key not in present:
        entry, reason = None, "kernel not in the params collection"
      if entry is None:
        skipped.append((path, reason))
      else:
        entries.append(entry)
    self.entries = tuple(entries)
    self.skipped = tuple(skipped)
    self.layers = _capture.layers_tree(params, self.entries)

  def _run(self, loss_fn, params, recorder, args, kwargs):
    index = {e.key[:-1]: i for i, e in enumerate(self.entries)}

    def tap(next_fun, a, kw, context):
      i = (index.get(tuple(context.module.path))
           if _is_registered_call(context) else None)
      if i is None:
        return next_fun(*a, **kw)
      return recorder.tap(i, _first_input(a, kw), next_fun(*a, **kw))

    with nn.intercept_methods(tap):
      return loss_fn(params, *args, **kwargs)

  def value_grad_and_stats(self, loss_fn: Callable[..., Any], params, *args,
                           has_aux: bool = False, **kwargs):
    """``(loss, grads, kfac_stats)`` from one forward and backward pass.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)``, which calls
        ``model.apply`` and returns a scalar loss (averaged over the batch
        for the statistics' scale), or ``(loss, aux)`` with ``has_aux``.
      params: the ``"params"`` collection.
      *args: further arguments of ``loss_fn`` (the batch).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      **kwargs: further keyword arguments of ``loss_fn``.

    Returns:
      ``(loss, grads, kfac_stats)`` (``((loss, aux), grads, kfac_stats)``
      with ``has_aux``): ``grads`` as from ``jax.grad(loss_fn)``, and
      ``kfac_stats`` a tree like ``params`` with a
      :class:`kronopt.preconditioners.kfac_layers.KFACStats` per registered
      kernel that was called (``None`` elsewhere).
    """
    n = len(self.entries)
    shapes = _capture.Recorder(n)
    jax.eval_shape(
        lambda p: (self._run(loss_fn, p, shapes, args, kwargs), None)[1],
        params)

    def differentiated(p, perturbations):
      recorder = _capture.Recorder(n, perturbations)
      out = self._run(loss_fn, p, recorder, args, kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, recorder.inputs)

    (loss, (aux, inputs)), (grads, output_grads) = jax.value_and_grad(
        differentiated, argnums=(0, 1), has_aux=True)(params, shapes.zeros())
    stats = _capture.build_stats(self.entries, inputs, output_grads)
    stats = _capture.stats_tree(params, self.entries, stats)
    return ((loss, aux) if has_aux else loss), grads, stats
