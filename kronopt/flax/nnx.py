"""K-FAC statistics from Flax NNX models (docs/algorithms.md §6).

:class:`KFACCapture` registers a model's ``nnx.Linear``, ``nnx.LinearGeneral``
and ``nnx.Conv`` layers explicitly (by module path and type, no jaxpr
matching), tells the optimizer their factor layout (:attr:`KFACCapture.layers`)
and computes the loss, the gradient and the layer statistics in one forward
and backward pass. A complete training step::

  from flax import nnx
  import kronopt

  model = MLP(rngs=nnx.Rngs(0))
  capture = kronopt.flax.nnx.KFACCapture(model)
  optimizer = nnx.Optimizer(
      model, kronopt.kfac(1e-2, layers=capture.layers), wrt=nnx.Param)

  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads, stats = capture.value_grad_and_stats(loss_fn, model, x, y)
    optimizer.update(model, grads, kfac_stats=stats)
    return loss

During the pass each registered layer's class is swapped, on the copy of
the model that ``nnx.value_and_grad`` traces, for a subclass whose
``__call__`` records the input and adds a zero perturbation to the output
(see :mod:`kronopt.flax._capture`); the user's model is never modified.
The loss function must call the registered layers directly, not inside its
own ``nnx.jit``, ``nnx.remat``, ``nnx.scan`` or ``nnx.vmap``.
"""

import contextlib
from typing import Any, Callable

from flax import nnx

from kronopt.flax import _capture
from kronopt.preconditioners import kfac_layers

_SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Conv)


def _entry(path: tuple, module) -> tuple:
  """``(Entry, None)`` for a supported layer, ``(None, reason)`` otherwise."""
  bias = "bias" if module.use_bias else None
  key = tuple(path) + ("kernel",)
  if type(module) is nnx.Linear:
    return _capture.Entry(key, kfac_layers.dense(bias),
                          _capture.linear_rows((-1,))), None
  if type(module) is nnx.LinearGeneral:
    if module.batch_axis:
      return None, "LinearGeneral with batch_axis"
    spec = kfac_layers.dense_general(len(module.in_features),
                                     len(module.out_features), bias)
    return _capture.Entry(key, spec, _capture.linear_rows(module.axis)), None
  if module.feature_group_count != 1:
    return None, "Conv with feature_group_count != 1"
  if module.mask is not None:
    return None, "Conv with a kernel mask"
  spec = kfac_layers.conv(len(module.kernel_size), bias)
  rows = _capture.conv_rows(module.kernel_size, module.strides,
                            module.padding, module.input_dilation,
                            module.kernel_dilation)
  return _capture.Entry(key, spec, rows), None


_TAPPED_CLASSES: dict = {}
_TAPS: dict = {}


def _tapped_class(cls):
  """A subclass of ``cls`` whose ``__call__`` reports to the active recorder."""
  if cls not in _TAPPED_CLASSES:

    def __call__(self, inputs, *args, **kwargs):
      y = cls.__call__(self, inputs, *args, **kwargs)
      recorder, index = _TAPS[id(self)]
      return recorder.tap(index, inputs, y)

    _TAPPED_CLASSES[cls] = type(cls)(
        f"KFACTapped{cls.__name__}", (cls,),
        {"__call__": __call__, "__module__": __name__})
  return _TAPPED_CLASSES[cls]


@contextlib.contextmanager
def _tapped(model, entries, recorder):
  """Swaps the registered layers of ``model`` for tapped ones, then back."""
  modules = dict(nnx.iter_modules(model))
  swapped = []
  try:
    for index, entry in enumerate(entries):
      module = modules.get(entry.key[:-1])
      if module is None:
        continue
      cls = type(module)
      _TAPS[id(module)] = (recorder, index)
      object.__setattr__(module, "__class__", _tapped_class(cls))
      swapped.append((module, cls))
    yield
  finally:
    for module, cls in swapped:
      object.__setattr__(module, "__class__", cls)
      _TAPS.pop(id(module), None)


class KFACCapture:
  """Explicit K-FAC registration of an NNX model's layers.

  Every ``nnx.Linear``, ``nnx.LinearGeneral`` (without ``batch_axis``) and
  ungrouped, unmasked ``nnx.Conv`` in the model (exact types) is
  registered, with its ``bias`` folded in when the layer has one. Other
  parameters get the graft's AdamW step.

  Attributes:
    layers: a tree like ``nnx.as_pure(nnx.state(model, wrt))`` with a
      :class:`kronopt.preconditioners.kfac_layers.KFACLayer` at each
      registered kernel and ``None`` elsewhere; pass it as
      ``kronopt.kfac(..., layers=capture.layers)``.
    entries: the registered layers, in module order.
    skipped: ``(path, reason)`` of supported layer types left out.
  """

  def __init__(self, model, *, wrt=nnx.Param):
    """Registers the layers of ``model``.

    Args:
      model: the ``nnx.Module``.
      wrt: the filter of the differentiated variables, as for ``nnx.grad``
        and ``nnx.Optimizer``.
    """
    self.wrt = wrt
    params = nnx.as_pure(nnx.state(model, wrt))
    present = {k for k, _ in kfac_layers.flat_params(params)}
    entries, skipped = [], []
    for path, module in nnx.iter_modules(model):
      if type(module) not in _SUPPORTED:
        continue
      entry, reason = _entry(tuple(path), module)
      if entry is not None and entry.key not in present:
        entry, reason = None, "kernel not among the differentiated variables"
      if entry is None:
        skipped.append((tuple(path), reason))
      else:
        entries.append(entry)
    self.entries = tuple(entries)
    self.skipped = tuple(skipped)
    self.layers = _capture.layers_tree(params, self.entries)

  def value_grad_and_stats(self, loss_fn: Callable[..., Any], model, *args,
                           has_aux: bool = False):
    """``(loss, grads, kfac_stats)`` from one forward and backward pass.

    Args:
      loss_fn: ``loss_fn(model, *args)``, a scalar loss (averaged over the
        batch for the statistics' scale), or ``(loss, aux)`` with
        ``has_aux``.
      model: the model (the one registered, or one of the same structure).
      *args: further arguments of ``loss_fn`` (the batch).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      ``(loss, grads, kfac_stats)`` (``((loss, aux), grads, kfac_stats)``
      with ``has_aux``): ``grads`` as from ``nnx.grad(loss_fn,
      argnums=nnx.DiffState(0, wrt))``, and ``kfac_stats`` a tree like
      ``nnx.as_pure(grads)`` with a
      :class:`kronopt.preconditioners.kfac_layers.KFACStats` per registered
      kernel that was called (``None`` elsewhere). Variables other than the
      differentiated ones (batch statistics, RNG counts) are updated in
      ``model`` as ``nnx.value_and_grad`` would.
    """
    entries = self.entries

    def run(m, recorder, *a):
      with _tapped(m, entries, recorder):
        return loss_fn(m, *a)

    shapes = _capture.Recorder(len(entries))
    nnx.eval_shape(lambda m, *a: (run(m, shapes, *a), None)[1], model, *args)

    def differentiated(m, perturbations, *a):
      recorder = _capture.Recorder(len(entries), perturbations)
      out = run(m, recorder, *a)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, recorder.inputs)

    grad_fn = nnx.value_and_grad(
        differentiated, argnums=(nnx.DiffState(0, self.wrt), 1),
        has_aux=True)
    (loss, (aux, inputs)), (grads, output_grads) = grad_fn(
        model, shapes.zeros(), *args)
    stats = _capture.build_stats(entries, inputs, output_grads)
    stats = _capture.stats_tree(nnx.as_pure(grads), entries, stats)
    return ((loss, aux) if has_aux else loss), grads, stats
