"""Loading configs (`configs/NAME.py[:ARG]`), `--config.KEY=VALUE` overrides, JSON round trips.

Every key a config may hold is declared once in sorajax/config_base.py. A config file changes
values of that base; `load_config` refuses a config that sets an undeclared key, overrides accept
exactly the declared keys, and `from_json` lays a saved config.json over the base (so a run
written before a key was declared still loads, with that key's default).
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os

import ml_collections

from sorajax import config_base
from sorajax.errors import UserError

# Free-form sections: their keys are model dataclass fields, checked by models.video.model_configs.
FREE_FORM = ("vae.overrides", "dit.overrides", "text.overrides")


def flat_keys(cfg, prefix: str = "") -> list[str]:
    """Dotted key paths of a ConfigDict's leaves; the free-form sections count as one leaf."""
    out = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)) and path not in FREE_FORM:
            out.extend(flat_keys(v, path + "."))
        else:
            out.append(path)
    return out


def undeclared_keys(cfg) -> list[str]:
    declared = set(flat_keys(config_base.get_config()))
    return sorted(k for k in flat_keys(cfg) if k not in declared)


def check_declared(cfg, where: str) -> None:
    bad = undeclared_keys(cfg)
    if bad:
        raise UserError(f"{where}: key(s) {bad} are not declared in sorajax/config_base.py "
                        "(declare a new setting there, with its default and a comment)")


def load_python_file(path: str, prefix: str, what: str, kind: str):
    """Executes the Python file `path` as a module named `prefix` + its stem (configs and
    experiments); a file that is not Python or fails to run is the user's input: UserError
    starting with `what`."""
    modname = prefix + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(modname, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{what} {path!r} is not {kind}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken file is the user's input
        raise UserError(f"{what} {path} failed to load: {type(e).__name__}: {e}") from e
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` -> the ConfigDict returned by its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file {path!r}")
    module = load_python_file(path, "sorajax_config_", "--config:", "a Python config file (configs/NAME.py)")
    if not hasattr(module, "get_config"):
        raise UserError(f"--config: {path} has no get_config()")
    takes_arg = bool(inspect.signature(module.get_config).parameters)
    if arg and not takes_arg:
        raise UserError(f"--config: {path} takes no argument (got :{arg})")
    try:
        cfg = module.get_config(arg) if takes_arg else module.get_config()
    except (ValueError, KeyError) as e:  # the config's own word on a bad argument
        raise UserError(f"--config: {path}:{arg}: {e}") from e
    except Exception as e:  # a bug inside get_config surfaces with its type, never retried
        raise UserError(f"--config: {path}:{arg}: get_config failed: {type(e).__name__}: {e}") from e
    check_declared(cfg, f"--config {spec}")
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
    """Applies `--config.a.b=value` strings. Unknown keys and bad values raise UserError.

    `--config.dit.overrides.FIELD=V` (likewise vae/text) sets one model dataclass field; the
    field name is checked against the dataclass when the model configs are built."""
    for item in overrides:
        if not item.startswith("--config."):
            raise UserError(f"unrecognized argument {item!r}")
        body = item[len("--config."):]
        if "=" not in body:
            raise UserError(f"override {item!r} needs a value: --config.KEY=VALUE")
        key, value = body.split("=", 1)
        parts = key.split(".")
        parent = ".".join(parts[:-1])
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:
                raise UserError(f"unknown config key {key!r} (declared keys: sorajax/config_base.py)")
            node = node[p]
        last = parts[-1]
        free = parent in FREE_FORM
        if not isinstance(node, ml_collections.ConfigDict) or (last not in node and not free):
            raise UserError(f"unknown config key {key!r} (declared keys: sorajax/config_base.py)")
        try:
            if free:  # a new dict, so the field may change type (remat: True -> "full")
                section = cfg[parts[0]]
                with section.unlocked():
                    section[parts[1]] = dict(node.to_dict(), **{last: _coerce(None, value)})
            else:
                with node.unlocked():
                    node[last] = _coerce(node[last], value)
        except (ValueError, TypeError, SyntaxError) as e:
            raise UserError(f"config key {key!r}: bad value {value!r} ({e})") from e
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def _migrate(d: dict) -> dict:
    """Runs saved before the stage sections were named for their stage: `train` -> `dit_train`,
    and the run-wide checkpoint/numerics keys into both stage sections."""
    if "train" in d and "dit_train" not in d:
        d["dit_train"] = d.pop("train")
        for k in ("keep_checkpoints", "max_nonfinite_in_a_row"):
            if k in d["dit_train"] and isinstance(d["vae_train"] if "vae_train" in d else None, dict):
                d["vae_train"].setdefault(k, d["dit_train"][k])
    return d


def _overlay(base: ml_collections.ConfigDict, d: dict, prefix: str, unknown: list) -> None:
    for k, v in d.items():
        path = f"{prefix}{k}"
        if k not in base:
            unknown.append(path)
        elif isinstance(base[k], ml_collections.ConfigDict) and isinstance(v, dict) \
                and path not in FREE_FORM:
            _overlay(base[k], v, path + ".", unknown)
        else:
            old = base[k]
            if isinstance(old, tuple) and isinstance(v, list):
                v = tuple(v)
            with base.unlocked():
                base[k] = v


def from_json(text: str, where: str = "config.json") -> ml_collections.ConfigDict:
    """A saved config laid over the declared base; keys the base does not declare are refused."""
    cfg = config_base.get_config()
    unknown: list[str] = []
    _overlay(cfg, _migrate(json.loads(text)), "", unknown)
    if unknown:
        raise UserError(f"{where}: key(s) {sorted(unknown)} are not declared in sorajax/config_base.py")
    return cfg
