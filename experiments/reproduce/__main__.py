"""Regenerates the reproductions' figures and records.

    python -m experiments.reproduce all [--set KEY=VALUE ...]
    python -m experiments.reproduce kronecker_cosine caspr_distance

Each name is a config of ``configs/reproduce/`` (see
:data:`experiments.reproduce.CONFIGS`), run as ``python -m experiments.run
CONFIG`` would; ``--set`` applies to every selected config. All of them are
validated before the first one runs.
"""

import argparse
from typing import Optional, Sequence

from experiments import config as config_lib
from experiments import reproduce
from experiments import run as run_lib


def main(argv: Optional[Sequence[str]] = None) -> list:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.reproduce",
      description=__doc__.split("\n\n")[0],
      epilog="reproductions: " + ", ".join(
          f"{k} ({v[0]})" for k, v in reproduce.CONFIGS.items()))
  parser.add_argument("names", nargs="+", metavar="NAME",
                      choices=["all", *reproduce.CONFIGS],
                      help="'all' or reproductions to run")
  parser.add_argument("--set", action="append", default=[],
                      metavar="KEY=VALUE", dest="overrides",
                      help="override a (dotted) key of every config")
  args = parser.parse_args(argv)
  names = reproduce.available() if "all" in args.names else args.names
  for name in set(reproduce.CONFIGS) - set(reproduce.available()):
    if "all" in args.names:
      print(f"skipping {name}: {reproduce.config_path(name)} is pending")
  prepared = []
  for name in names:
    path = reproduce.config_path(name)
    try:
      prepared.append((name, run_lib.prepare(config_lib.load(str(path)),
                                             args.overrides)))
    except (config_lib.ConfigError, OSError) as e:
      parser.error(f"{name}: {e}")
  records = []
  for name, (module, config) in prepared:
    print(f"== {name}: {reproduce.CONFIGS[name][0]}")
    records.append(module.run(config))
  return records


if __name__ == "__main__":
  main()
