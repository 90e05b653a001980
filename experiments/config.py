"""Experiment configs: YAML loading, ``--set`` overrides, schema validation.

A schema is a dict from key to :class:`Field`; a field's ``check`` takes the
value and its dotted path and returns the value (normalised, defaults of
nested schemas filled in) or raises :class:`ConfigError` naming the path.
Validation happens once, before any work, so a typo in a key or a value of
the wrong type fails at start with the key's full dotted name.

Schemas of callables (workload constructors, optimizers) are derived from
their signatures by :func:`signature_schema`: a keyword with a default
accepts a value of the default's type.
"""

import inspect
import numbers
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import yaml

REQUIRED = object()


class ConfigError(ValueError):
  """A config key is unknown, missing or of the wrong type."""


class Field(NamedTuple):
  """One key of a schema: ``check(value, path) -> value`` and a default."""
  check: Callable[[Any, str], Any]
  default: Any = REQUIRED
  doc: str = ""


class _Loader(yaml.SafeLoader):
  """A safe loader that also reads ``3e-3`` (no dot) as a float.

  PyYAML follows YAML 1.1, where such numbers are strings.
  """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
  """A YAML scalar or flow collection: ``3e-3``, ``[1, 2]``, ``{a: 1}``."""
  return yaml.load(text, Loader=_Loader)


def load(path: str) -> dict[str, Any]:
  with open(path) as f:
    config = yaml.load(f, Loader=_Loader)
  if not isinstance(config, dict):
    raise ConfigError(f"{path}: expected a mapping at the top level, got "
                      f"{type(config).__name__}.")
  return config


def apply_overrides(config: dict[str, Any],
                    overrides: Sequence[str]) -> dict[str, Any]:
  """Applies ``key.sub=value`` overrides (values parsed as YAML) in order.

  Missing intermediate mappings are created; validation later rejects keys
  that the schema does not know.
  """
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"--set {item!r}: expected KEY=VALUE.")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ConfigError(f"--set {item!r}: "
                          f"{'.'.join(parents[:i + 1])} is not a mapping.")
    node[leaf] = parse_value(text)
  return config


def _join(path: str, key: Any) -> str:
  return f"{path}.{key}" if path else str(key)


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
  return ConfigError(f"config key {path!r}: expected {expected}, got "
                     f"{value!r} ({type(value).__name__}).")


def validate(config: Any, schema: Mapping[str, Field], path: str = ""
             ) -> dict[str, Any]:
  """``config`` checked against ``schema``, with defaults filled in.

  Raises:
    ConfigError: naming the dotted path of an unknown key, a missing
      required key or a value of the wrong type.
  """
  if not isinstance(config, Mapping):
    raise _type_error(path or "<top level>", "a mapping", config)
  unknown = [k for k in config if k not in schema]
  if unknown:
    raise ConfigError(
        f"config key {_join(path, unknown[0])!r} is unknown; expected one of "
        f"{', '.join(sorted(map(str, schema)))}.")
  out = {}
  for key, field in schema.items():
    if key in config:
      out[key] = field.check(config[key], _join(path, key))
    elif field.default is REQUIRED:
      raise ConfigError(f"config key {_join(path, key)!r} is required.")
    else:
      out[key] = field.default
  return out


# Checks: each ``check(value, path) -> value``.


def anything(value, path):
  del path
  return value


def boolean(value, path):
  if not isinstance(value, bool):
    raise _type_error(path, "true or false", value)
  return value


def integer(low: Optional[int] = None):
  def check(value, path):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise _type_error(path, "an integer", value)
    if low is not None and value < low:
      raise ConfigError(f"config key {path!r}: {value} is out of range; "
                        f"expected an integer >= {low}.")
    return int(value)
  return check


def number(positive: bool = False):
  def check(value, path):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise _type_error(path, "a number", value)
    if positive and not value > 0:
      raise ConfigError(f"config key {path!r}: {value} is out of range; "
                        "expected a number > 0.")
    return float(value)
  return check


def string(choices: Optional[Sequence[str]] = None):
  def check(value, path):
    if not isinstance(value, str):
      raise _type_error(path, "a string", value)
    if choices is not None and value not in choices:
      raise ConfigError(f"config key {path!r}: {value!r} is not one of "
                        f"{', '.join(map(repr, choices))}.")
    return value
  return check


def list_of(item: Callable[[Any, str], Any], min_len: int = 1):
  def check(value, path):
    if not isinstance(value, (list, tuple)) or len(value) < min_len:
      raise _type_error(path, f"a list of at least {min_len} item(s)", value)
    return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]
  return check


def scalar_or_list(item: Callable[[Any, str], Any]):
  """One value or a non-empty list of them (a grid); always a list."""
  def check(value, path):
    if isinstance(value, (list, tuple)):
      return list_of(item)(value, path)
    return [item(value, path)]
  return check


def nested(schema: Mapping[str, Field]):
  return lambda value, path: validate(value, schema, path)


def mapping_of(item: Callable[[Any, str], Any], min_len: int = 1):
  """A mapping from free labels to values checked by ``item``."""
  def check(value, path):
    if not isinstance(value, Mapping) or len(value) < min_len:
      raise _type_error(path, f"a mapping of at least {min_len} item(s)",
                        value)
    return {k: item(v, _join(path, k)) for k, v in value.items()}
  return check


def like(default: Any) -> Callable[[Any, str], Any]:
  """The check for a keyword whose default is ``default``."""
  if isinstance(default, bool):
    return boolean
  if isinstance(default, numbers.Integral):
    return integer()
  if isinstance(default, numbers.Real):
    return number()
  if isinstance(default, str):
    return string()
  if isinstance(default, (list, tuple)):
    return list_of(like(default[0]) if default else anything, min_len=0)
  return anything


def signature_schema(fn: Callable, skip: Sequence[str] = ()
                     ) -> Optional[dict[str, Field]]:
  """The keywords of ``fn`` as a schema (``None`` if it takes ``**kwargs``).

  A keyword with a default accepts a value of the default's type (an integer
  where a float is expected, not the reverse); one without is required.
  """
  schema = {}
  for name, p in inspect.signature(fn).parameters.items():
    if p.kind is p.VAR_KEYWORD:
      return None
    if name in skip or p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
      continue
    if p.default is p.empty:
      schema[name] = Field(anything)
    else:
      schema[name] = Field(like(p.default), p.default)
  return schema


def defaults_schema(defaults: Mapping[str, Any]) -> dict[str, Field]:
  """A schema from a dict of defaults: every key optional, typed by value."""
  return {k: Field(like(v), v) for k, v in defaults.items()}
