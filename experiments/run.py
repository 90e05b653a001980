"""The main job: ``python -m experiments.run [configs/quickstart.yaml]``.

The YAML's ``experiment:`` key names a module ``experiments.<experiment>``
whose ``run(config)`` does the work, so a new experiment is a new module and a
new YAML file.
"""

from __future__ import annotations

import argparse
import importlib
import re
from typing import Any, Optional, Sequence

import yaml

DEFAULT_CONFIG = "configs/quickstart.yaml"


class _Loader(yaml.SafeLoader):
  """A safe loader that also reads ``3e-3`` (no dot) as a float.

  PyYAML follows YAML 1.1, where such numbers are strings.
  """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_config(path: str) -> dict[str, Any]:
  with open(path) as f:
    return yaml.load(f, Loader=_Loader)


def run(config: dict[str, Any]) -> Any:
  """Runs ``experiments.<config['experiment']>.run(config)``."""
  module = importlib.import_module(f"experiments.{config['experiment']}")
  return module.run(config)


def main(argv: Optional[Sequence[str]] = None) -> Any:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
  return run(load_config(parser.parse_args(argv).config))


if __name__ == "__main__":
  main()
