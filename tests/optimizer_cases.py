"""Every registered optimizer (``test_conformance.CASES``) for any tree.

The conformance cases are built for one parameter tree; the reliability,
contrib and soak tests use others. :func:`build_for` builds a case for any
tree: K-FAC gets every rank-2 floating leaf registered as a dense layer
without bias, and its statistics are derived from the gradient itself,
``Â = I_{d_in}``, ``Γ̂ = Gᵀ`` (so ``Â Γ̂ᵀ = G``: the gradient written as one
example per input coordinate, finite exactly when the gradient is).

:func:`representatives` is one case per ready-made optimizer and statistics
algorithm (the first registered name of each), for the checks that compile
several programs per case: root-method variants and K-FAC's decomposition
methods share the code paths those checks exercise (the engine, the graft,
the chain), and every case still runs the cheap checks.
"""

import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import optax

import kronopt

sys.path.insert(0, os.path.dirname(__file__))
from test_conformance import CASES, representatives  # noqa: E402,F401


def is_kfac(name: str) -> bool:
  return "layers" in CASES[name].kwargs


def _registered(x) -> bool:
  return (engine_float(x) and jnp.ndim(x) == 2
          and min(jnp.shape(x)) >= 2)


def engine_float(x) -> bool:
  return kronopt.engine.is_float_leaf(x) and not jnp.issubdtype(
      jnp.result_type(x), jnp.complexfloating)


def kfac_layers(params, register=True):
  """K-FAC's registration of ``params``: rank-2 floating leaves as dense
  layers without bias (none with ``register=False``)."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree_util.tree_map(
      lambda x: (kronopt.KFACLayer.dense(None)
                 if register and _registered(x) else None),
      params, is_leaf=is_masked)


def kfac_stats(layers, grads):
  """Statistics with ``Â Γ̂ᵀ = G`` for every registered leaf."""
  is_layer = lambda x: x is None or isinstance(x, kronopt.KFACLayer)

  def stats(layer, g):
    if layer is None:
      return None
    g = jnp.asarray(g, jnp.float32)
    return kronopt.KFACStats(jnp.eye(g.shape[0], dtype=jnp.float32), g.T)

  return jax.tree_util.tree_map(stats, layers, grads, is_leaf=is_layer)


def build_for(name: str, params, register=True, **overrides
              ) -> tuple[optax.GradientTransformationExtraArgs, Callable]:
  """Case ``name`` for the tree ``params``: ``(tx, extra)`` with
  ``extra(grads) -> dict`` the extra arguments of an update."""
  case = CASES[name]
  kwargs = {**case.kwargs, **overrides}
  if not is_kfac(name):
    return case.fn(**kwargs), lambda grads: {}
  layers = kfac_layers(params, register)
  tx = case.fn(**{**kwargs, "layers": layers})
  return tx, lambda grads: {"kfac_stats": kfac_stats(layers, grads)}
