"""Configs as code: `configs/<name>.py:<arg>` plus `--config.a.b=value` overrides.

    config = config_lib.load("configs/synthetic.py:smoke", ["train.batch_size=8"])

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`. Overrides are
parsed with the type of the value they replace (bool accepts true/false/1/0; tuples and lists
are parsed as Python literals). An unknown key is a `ConfigError` whose one-line message names
the closest valid keys.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Iterable

import ml_collections


class ConfigError(ValueError):
  """A bad --config path, argument or override; the message is one line."""


def _import_file(path: str):
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  # Config files import their shared pieces as `configs.common`: make the repository root
  # (the folder above configs/) importable whatever the working directory.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  name = "_dynrefer_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg)")
  return module


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    full = f"{prefix}{k}"
    keys.append(full)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(all_keys(v, full + "."))
  return keys


def _parse_value(raw: str, current):
  if isinstance(current, bool):
    low = raw.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected a boolean, got {raw!r}")
  if isinstance(current, int) and not isinstance(current, bool):
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"expected an integer, got {raw!r}") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"expected a number, got {raw!r}") from None
  if isinstance(current, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(current)(value)
  return value


def override(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies 'a.b.c=value' strings in place and returns the config."""
  valid = all_keys(config)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"unknown config key {key!r}{hint}")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    current = node[leaf]
    try:
      value = _parse_value(raw, current)
    except ConfigError as e:
      raise ConfigError(f"config.{key}: {e}") from None
    with node.ignore_type():
      node[leaf] = value
  return config


def load(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads 'path/to/config.py[:arg]' and applies overrides."""
  path, _, arg = spec.partition(":")
  module = _import_file(path)
  try:
    config = module.get_config(arg or None)
  except ConfigError:
    raise
  except (ValueError, KeyError) as e:
    raise ConfigError(f"{path}: bad config argument {arg!r}: {e}") from None
  return override(config, overrides)


def split_argv(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
  """Separates `--config=...` and `--config.x=...` from the other flags."""
  rest, spec, overrides = [], None, []
  it = iter(argv)
  for a in it:
    if a == "--config":
      spec = next(it, None)
    elif a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a.startswith("--config."):
      if "=" not in a:
        nxt = next(it, None)
        if nxt is None:
          raise ConfigError(f"{a} needs a value")
        a = f"{a}={nxt}"
      overrides.append(a[len("--config."):])
    else:
      rest.append(a)
  return rest, spec, overrides
