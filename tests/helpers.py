"""Shared test helpers (tiny configs, subprocess runner)."""
import os
import pathlib
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def toy_config(arg="runlocal", **kw):
    from sorajax import config_lib

    cfg = config_lib.load_config(str(ROOT / "configs" / f"toy.py:{arg}"))
    return cfg


def cli_env(devices: int = 1) -> dict:
    """The test environment (persistent XLA cache from conftest, CPU) for a subprocess with
    `devices` fake CPU devices and this checkout on PYTHONPATH."""
    import re

    e = dict(os.environ)
    e["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", e.get("XLA_FLAGS", "")) + \
        f" --xla_force_host_platform_device_count={devices}"
    e.setdefault("JAX_PLATFORMS", "cpu")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run_cli(args, *, cwd=None, env=None, timeout=600):
    """Runs `python -m ...` in a subprocess with the test environment (8 fake devices unless
    overridden); returns CompletedProcess with text output."""
    e = dict(os.environ)
    e.setdefault("JAX_PLATFORMS", "cpu")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)
