"""Invalid hyperparameters raise ValueError at construction (docs/contracts.md).

The message must name the argument, the value and the valid range.
"""

import optax
import pytest

import kronopt

# (factory, bad keyword arguments, text the message must contain)
BAD = [
    (kronopt.scale_by_shampoo, dict(block_size=1), ["block_size=1", ">= 2"]),
    (kronopt.scale_by_shampoo, dict(block_size=8.5), ["block_size=8.5",
                                                      "integer"]),
    (kronopt.scale_by_shampoo, dict(b2=0.0), ["b2=0.0", "(0.0, 1.0]"]),
    (kronopt.scale_by_shampoo, dict(b2=1.5), ["b2=1.5", "(0.0, 1.0]"]),
    (kronopt.scale_by_shampoo, dict(epsilon=-1e-3), ["epsilon=-0.001",
                                                     "(0.0, inf)"]),
    (kronopt.scale_by_shampoo, dict(epsilon=0.0), ["epsilon=0.0",
                                                   "(0.0, inf)"]),
    (kronopt.scale_by_shampoo, dict(exponent=0.5), ["exponent=0.5",
                                                    "[-1.0, 0.0)"]),
    (kronopt.scale_by_shampoo, dict(root_method="svd"), ["root_method='svd'",
                                                         "'eigh', 'newton', 'qr'"]),
    (kronopt.scale_by_shampoo, dict(root_method="newton", exponent=-0.3),
     ["exponent=-0.3", "integer p"]),
    (kronopt.scale_by_shampoo, dict(precondition_every=0),
     ["precondition_every=0", "[1, 2147483647]"]),
    (kronopt.scale_by_shampoo, dict(start_preconditioning_step=-1),
     ["start_preconditioning_step=-1", "[0, 2147483647]"]),
    (kronopt.scale_by_shampoo, dict(inverse_failure_threshold=0.0),
     ["inverse_failure_threshold=0.0", "(0.0, inf)"]),
    (kronopt.scale_by_shampoo, dict(newton_max_iters=0),
     ["newton_max_iters=0", ">= 1"]),
    (kronopt.shampoo, dict(learning_rate=-1.0), ["learning_rate=-1.0"]),
    (kronopt.shampoo, dict(learning_rate=1e-3, b1=1.0), ["b1=1.0",
                                                         "[0.0, 1.0)"]),
    (kronopt.shampoo, dict(learning_rate=1e-3, weight_decay=-0.1),
     ["weight_decay=-0.1"]),
    (kronopt.shampoo, dict(learning_rate=1e-3, graft_type="lion"),
     ["graft_type='lion'", "'adam'"]),
    (lambda **kw: kronopt.graft(optax.identity(), **kw), dict(magnitude="x"),
     ["magnitude='x'", "'sgd'"]),
]


@pytest.mark.parametrize("factory, kwargs, needles", BAD,
                         ids=[str(sorted(b[1])) for b in BAD])
def test_bad_hyperparameter_raises_clear_error(factory, kwargs, needles):
  with pytest.raises(ValueError) as err:
    factory(**kwargs)
  for needle in needles:
    assert needle in str(err.value), (needle, str(err.value))


def test_good_hyperparameters_construct():
  kronopt.shampoo(optax.cosine_decay_schedule(1e-3, 100), b2=1.0,
                  epsilon=1e-30, exponent=-0.25, root_method="newton")
  kronopt.scale_by_shampoo(exponent=-0.3, root_method="eigh")
