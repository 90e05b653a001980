"""The experiments' command line.

    python -m experiments.run CONFIG.yaml [--set KEY=VALUE ...]

The YAML's ``experiment:`` key names a module ``experiments.<experiment>``
whose ``run(config)`` does the work (``sweep`` for the training framework,
:mod:`experiments.sweep`). ``--set`` overrides a key of the file, dotted for
nested keys (``--set optimizers.adamw.learning_rate=[1e-3,3e-3]``), the value
parsed as YAML. The config is then validated against the module's schema,
its ``SCHEMA`` or, for a module with a ``DEFAULTS`` dict, the keys and types
of its defaults: an unknown key or a value of the wrong type stops the run
before any work, naming the key.
"""

import argparse
import importlib
from typing import Any, Mapping, Optional, Sequence

from experiments import config as config_lib

DEFAULT_CONFIG = "configs/quickstart.yaml"
Field = config_lib.Field


def experiment_module(config: Mapping[str, Any]):
  """The module ``experiments.<config['experiment']>``."""
  name = config_lib.string()(config.get("experiment"), "experiment")
  try:
    module = importlib.import_module(f"experiments.{name}")
  except ModuleNotFoundError as e:
    raise config_lib.ConfigError(
        f"config key 'experiment': {name!r} is not an experiment (no module "
        f"experiments.{name}).") from e
  if not callable(getattr(module, "run", None)) or module.__name__ == __name__:
    raise config_lib.ConfigError(f"config key 'experiment': experiments."
                                 f"{name} has no run(config).")
  return module


def schema(module) -> Optional[dict[str, Field]]:
  """The module's ``SCHEMA``, or one derived from its ``DEFAULTS``."""
  if hasattr(module, "SCHEMA"):
    return module.SCHEMA
  if hasattr(module, "DEFAULTS"):
    return {"experiment": Field(config_lib.string()),
            **config_lib.defaults_schema(module.DEFAULTS)}
  return None


def prepare(config: dict[str, Any], overrides: Sequence[str] = ()):
  """``(module, validated config)`` after the ``--set`` overrides.

  Raises:
    ConfigError: naming the offending key.
  """
  config = config_lib.apply_overrides(config, overrides)
  module = experiment_module(config)
  keys = schema(module)
  if keys is None:
    return module, config
  config = config_lib.validate(config, keys)
  if hasattr(module, "check"):
    config = module.check(config)
  return module, config


def run(config: dict[str, Any], overrides: Sequence[str] = ()) -> Any:
  """Validates ``config`` and runs ``experiments.<experiment>.run``."""
  module, config = prepare(config, overrides)
  return module.run(config)


def main(argv: Optional[Sequence[str]] = None) -> Any:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.run", description=__doc__.split("\n\n")[0],
      epilog=__doc__.split("\n\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                      help=f"the YAML config (default {DEFAULT_CONFIG})")
  parser.add_argument("--set", action="append", default=[],
                      metavar="KEY=VALUE", dest="overrides",
                      help="override a (dotted) key; repeatable")
  args = parser.parse_args(argv)
  try:
    module, config = prepare(config_lib.load(args.config), args.overrides)
  except (config_lib.ConfigError, OSError) as e:
    parser.error(str(e))
  return module.run(config)


if __name__ == "__main__":
  main()
