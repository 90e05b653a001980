"""The workload interface every experiment trains through.

A workload is a model, its data and its metrics, as four pure functions that
can be traced inside one jitted ``lax.scan``:

    init(key) -> params                 the initial parameters (a pytree)
    loss(params, batch) -> scalar       the mean loss over the batch
    batch(key) -> batch                 a training batch drawn from on-device
                                        data (``None`` for a deterministic
                                        objective)
    evaluate(params) -> {name: scalar}  held-out ``loss`` (always) and e.g.
                                        ``accuracy``

A workload is itself a pytree: its arrays (the data sets) are leaves and its
configuration is static, so the training loop passes it as an argument of the
compiled function instead of baking the data into the program as constants.
:func:`register` makes a class both a frozen dataclass and such a pytree;
:func:`static` marks a field as configuration.
"""

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
import optax


def static(**kwargs) -> Any:
  """A dataclass field that is static (hashable configuration, not data)."""
  return dataclasses.field(metadata={"static": True}, **kwargs)


def register(cls):
  """``cls`` as a frozen dataclass registered as a pytree (see module doc)."""
  return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(
      cls))


class Workload(abc.ABC):
  """A model, its data and its metrics (see the module docstring)."""

  @abc.abstractmethod
  def init(self, key: jax.Array) -> optax.Params:
    """The initial parameters drawn with ``key``."""

  @abc.abstractmethod
  def loss(self, params: optax.Params, batch: Any) -> jax.Array:
    """The mean training loss of ``params`` over ``batch``."""

  @abc.abstractmethod
  def batch(self, key: jax.Array) -> Any:
    """A training batch sampled with ``key`` (traceable)."""

  @abc.abstractmethod
  def evaluate(self, params: optax.Params) -> dict[str, jax.Array]:
    """Held-out metrics; ``"loss"`` is always one of them."""


def sample_rows(key: jax.Array, data, batch_size: int):
  """``batch_size`` rows of every array in ``data``, uniformly with
  replacement (one shared set of indices)."""
  n = jax.tree_util.tree_leaves(data)[0].shape[0]
  idx = jax.random.randint(key, (batch_size,), 0, n)
  return jax.tree_util.tree_map(lambda a: a[idx], data)


@dataclasses.dataclass(frozen=True)
class Model:
  """A hashable NNX module constructor, ``cls(*args, **kwargs, rngs=rngs)``.

  Equal configurations compare equal, so two workloads built alike share
  their compiled functions (a ``functools.partial`` compares by identity).
  """
  cls: type
  args: tuple = ()
  kwargs: tuple = ()  # (name, value) pairs

  def __call__(self, rngs: nnx.Rngs) -> nnx.Module:
    return self.cls(*self.args, **dict(self.kwargs), rngs=rngs)

  def graphdef(self) -> nnx.GraphDef:
    """The module's graph definition (built abstractly, no arrays)."""
    return nnx.graphdef(nnx.eval_shape(lambda: self(nnx.Rngs(0))))

  def init(self, key: jax.Array) -> nnx.State:
    """The module's parameters drawn with ``key``."""
    return split_params(self(nnx.Rngs(key)))[1]


def model(cls: type, *args, **kwargs) -> Model:
  return Model(cls, args, tuple(sorted(kwargs.items())))


def split_params(module: nnx.Module):
  """``(graphdef, params)``: the module's ``nnx.Param`` state and the rest.

  Raises:
    ValueError: if the module holds variables other than parameters (batch
      statistics, RNG state), which these pure workloads do not thread.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  if jax.tree_util.tree_leaves(rest):
    raise ValueError(f"{type(module).__name__} holds non-parameter state "
                     f"{rest}; the workloads thread parameters only.")
  return graphdef, params


def classification_metrics(logits: jax.Array, labels: jax.Array
                           ) -> dict[str, jax.Array]:
  """Mean cross-entropy and accuracy over every leading axis."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"loss": jnp.mean(loss),
          "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
