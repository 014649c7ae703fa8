"""Shared test helpers (tiny configs, subprocess runner)."""
import os
import pathlib
import subprocess
import sys

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def toy_config(arg="runlocal", **kw):
    from sorajax import config_lib

    cfg = config_lib.load_config(str(ROOT / "configs" / f"toy.py:{arg}"))
    return cfg


def run_cli(args, *, cwd=None, env=None, timeout=600):
    """Runs `python -m ...` in a subprocess with the test environment (8 fake devices unless
    overridden); returns CompletedProcess with text output."""
    e = dict(os.environ)
    e.setdefault("JAX_PLATFORMS", "cpu")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)
