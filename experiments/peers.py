"""Peers of kronopt from the package registry, for the benchmark's --peers.

``pip install -e ".[peers]"`` installs them; nothing else (tests, CI) needs
them. Each entry of :data:`PEERS` is a spec ``{"name": ..., **keywords}``
like the benchmark's own, timed in its loop on the same MLP and batch:

* ``muon``: ``optax.contrib.muon`` (Jordan et al. 2024; Adam on the
  non-matrix leaves), an optax transform;
* ``psgd_kron``: ``psgd_jax.kron.kron`` (PSGD Kron, Li 2018), an optax
  transform;
* ``distributed_shampoo``: google-research ``precondition-opt``'s
  ``distributed_shampoo`` (Anil et al. 2020), an optax transform (the PyPI
  release has no ``tearfree`` module, so tearfree Shampoo and Sketchy are
  not peers here);
* ``kfac_jax``: DeepMind's ``kfac_jax.Optimizer`` (Botev & Martens), which
  owns the training step: :func:`kfac_jax_step` gives it the loss with the
  softmax cross-entropy registered (``register_softmax_cross_entropy_loss``)
  and lets its graph matcher register the dense layers (bias folded in, as
  kronopt's capture does).

A peer that is not installed, does not import, or fails on its first steps
raises :class:`Unavailable` with the reason; the benchmark prints it and
goes on. :func:`version` gives the installed distribution's version.
"""

import importlib
import importlib.metadata
import importlib.util
import itertools
from typing import Any, Callable, Optional

import jax
import optax

# name -> (distribution on the package registry, module imported)
PACKAGES = {
    "muon": ("optax", "optax.contrib"),
    "psgd_kron": ("psgd-jax", "psgd_jax.kron"),
    "distributed_shampoo": ("precondition-opt",
                            "precondition.distributed_shampoo"),
    "kfac_jax": ("kfac-jax", "kfac_jax"),
}

# kfac_jax at kronopt.kfac's cadence and statistics (empirical Fisher,
# ρ 0.95, T_cov 10, T_inv 100, momentum 0.9, fixed learning rate; its
# damping is absolute, kronopt's relative to the largest eigenvalue), and
# as its own README runs it (adaptive learning rate, momentum and damping
# from the quadratic model, its default cadences and estimator).
PEERS = [
    {"name": "muon"},
    {"name": "psgd_kron"},
    {"name": "distributed_shampoo", "block_size": 1024,
     "preconditioning_compute_steps": 10},
    {"name": "kfac_jax", "momentum": 0.9, "damping": 1e-3,
     "curvature_ema": 0.95, "curvature_update_period": 10,
     "inverse_update_period": 100, "estimation_mode": "fisher_empirical"},
    {"name": "kfac_jax", "adaptive": True, "damping": 1.0},
]


class Unavailable(Exception):
  """A peer cannot run here; ``str(error)`` says why."""


def is_peer(spec) -> bool:
  return spec["name"] in PACKAGES


def distribution(spec) -> str:
  return PACKAGES[spec["name"]][0]


def version(spec) -> Optional[str]:
  """The installed version of the peer's distribution, or ``None``."""
  try:
    return importlib.metadata.version(distribution(spec))
  except importlib.metadata.PackageNotFoundError:
    return None


def _import(spec):
  """The peer's module, or :class:`Unavailable` saying why not."""
  dist, module = PACKAGES[spec["name"]]
  top = module.split(".")[0]
  if importlib.util.find_spec(top) is None or version(spec) is None:
    raise Unavailable(f"{dist} is not installed (pip install -e "
                      "\".[peers]\")")
  try:
    return importlib.import_module(module)
  except Exception as e:  # pylint: disable=broad-except
    raise Unavailable(f"{dist} {version(spec)} does not import with jax "
                      f"{jax.__version__}, optax {optax.__version__}: "
                      f"{type(e).__name__}: {e}") from e


def failure(spec, error: Exception) -> Unavailable:
  """:class:`Unavailable` for a peer that imported but failed to run."""
  return Unavailable(f"{distribution(spec)} {version(spec)} fails with jax "
                     f"{jax.__version__}: {type(error).__name__}: {error}")


def owns_step(spec) -> bool:
  """Whether the peer is not an optax transform (it owns the step)."""
  return spec["name"] == "kfac_jax"


def transform(spec, learning_rate: float) -> optax.GradientTransformation:
  """The optax transform of a peer that is one."""
  module = _import(spec)
  kwargs = {k: v for k, v in spec.items() if k != "name"}
  name = spec["name"]
  if name == "muon":
    return module.muon(learning_rate, **kwargs)
  if name == "psgd_kron":
    return module.kron(learning_rate, **kwargs)
  if name == "distributed_shampoo":
    return module.distributed_shampoo(learning_rate, **kwargs)
  raise ValueError(f"name={name!r}: not a transform peer; expected one of "
                   "muon, psgd_kron, distributed_shampoo.")


def kfac_jax_compat() -> Optional[str]:
  """Adapts kfac-jax ≤ 0.0.8 to jax ≥ 0.10, if needed; what was patched.

  kfac-jax's graph matcher evaluates a jaxpr equation with the old protocol
  ``subfuns, params = primitive.get_bind_params(params)``; jax 0.10's
  ``get_bind_params`` returns the bind parameters only, and its own
  ``eval_jaxpr`` binds ``primitive.bind(*inputs, **params)``. Without this,
  kfac-jax fails on its first step ("too many values to unpack"). The
  replacement does what jax's ``eval_jaxpr`` does; it is installed only
  when the probe sees the new protocol, and the benchmark records it.
  """
  tgm = importlib.import_module("kfac_jax._src.tag_graph_matcher")
  eqn = jax.make_jaxpr(lambda v: v + 1.0)(1.0).eqns[0]
  if not isinstance(eqn.primitive.get_bind_params(eqn.params), dict):
    return None
  if getattr(tgm.eval_jaxpr_eqn, "kronopt_compat", False):
    return KFAC_JAX_PATCH

  def eval_jaxpr_eqn(eqn, in_values):
    params = eqn.primitive.get_bind_params(eqn.params)
    with tgm.jex.source_info_util.user_context(eqn.source_info.traceback):
      out = eqn.primitive.bind(*in_values, **params)
    return out if isinstance(out, list) else [out]

  eval_jaxpr_eqn.kronopt_compat = True
  tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
  return KFAC_JAX_PATCH


KFAC_JAX_PATCH = ("kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn replaced "
                  "for jax>=0.10's Primitive.get_bind_params (returns the "
                  "bind parameters only)")


def kfac_jax_step(spec, model, params, x, y, learning_rate: float
                  ) -> tuple[Callable[..., Any], Any, Optional[str]]:
  """``(step, state, patch)`` of ``kfac_jax.Optimizer`` on ``model``.

  ``step(params, state, x, y) -> (params, state, loss)`` calls the
  optimizer's own (internally jitted) ``step`` on the batch with a fresh
  key and the global step; ``loss`` is the batch loss before the update,
  as in the benchmark's other steps. ``spec``'s keywords go to
  ``kfac_jax.Optimizer``; ``adaptive: true`` turns on its adaptive
  learning rate, momentum and damping (``damping`` is then the initial
  one), otherwise ``learning_rate``, ``momentum`` and ``damping`` are
  constant schedules.
  """
  kfac_jax = _import(spec)
  patch = kfac_jax_compat()

  def loss_fn(params, batch):
    inputs, labels = batch
    logits = model.apply(params, inputs)
    kfac_jax.register_softmax_cross_entropy_loss(logits, labels)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()

  kwargs = {k: v for k, v in spec.items() if k != "name"}
  damping = kwargs.pop("damping", 1e-3)
  if kwargs.pop("adaptive", False):
    kwargs.update(use_adaptive_learning_rate=True, use_adaptive_momentum=True,
                  use_adaptive_damping=True, initial_damping=damping)
  else:
    momentum = kwargs.pop("momentum", 0.9)
    kwargs.update(learning_rate_schedule=lambda _: learning_rate,
                  momentum_schedule=lambda _: momentum,
                  damping_schedule=lambda _: damping)
  rng = jax.random.PRNGKey(0)
  try:
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
        num_burnin_steps=0, multi_device=False, **kwargs)
    state = opt.init(params, rng, (x, y))
  except Exception as e:  # pylint: disable=broad-except
    raise failure(spec, e) from e
  counter = itertools.count()

  def step(params, state, x, y):
    t = next(counter)
    params, state, stats = opt.step(params, state, jax.random.fold_in(rng, t),
                                    batch=(x, y), global_step_int=t)
    return params, state, stats["loss"]

  return step, state, patch
