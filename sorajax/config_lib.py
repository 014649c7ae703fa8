"""Loading configs (`configs/NAME.py[:ARG]`), `--config.KEY=VALUE` overrides, validation."""
from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections

from sorajax.errors import UserError


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the ConfigDict returned by its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file {path!r}")
    modname = "sorajax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(modname, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"--config: {path!r} is not a Python config file (configs/NAME.py)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is the user's input
        raise UserError(f"--config: {path} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"--config: {path} has no get_config()")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except TypeError:
        cfg = module.get_config()
    except (ValueError, KeyError) as e:
        raise UserError(f"--config: {path}:{arg}: {e}") from e
    return cfg


def _coerce(old, text: str):
    if isinstance(old, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(old, int) and not isinstance(old, bool):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    if old is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if isinstance(old, (tuple, list)):
        val = ast.literal_eval(text)
        if not isinstance(val, (tuple, list)):
            val = (val,)
        return type(old)(val)
    return ast.literal_eval(text)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` strings. Unknown keys and bad values raise UserError."""
    for item in overrides:
        if not item.startswith("--config."):
            raise UserError(f"unrecognized argument {item!r}")
        body = item[len("--config."):]
        if "=" not in body:
            raise UserError(f"override {item!r} needs a value: --config.KEY=VALUE")
        key, value = body.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise UserError(f"unknown config key {key!r}")
            node = node[p]
        last = parts[-1]
        if not isinstance(node, ml_collections.ConfigDict) or last not in node:
            raise UserError(f"unknown config key {key!r}")
        try:
            with node.unlocked():
                node[last] = _coerce(node[last], value)
        except (ValueError, TypeError, SyntaxError) as e:
            raise UserError(f"config key {key!r}: bad value {value!r} ({e})") from e
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))
