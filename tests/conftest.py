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
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), fast_jit.XLA_FLAGS]))


def _shared_fixtures(item):
  """``(name, param)`` of the module- or session-scoped fixtures of this
  project that ``item`` uses."""
  callspec = getattr(item, "callspec", None)
  params = callspec.params if callspec else {}
  return sorted(
      (name, str(params.get(name, "")))
      for name, defs in item._fixtureinfo.name2fixturedefs.items()  # pylint: disable=protected-access
      if defs[-1].scope in ("module", "session") and defs[-1].baseid)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the groups
def pytest_collection_modifyitems(items):
  """Under pytest-xdist (``--dist loadgroup``), the tests sharing a module-
  or session-scoped fixture (and its parameter) run on one worker, so each
  such fixture (a subprocess with 8 devices, a tiny sweep) is built once."""
  for item in items:
    shared = _shared_fixtures(item)
    if shared:
      item.add_marker(pytest.mark.xdist_group(
          f"{item.module.__name__}:{shared}"))
