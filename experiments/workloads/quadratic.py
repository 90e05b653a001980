"""The ill-conditioned Kronecker quadratic (docs/algorithms.md §2).

``f(W) = ⟨W, H₀ W H₁⟩`` with ``H_i = Q_i diag(λ) Q_iᵀ``, random orthogonal
``Q_i`` and ``λ_j = 10^{-s_j²}``, ``s_j`` evenly spaced on ``[0, √c]``,
rescaled to ``max λ = 10``: condition number ``10^c`` per factor and
``10^{2c}`` for the Hessian ``2 H₁ ⊗ H₀``. The synthetic problem of
KrADagrad (Mei et al. 2023), on which a Kronecker-factored preconditioner is
exact up to its damping. The gradient is deterministic (no batches): the
minimum is ``f(0) = 0``, so the held-out loss is ``f`` itself.
"""

import jax
import jax.numpy as jnp

from experiments.reproduce import problems
from experiments.workloads import base


@base.register
class KroneckerQuadratic(base.Workload):
  """``f(W) = ⟨W, H₀ W H₁⟩`` in float32; parameters ``{"w": W}``."""
  h0: jax.Array
  h1: jax.Array

  def init(self, key):
    return {"w": jax.random.normal(key, self.h0.shape[:1] + self.h1.shape[:1],
                                   self.h0.dtype)}

  def batch(self, key):
    del key
    return None

  def loss(self, params, batch):
    del batch
    return problems.quadratic_loss(params["w"], self.h0, self.h1)

  def evaluate(self, params):
    return {"loss": self.loss(params, None)}


def make(d: int = 64, c: float = 3.0, problem_seed: int = 0
         ) -> KroneckerQuadratic:
  """The quadratic with ``d×d`` parameters and per-factor condition
  ``10^c``; ``H₀, H₁`` drawn with ``problem_seed`` (the initial ``W`` with
  the run's seed)."""
  if d < 2:
    raise ValueError(f"d={d} is out of range; expected an integer >= 2.")
  if not c > 0:
    raise ValueError(f"c={c} is out of range; expected a number > 0.")
  h0, h1, _ = problems.kronecker_quadratic(d, c, problem_seed)
  return KroneckerQuadratic(jnp.asarray(h0, jnp.float32),
                            jnp.asarray(h1, jnp.float32))
