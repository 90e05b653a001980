"""Learning-rate schedules whose peak may be a traced value.

``optax.warmup_cosine_decay_schedule`` branches in Python on its peak, so it
cannot take a tracer; here the shape of the schedule (static: its kind, the
warm-up and the number of steps) is a unit-peak optax schedule and the peak
multiplies it, ``η(t) = η_peak · s(t)``. A learning-rate grid then compiles
once: the peak is an argument of the compiled training chunk.
"""

import optax

from experiments import config as config_lib

KINDS = ("constant", "warmup_cosine")

SCHEMA = {
    "name": config_lib.Field(config_lib.string(KINDS), "constant",
                             "constant or warmup_cosine"),
    "warmup_steps": config_lib.Field(config_lib.integer(0), 0,
                                     "linear warm-up from 0 (warmup_cosine)"),
    "end_factor": config_lib.Field(config_lib.number(), 0.0,
                                   "final learning rate / peak "
                                   "(warmup_cosine)"),
}


def unit(steps: int, *, name: str = "constant", warmup_steps: int = 0,
         end_factor: float = 0.0) -> optax.Schedule:
  """The schedule's shape ``s(t)``, peak 1.

  ``constant``: ``s(t) = 1``. ``warmup_cosine``: linear from 0 to 1 over
  ``warmup_steps``, then ``end + (1 − end)·(1 + cos(π τ))/2`` with ``τ``
  going from 0 to 1 over the remaining ``steps − warmup_steps``.
  """
  config_lib.string(KINDS)(name, "schedule.name")
  if name == "constant":
    return optax.constant_schedule(1.0)
  if not 0 <= warmup_steps < steps:
    raise ValueError(f"warmup_steps={warmup_steps} is out of range; expected "
                     f"an integer in [0, steps={steps}).")
  return optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup_steps, steps, end_value=end_factor)

