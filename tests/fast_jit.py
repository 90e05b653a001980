"""``jax.jit`` with XLA's cheapest CPU compilation, for compile-bound tests.

The K-FAC and low-rank tests compile many small programs and run each for
a few steps: compilation is most of their time, and XLA's CPU backend at
optimisation level 0 without its expensive LLVM passes compiles them about
2.5× faster (run time is not what these tests measure). The options are
per call, so nothing else in the test process is affected.
"""

import jax

OPTIONS = {"xla_backend_optimization_level": 0,
           "xla_llvm_disable_expensive_passes": True}

# The same options as XLA flags: tests/conftest.py sets them for the whole
# test session (the suite is compile-bound: about 1.35× less wall time), and
# the tests that start a subprocess pass them on.
XLA_FLAGS = " ".join(f"--{k}={str(v).lower()}" for k, v in OPTIONS.items())


def jit(fn, **kwargs):
  """``jax.jit(fn, **kwargs)`` compiled with :data:`OPTIONS`."""
  return jax.jit(fn, compiler_options=OPTIONS, **kwargs)
