"""Workloads: a model, its data and its metrics (see :mod:`.base`).

:data:`WORKLOADS` maps the ``workload.name`` of a config to the constructor
whose keyword arguments are the rest of the ``workload`` mapping.
"""

from experiments.workloads import char_lm
from experiments.workloads import digits
from experiments.workloads import quadratic
from experiments.workloads.base import Workload

WORKLOADS = {
    "char_lm": char_lm.make,
    "digits_mlp": digits.mlp,
    "digits_cnn": digits.cnn,
    "digits_autoencoder": digits.autoencoder,
    "kronecker_quadratic": quadratic.make,
}


def make(name: str, **kwargs) -> Workload:
  """``WORKLOADS[name](**kwargs)``."""
  if name not in WORKLOADS:
    raise ValueError(f"name={name!r} is not a workload; expected one of "
                     f"{', '.join(map(repr, WORKLOADS))}.")
  return WORKLOADS[name](**kwargs)
