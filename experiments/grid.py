"""Hyperparameter grids: their points, best-of selection and the edge flag.

A grid is a mapping ``{axis: [values]}`` (``learning_rate`` first, then any
swept hyperparameter); its points are the Cartesian product. The best point
minimises a score (the mean over seeds of the final held-out loss; a
non-finite score never wins). A best value at either end of a numeric axis
(its smallest or largest value, which a one-value axis always is) is *on
the edge*: the optimum may lie outside the grid, which should be widened
before the comparison is believed. Categorical axes have no edge.
"""

import itertools
import math
import numbers
from typing import Any, Mapping, Optional, Sequence

Point = dict[str, Any]


def points(axes: Mapping[str, Sequence[Any]]) -> list[Point]:
  """Every point of the grid, the last axis varying fastest."""
  names = list(axes)
  return [dict(zip(names, values))
          for values in itertools.product(*(axes[n] for n in names))]


def key(point: Mapping[str, Any]) -> tuple:
  """A hashable key of a point."""
  return tuple(sorted(point.items()))


def _finite(x: Optional[float]) -> bool:
  return x is not None and math.isfinite(x)


def best(scores: Sequence[tuple[Point, float]]) -> Optional[Point]:
  """The point of least finite score (the first of ties); ``None`` if no
  score is finite."""
  finite = [(s, i) for i, (_, s) in enumerate(scores) if _finite(s)]
  return scores[min(finite)[1]][0] if finite else None


def _numeric(values: Sequence[Any]) -> bool:
  return all(isinstance(v, numbers.Real) and not isinstance(v, bool)
             for v in values)


def edges(axes: Mapping[str, Sequence[Any]], point: Mapping[str, Any]
          ) -> list[str]:
  """The numeric axes along which ``point`` sits at the smallest or largest
  value (categorical axes, such as a root method, have no edge)."""
  return [name for name, values in axes.items() if _numeric(values)
          and point[name] in (min(values), max(values))]
