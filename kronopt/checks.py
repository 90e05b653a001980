"""Construction-time validation of hyperparameters.

Every check raises ``ValueError`` naming the argument, the value and the valid
range. Values that are JAX tracers (as under ``optax.inject_hyperparams``
inside ``jit``) cannot be inspected and are let through.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import jax
import numpy as np


def _concrete(value):
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return None


def check_number(name: str, value: Any, *, low=-math.inf, high=math.inf,
                 low_open=False, high_open=False, allow_none=False):
  """Checks ``low ≤ value ≤ high`` (``<`` on an open end)."""
  if value is None and allow_none:
    return
  if callable(value):  # an optax schedule
    return
  v = _concrete(value)
  if v is None:
    if isinstance(value, jax.core.Tracer):
      return
    raise ValueError(f"{name}={value!r} is not a number.")
  lo_ok = v > low if low_open else v >= low
  hi_ok = v < high if high_open else v <= high
  if not (lo_ok and hi_ok and not math.isnan(v)):
    lb = "(" if low_open else "["
    hb = ")" if high_open else "]"
    raise ValueError(
        f"{name}={value!r} is out of range; expected a value in "
        f"{lb}{low}, {high}{hb}.")


def check_int(name: str, value: Any, *, low: int = 0, high=None,
              allow_none=False):
  """Checks that ``value`` is an integer with ``low ≤ value (≤ high)``."""
  if value is None and allow_none:
    return
  if isinstance(value, jax.core.Tracer):
    return
  is_int = isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
      value, bool)
  if not is_int and not (hasattr(value, "dtype") and np.ndim(value) == 0
                         and np.issubdtype(value.dtype, np.integer)):
    raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
  v = int(value)
  if v < low or (high is not None and v > high):
    rng = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name}={value!r} is out of range; expected an integer "
                     f"{rng}.")


def check_choice(name: str, value: Any, choices: Iterable):
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not valid; expected one of "
                     f"{', '.join(repr(c) for c in choices)}.")
