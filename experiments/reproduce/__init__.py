"""Reproductions of the seed papers' headline claims, one config each.

``python -m experiments.reproduce all`` (or a name, see :data:`CONFIGS`)
runs each config of ``configs/reproduce/`` through ``experiments.run``; each
writes its figure and ``results.json`` (config, versions, machine, numbers)
to its ``output_dir``. The experiment kinds are the modules of this package
(``experiment: reproduce.<module>``) and the framework's ``sweep``.
"""

import pathlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / (
    "reproduce")

# name -> (paper, config file)
CONFIGS = {
    "kradagrad_quadratic": ("Mei et al. 2023 (seed 000), synthetic",
                            "kradagrad_quadratic.yaml"),
    "kradagrad_autoencoder": ("Mei et al. 2023 (seed 000), autoencoder",
                              "kradagrad_autoencoder.yaml"),
    "kronecker_cosine": ("Morwani et al. 2024 (seed 002)",
                         "kronecker_cosine.yaml"),
    "caspr_distance": ("Duvvuri et al. 2024 (seed 003)",
                       "caspr_distance.yaml"),
    "sketchy_memory": ("Feinberg et al. 2023 (seed 004)",
                       "sketchy_memory.yaml"),
    "kfac_inversion_error": ("Puiu 2022 (seed 001), B-KFAC",
                             "kfac_inversion_error.yaml"),
}


def config_path(name: str) -> pathlib.Path:
  """The config file of reproduction ``name``."""
  return CONFIG_DIR / CONFIGS[name][1]


def available() -> list[str]:
  """The reproductions whose config exists (one may still be pending)."""
  return [k for k in CONFIGS if config_path(k).exists()]
