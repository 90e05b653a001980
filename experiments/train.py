"""The training loop: one jitted ``lax.scan`` per chunk of steps.

A run of ``steps`` steps is ``steps / eval_every`` calls of one compiled
chunk, ``eval_every`` steps of

    batch = workload.batch(fold_in(data_key, t))
    loss, g = value_and_grad(workload.loss)(params, batch)
    updates, state = tx.update(g, state, params); params += updates

followed, outside the timed region, by ``workload.evaluate`` (also at step
0). The optimizer is built inside the traced chunk from its traced
hyperparameters (the peak learning rate and any swept float), so a
:class:`Trainer` compiles its chunk once (ahead of time, the compile time
recorded apart) for every grid point and seed. Each chunk returns its
per-step training losses and, where the state holds a kronopt
preconditioner, ``kronopt.diagnostics(state)``. Chunk wall times are taken
around the compiled call only, so that step times (and their ratio to a
baseline optimizer) exclude compilation and evaluation.

A run whose training loss turns non-finite stops there; the rest of its
curves is NaN.
"""

import functools
import math
import time
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kronopt
from experiments.workloads import base

MakeTx = Callable[[Mapping[str, jax.Array]], optax.GradientTransformation]


def _diagnostics(state) -> dict[str, jax.Array]:
  """``kronopt.diagnostics(state)``, or ``{}`` for a state without a kronopt
  preconditioner (optax's own optimizers)."""
  try:
    return kronopt.diagnostics(state)
  except ValueError:
    return {}


# XLA options that compile several times faster and run slower: for code
# that runs once per run (initialisation) and for quick checks.
QUICK_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


@functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
def init_params(workload: base.Workload, key) -> optax.Params:
  """``workload.init(key)``, compiled once per workload and model (quickly:
  random initialisers are slow to compile and run once)."""
  return workload.init(key)


def _chunk(workload: base.Workload, carry, hparams, *, make_tx: MakeTx,
           length: int):
  """``length`` training steps: ``(carry, losses [length], diagnostics)``."""
  tx = make_tx(hparams)

  def step(carry, _):
    params, opt_state, data_key, t = carry
    batch = workload.batch(jax.random.fold_in(data_key, t))
    loss, grads = jax.value_and_grad(workload.loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, data_key,
            t + 1), loss

  carry, losses = jax.lax.scan(step, carry, length=length)
  return carry, losses, _diagnostics(carry[1])


@jax.jit
def evaluate(workload: base.Workload, params) -> dict[str, jax.Array]:
  """``workload.evaluate(params)``, compiled once per workload and model."""
  return workload.evaluate(params)


def as_hparams(values: Mapping[str, float]) -> dict[str, jax.Array]:
  """Float32 scalars, so that every grid point has the same input types."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


class Trainer:
  """One optimizer (up to its traced hyperparameters) on one workload.

  Args:
    workload: what to train.
    make_tx: ``hparams -> optax.GradientTransformation``, called while
      tracing with ``hparams`` a dict of float32 scalars.
    steps: steps per run, a multiple of ``eval_every``.
    eval_every: steps per compiled chunk; evaluation after each.
    compiler_options: XLA options for compiling the chunk, e.g.
      :data:`QUICK_COMPILE` for a quick check; none for anything timed.
  """

  def __init__(self, workload: base.Workload, make_tx: MakeTx, *,
               steps: int, eval_every: int,
               compiler_options: Optional[Mapping[str, Any]] = None):
    if eval_every < 1 or steps % eval_every:
      raise ValueError(f"eval_every={eval_every} is out of range; expected a "
                       f"positive divisor of steps={steps}.")
    self.workload, self.steps, self.eval_every = workload, steps, eval_every
    self._init_state = jax.jit(lambda params, hp: make_tx(hp).init(params),
                               compiler_options=QUICK_COMPILE)
    self._compiler_options = dict(compiler_options or {})
    self._chunk = jax.jit(
        functools.partial(_chunk, make_tx=make_tx, length=eval_every),
        donate_argnums=1)
    self._compiled = None
    self.compile_seconds: Optional[float] = None

  def init(self, seed: int, hparams: Mapping[str, jax.Array]):
    """The carry ``(params, opt_state, data_key, t)`` of a run: the
    parameters from the first half of ``PRNGKey(seed)``, the batches from the
    second (the same for every optimizer)."""
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(self.workload, init_key)
    return (params, self._init_state(params, hparams), data_key,
            jnp.int32(0))

  def _compile(self, carry, hparams):
    lowered = self._chunk.lower(self.workload, carry, hparams)
    start = time.perf_counter()
    self._compiled = lowered.compile(
        compiler_options=self._compiler_options or None)
    self.compile_seconds = time.perf_counter() - start

  def run(self, seed: int, hparams: Mapping[str, float],
          progress: Optional[Any] = None) -> dict[str, Any]:
    """One run from ``PRNGKey(seed)`` (the same init and batches for every
    optimizer); its curves as lists of floats.

    Args:
      seed: seeds the initialization and the batches.
      hparams: ``learning_rate`` and the traced swept hyperparameters.
      progress: a tqdm bar (or anything with ``update(n)`` and
        ``set_postfix(**kw)``), advanced once per chunk.

    Returns:
      ``train_loss`` (per step), ``eval`` (``step``, ``seconds``: training
      wall time at each evaluation, and every metric of ``evaluate``),
      ``diagnostics`` (per chunk, where kronopt's), ``chunk_seconds``,
      ``wall_seconds``, ``compile_seconds``, ``diverged``.
    """
    hp = as_hparams(hparams)
    carry = self.init(seed, hp)
    if self._compiled is None:
      self._compile(carry, hp)
      if progress is not None:
        progress.reset()  # the bar's clock starts after compilation
    chunks = self.steps // self.eval_every
    losses, chunk_seconds, diags = [], [], []
    evals = [jax.device_get(evaluate(self.workload, carry[0]))]
    for _ in range(chunks):
      start = time.perf_counter()
      carry, chunk_losses, diag = self._compiled(self.workload, carry, hp)
      jax.block_until_ready(carry)
      chunk_seconds.append(time.perf_counter() - start)
      losses.append(np.asarray(chunk_losses, np.float64))
      diags.append(jax.device_get(diag))
      evals.append(jax.device_get(evaluate(self.workload, carry[0])))
      if progress is not None:
        progress.update(self.eval_every)
        progress.set_postfix(loss=f"{losses[-1][-1]:.4g}",
                             val=f"{float(evals[-1]['loss']):.4g}")
      if not np.all(np.isfinite(losses[-1])):
        break
    return self._record(losses, evals, diags, chunk_seconds)

  def _record(self, losses, evals, diags, chunk_seconds) -> dict[str, Any]:
    chunks = self.steps // self.eval_every
    pad = lambda xs, n: [float(x) for x in xs] + [math.nan] * (n - len(xs))
    train = np.concatenate(losses)
    elapsed = np.concatenate([[0.0], np.cumsum(chunk_seconds)])
    eval_curves = {"step": list(range(0, self.steps + 1, self.eval_every)),
                   "seconds": pad(elapsed, chunks + 1)}
    for key in evals[0]:
      eval_curves[key] = pad([e[key] for e in evals], chunks + 1)
    diagnostics = {key: [float(d[key]) for d in diags] for key in diags[0]}
    if diagnostics:
      diagnostics["step"] = eval_curves["step"][1:len(diags) + 1]
    return {
        "train_loss": pad(train, self.steps),
        "eval": eval_curves,
        "diagnostics": diagnostics,
        "chunk_seconds": [float(s) for s in chunk_seconds],
        "wall_seconds": float(np.sum(chunk_seconds)),
        "compile_seconds": self.compile_seconds,
        "diverged": bool(not np.all(np.isfinite(train))),
    }


def param_shapes(workload: base.Workload) -> dict[str, list[int]]:
  """The shape of every parameter, by its path (what the optimizer sees)."""
  shapes = jax.eval_shape(workload.init, jax.random.PRNGKey(0))
  return {jax.tree_util.keystr(path).removesuffix(".value"): list(leaf.shape)
          for path, leaf in
          jax.tree_util.tree_flatten_with_path(shapes)[0]}
