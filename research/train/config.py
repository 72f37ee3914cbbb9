"""Load experiment configs (Python files with ``get_config(arg)``) and apply overrides.

``load("configs/x.py:quick", ["train.steps=10"])`` is what ``--config configs/x.py:quick
--config.train.steps=10`` does on the command line. Overrides keep each field's type, and an
unknown key is an error with the closest known keys.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys

import ml_collections


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # so a config can import its neighbours as `configs.common`
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("_scion_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config(arg) function")
    config = module.get_config(arg or None)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"config override {override!r} must look like key=value")
        set_key(config, key, value)
    config.lock()
    return config


def _keys(config, prefix="") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _keys(value, name + ".")
    return keys


def set_key(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set ``config.<dotted>`` from command-line text, parsed as the field's current type."""
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict):
            break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        near = difflib.get_close_matches(dotted, _keys(config), n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"unknown config key {dotted!r}{hint}")
    node[leaf] = parse_value(text, node[leaf], dotted)


def parse_value(text: str, current, key: str):
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config key {key!r} expects true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"config key {key!r} expects a {type(current).__name__}, "
                         f"got {text!r}") from None
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if current is not None and not isinstance(value, type(current)) and not (
            isinstance(current, (tuple, list)) and isinstance(value, (tuple, list))):
        raise ValueError(f"config key {key!r} expects a {type(current).__name__}, got {text!r}")
    return value
