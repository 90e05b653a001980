"""Batched LAPACK decompositions that are safe on a CPU.

jaxlib's CPU kernels for batched ``eigh`` and ``svd`` split the batch over
XLA's intra-op thread pool and block until every piece is done. When two such
calls run at once (a refresh decomposes several factors, and XLA runs
independent operations concurrently), they can occupy every thread of a small
pool while waiting for pieces that have no thread left to run on: the step
deadlocks (seen with jaxlib 0.10.2 on a 2-core host, single device and
simulated multi-device alike). On CPU the functions here therefore decompose
one matrix at a time with ``lax.map``, which never blocks on the pool; on
GPU/TPU they make the usual batched call. ``qr`` goes the same way.
"""

import jax
import jax.numpy as jnp


def _cpu_one_at_a_time(fn, a):
  """``fn`` over the leading axes of ``a``: sequential on CPU, else batched."""

  def sequential(x):
    flat = jnp.reshape(x, (-1,) + x.shape[-2:])
    out = jax.lax.map(fn, flat)
    return jax.tree_util.tree_map(
        lambda o: jnp.reshape(o, x.shape[:-2] + o.shape[1:]), out)

  return jax.lax.platform_dependent(a, cpu=sequential, default=fn)


def eigh(a):
  """``(λ, Q)`` with ``A = Q diag(λ) Qᵀ`` for a stack ``[..., d, d]``."""
  return _cpu_one_at_a_time(lambda x: tuple(jnp.linalg.eigh(x)), a)


def svd(a):
  """Thin ``(U, s, Vᵀ)`` for a stack ``[..., m, n]``."""
  return _cpu_one_at_a_time(
      lambda x: tuple(jnp.linalg.svd(x, full_matrices=False)), a)


def qr(a):
  """Reduced ``(Q, R)`` with ``A = Q R`` for a stack ``[..., m, n]``."""
  return _cpu_one_at_a_time(lambda x: tuple(jnp.linalg.qr(x)), a)
