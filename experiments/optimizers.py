"""Optimizers from config dicts, e.g. ``{name: shampoo, learning_rate: 3e-3}``.

``name`` is looked up in :mod:`kronopt` first, then in :mod:`optax`; the other
keys are passed as keyword arguments. A new kronopt optimizer therefore needs
no code here.

:func:`build` makes one optimizer from one dict (as the benchmark does).
:func:`build_traced` is what the training loop calls inside its compiled
function: the learning rate (through a schedule) and any swept float
hyperparameter arrive as traced scalars, so one compilation serves a whole
grid.
"""

from typing import Any, Callable, Mapping, Optional

import optax

import kronopt

MODULES = (kronopt, optax)


def factory(name: str) -> Optional[Callable[..., optax.GradientTransformation]]:
  """``kronopt.<name>`` or ``optax.<name>``; ``None`` if neither exists."""
  for module in MODULES:
    fn = getattr(module, name, None)
    if callable(fn):
      return fn
  return None


def build(spec: Mapping[str, Any]) -> optax.GradientTransformation:
  """``{name: X, **kwargs}`` -> ``kronopt.X(**kwargs)`` or ``optax.X(...)``.

  Raises:
    ValueError: if neither module has an optimizer called ``name``.
  """
  kwargs = dict(spec)
  name = kwargs.pop("name")
  fn = factory(name)
  if fn is None:
    raise ValueError(f"name={name!r}: no optimizer of that name in kronopt "
                     "or optax.")
  return fn(**kwargs)


def build_traced(name: str, kwargs: Mapping[str, Any],
                 hparams: Mapping[str, Any],
                 schedule: optax.Schedule) -> optax.GradientTransformation:
  """``name(learning_rate=η(t), **kwargs, **other hparams)``.

  Args:
    name: the optimizer (see :func:`factory`).
    kwargs: the fixed keyword arguments.
    hparams: ``learning_rate`` (the peak of the schedule) and the swept
      hyperparameters; values may be tracers.
    schedule: the unit-peak shape ``s(t)``; the optimizer gets
      ``η(t) = learning_rate · s(t)``.
  """
  hparams = dict(hparams)
  peak = hparams.pop("learning_rate")
  return build({"name": name, **kwargs, **hparams,
                "learning_rate": lambda count: peak * schedule(count)})


def describe(spec: Mapping[str, Any]) -> str:
  """A short label: ``shampoo(block_size=256, precondition_every=10)``."""
  args = ", ".join(f"{k}={v}" for k, v in spec.items()
                   if k not in ("name", "learning_rate"))
  return f"{spec['name']}({args})"
