"""The ill-conditioned Kronecker quadratic of KrADagrad (docs/algorithms.md §2).

Mei, Moreno & Walters, "KrADagrad: Kronecker Approximation-Domination
Gradient Preconditioned Stochastic Optimization", UAI 2023, synthetic
experiment: ``f(W) = ⟨W, H₀ W H₁⟩`` with ``H_i = Q_i diag(λ) Q_iᵀ``, random
orthogonal ``Q_i`` and ``λ_j = 10^{-s_j²}``, ``s_j`` evenly spaced on
``[0, √c]``, rescaled so that ``max λ = 10`` (condition ``10^c`` per factor,
``10^{2c}`` for the Hessian ``2 H₁ ⊗ H₀``). Shared by the
``kronecker_quadratic`` workload and the reproduction.
"""

import jax.numpy as jnp
import numpy as np


def kronecker_quadratic(d: int, c: float, seed: int):
  """``(H₀, H₁, W₀)`` in float64 numpy: ``d×d`` factors of condition
  ``10^c`` drawn with ``seed``, and a standard normal ``W₀``."""
  rng = np.random.default_rng(seed)
  lam = 10.0 ** (-np.linspace(0.0, np.sqrt(c), d) ** 2)
  lam *= 10.0 / lam.max()

  def factor():
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * lam) @ q.T

  return factor(), factor(), rng.standard_normal((d, d))


def quadratic_loss(w, h0, h1):
  """``⟨W, H₀ W H₁⟩``."""
  return jnp.sum(w * (h0 @ w @ h1))
