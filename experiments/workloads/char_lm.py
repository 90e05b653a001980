"""A character-level Transformer language model in Flax NNX.

Data: the English text of CPython's ``pydoc_data.topics`` (the help topics,
about 465 K characters; ships with Python, no download), topics joined in
sorted order; the first ``1 − val_fraction`` of the characters train, the
rest is held out. The vocabulary is every character of the text.

Model (GPT-style, pre-LayerNorm): token embedding + learned position
embedding, ``layers`` blocks of

    x ← x + Attention(LayerNorm(x)),   x ← x + MLP(LayerNorm(x)),

a final LayerNorm and an untied output layer (``Linear(d_model, vocab)``
with bias). Attention is causal, with ``nnx.LinearGeneral`` projections
shaped as in ``nnx.MultiHeadAttention``: query/key/value kernels
``(d_model, heads, head_dim)``, output kernel ``(heads, head_dim, d_model)``,
no biases; the MLP is ``Linear(d, 4d)`` → GELU → ``Linear(4d, d)`` with
biases. The optimizer sees the model's ``nnx.State`` of ``nnx.Param`` s, so
rank-3 attention kernels, the embeddings and rank-1 biases and scales, as a
user's model would give it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.workloads import base


def load_text() -> str:
  """The help topics of ``pydoc_data.topics``, joined in sorted key order."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return "\n\n".join(topics[k] for k in sorted(topics))


def encode(text: str) -> tuple[np.ndarray, str]:
  """``(ids, vocab)``: int32 ids into ``vocab``, the sorted characters."""
  vocab = "".join(sorted(set(text)))
  lookup = {c: i for i, c in enumerate(vocab)}
  return np.fromiter(map(lookup.__getitem__, text), np.int32, len(text)), vocab


class Attention(nnx.Module):
  """Causal multi-head self-attention with ``nnx.LinearGeneral`` kernels."""

  def __init__(self, d_model: int, heads: int, *, rngs: nnx.Rngs):
    if d_model % heads:
      raise ValueError(f"d_model={d_model} must be a multiple of "
                       f"heads={heads}.")
    proj = functools.partial(nnx.LinearGeneral, d_model,
                             (heads, d_model // heads), use_bias=False,
                             rngs=rngs)
    self.query, self.key, self.value = proj(), proj(), proj()
    self.out = nnx.LinearGeneral((heads, d_model // heads), d_model,
                                 axis=(-2, -1), use_bias=False, rngs=rngs)

  def __call__(self, x):
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, T, H, D]
    return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True))


class Block(nnx.Module):
  """``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

  def __init__(self, d_model: int, heads: int, mlp_ratio: int, *,
               rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = Attention(d_model, heads, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.fc1 = nnx.Linear(d_model, mlp_ratio * d_model, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * d_model, d_model, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nnx.Module):
  """Tokens ``[B, T]`` → next-token logits ``[B, T, vocab]``."""

  def __init__(self, vocab_size: int, *, layers: int, d_model: int,
               heads: int, seq_len: int, mlp_ratio: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.pos = nnx.Embed(seq_len, d_model, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, heads, mlp_ratio, rngs=rngs)
                            for _ in range(layers)])
    self.ln = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


@base.register
class CharLM(base.Workload):
  """Next-character prediction on ``pydoc_data.topics`` (see module doc).

  Attributes:
    train_tokens: the training characters as ids, ``[N]``.
    val_windows: the held-out windows of ``seq_len + 1`` ids, ``[E, T+1]``.
    model: the ``TransformerLM`` constructor (hashable, see ``base.Model``).
    graphdef: the model's NNX graph definition.
    seq_len: context length ``T``.
    batch_size: windows per training batch.
  """
  train_tokens: jax.Array
  val_windows: jax.Array
  model: base.Model = base.static()
  graphdef: nnx.GraphDef = base.static()
  seq_len: int = base.static()
  batch_size: int = base.static()

  def init(self, key):
    return self.model.init(key)

  def logits(self, params, tokens):
    return nnx.merge(self.graphdef, params)(tokens)

  def batch(self, key):
    starts = jax.random.randint(key, (self.batch_size,), 0,
                                self.train_tokens.shape[0] - self.seq_len)
    window = lambda s: jax.lax.dynamic_slice(self.train_tokens, (s,),
                                             (self.seq_len + 1,))
    return jax.vmap(window)(starts)

  def loss(self, params, batch):
    return self._metrics(params, batch)["loss"]

  def evaluate(self, params):
    metrics = self._metrics(params, self.val_windows)
    metrics["bits_per_char"] = metrics["loss"] / jnp.log(2.0)
    return metrics

  def _metrics(self, params, windows):
    return base.classification_metrics(
        self.logits(params, windows[:, :-1]), windows[:, 1:])


def make(layers: int = 2, d_model: int = 64, heads: int = 4,
         seq_len: int = 64, batch_size: int = 32, mlp_ratio: int = 4,
         val_fraction: float = 0.1, eval_windows: int = 128) -> CharLM:
  """The character LM workload.

  Args:
    layers: Transformer blocks.
    d_model: model width.
    heads: attention heads (``d_model`` must be a multiple).
    seq_len: context length.
    batch_size: windows per training batch.
    mlp_ratio: MLP hidden width over ``d_model``.
    val_fraction: held-out tail of the text.
    eval_windows: held-out windows evaluated, evenly spaced over the
      held-out text.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction={val_fraction} is out of range; "
                     "expected a value in (0, 1).")
  ids, vocab = encode(load_text())
  split = int(round(len(ids) * (1.0 - val_fraction)))
  val = ids[split:]
  if len(val) <= seq_len:
    raise ValueError(f"seq_len={seq_len} is out of range; the held-out text "
                     f"has only {len(val)} characters.")
  starts = np.linspace(0, len(val) - seq_len - 1, eval_windows).astype(int)
  windows = np.stack([val[s:s + seq_len + 1] for s in starts])
  model = base.model(TransformerLM, len(vocab), layers=layers,
                     d_model=d_model, heads=heads, seq_len=seq_len,
                     mlp_ratio=mlp_ratio)
  return CharLM(jnp.asarray(ids[:split]), jnp.asarray(windows), model,
                model.graphdef(), seq_len, batch_size)
