"""Test session setup: XLA's cheapest CPU compilation for every program.

The suite compiles hundreds of small programs and runs each for a few
steps, so compilation is most of its time; optimisation level 0 without the
expensive LLVM passes (tests/fast_jit.py) compiles them faster and changes
no result beyond rounding, which every test's tolerance covers. Set here,
before any test module imports JAX.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import fast_jit  # noqa: E402  pylint: disable=g-import-not-at-top

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), fast_jit.XLA_FLAGS]))

