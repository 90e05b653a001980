"""Optimizers from config dicts, e.g. ``{name: shampoo, learning_rate: 3e-3}``.

``name`` is looked up in :mod:`kronopt` first, then in :mod:`optax`; the other
keys are passed as keyword arguments. A new kronopt optimizer therefore needs
no code here.
"""

from __future__ import annotations

from typing import Any, Mapping

import optax

import kronopt

MODULES = (kronopt, optax)


def build(spec: Mapping[str, Any]) -> optax.GradientTransformation:
  """``{name: X, **kwargs}`` -> ``kronopt.X(**kwargs)`` or ``optax.X(**kwargs)``.

  Raises:
    ValueError: if neither module has an optimizer called ``name``.
  """
  kwargs = dict(spec)
  name = kwargs.pop("name")
  for module in MODULES:
    factory = getattr(module, name, None)
    if callable(factory):
      return factory(**kwargs)
  raise ValueError(f"name={name!r}: no optimizer of that name in kronopt or "
                   "optax.")


def describe(spec: Mapping[str, Any]) -> str:
  """A short label: ``shampoo(block_size=256, precondition_every=10)``."""
  args = ", ".join(f"{k}={v}" for k, v in spec.items()
                   if k not in ("name", "learning_rate"))
  return f"{spec['name']}({args})"
