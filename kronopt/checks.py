"""Construction-time validation of hyperparameters.

Every check raises ``ValueError`` naming the argument, the value and the valid
range. Values that are JAX tracers (as under ``optax.inject_hyperparams``
inside ``jit``) cannot be inspected and are let through.
"""

import math
import numbers
from typing import Any, Iterable

import jax
import numpy as np

INT32_MAX = 2**31 - 1


def _concrete(value):
  """``float(value)`` for a real number or a real 0-d array, else ``None``.

  Strings, bools and complex numbers are not numbers here (``"0.5"`` and
  ``True`` would otherwise pass as 0.5 and 1.0).
  """
  if isinstance(value, (jax.core.Tracer, str, bytes, bool, np.bool_)):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  dtype = getattr(value, "dtype", None)
  if (dtype is None or np.ndim(value) != 0 or not (
      np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating))):
    return None
  return float(np.asarray(value))


def check_number(name: str, value: Any, *, low=-math.inf, high=math.inf,
                 low_open=False, high_open=False, allow_none=False):
  """Checks that ``value`` is a finite real with ``low ≤ value ≤ high``.

  ``<`` on an open end. Tracers and optax schedules (callables) pass.
  """
  if value is None and allow_none:
    return
  if callable(value):  # an optax schedule
    return
  if isinstance(value, jax.core.Tracer):
    return
  v = _concrete(value)
  if v is None:
    raise ValueError(f"{name}={value!r} is not valid; expected a real number "
                     f"in {_interval(low, high, low_open, high_open)}.")
  lo_ok = v > low if low_open else v >= low
  hi_ok = v < high if high_open else v <= high
  if not (lo_ok and hi_ok and math.isfinite(v)):
    raise ValueError(
        f"{name}={value!r} is out of range; expected a finite value in "
        f"{_interval(low, high, low_open, high_open)}.")


def _interval(low, high, low_open, high_open) -> str:
  lb = "(" if low_open or low == -math.inf else "["
  hb = ")" if high_open or high == math.inf else "]"
  return f"{lb}{low}, {high}{hb}"


def check_int(name: str, value: Any, *, low: int = 0, high=None,
              allow_none=False, static=False):
  """Checks that ``value`` is an integer with ``low ≤ value (≤ high)``.

  ``static`` integers shape the computation (block sizes, ranks, loop
  counts): they must be Python (or numpy) integers, never JAX arrays or
  tracers; under ``optax.inject_hyperparams`` they go in ``static_args``.
  Other integers may also be 0-d integer arrays or tracers.
  """
  if value is None and allow_none:
    return
  rng = f"[{low}, {high}]" if high is not None else f">= {low}"
  is_array = isinstance(value, (jax.Array, jax.core.Tracer))
  if static and is_array:
    raise ValueError(
        f"{name}={value!r} is not valid; expected a Python integer {rng}: it "
        "shapes the computation, so it cannot be an array (with "
        f"optax.inject_hyperparams, list {name!r} in static_args).")
  if isinstance(value, jax.core.Tracer):
    return
  is_int = isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
      value, (bool, np.bool_))
  if is_array and np.ndim(value) == 0 and jnp_integer(value):
    is_int = True
  if not is_int:
    raise ValueError(f"{name}={value!r} is not valid; expected an integer "
                     f"{rng}.")
  v = int(value)
  if v < low or (high is not None and v > high):
    raise ValueError(f"{name}={value!r} is out of range; expected an integer "
                     f"{rng}.")


def jnp_integer(value) -> bool:
  return np.issubdtype(value.dtype, np.integer)


def check_bool(name: str, value: Any):
  """Checks that ``value`` is a Python or numpy bool (or a tracer)."""
  if isinstance(value, jax.core.Tracer):
    return
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name}={value!r} is not valid; expected True or "
                     "False.")


def check_choice(name: str, value: Any, choices: Iterable):
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not valid; expected one of "
                     f"{', '.join(repr(c) for c in choices)}.")
