"""Shared test helpers (tiny configs, subprocess runner)."""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest


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


# ----------------------------------------------------------------------------------------------
# Multi-process runs on localhost (jax.distributed with fake CPU devices).
# ----------------------------------------------------------------------------------------------
def process_env(num_devices, **extra):
    e = dict(os.environ)
    e.setdefault("JAX_PLATFORMS", "cpu")
    # The device count comes from JAX_NUM_CPU_DEVICES, not the 8 of conftest's XLA_FLAGS.
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
    e["JAX_NUM_CPU_DEVICES"] = str(num_devices)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_all(cmds_envs, tmp_path, tag, timeout=420):
    """Starts every (cmd, env) at once, waits for all within timeout; on a failure or timeout
    kills the rest (whole process groups) and fails with the logs' tails."""
    procs = []
    try:
        for i, (cmd, env) in enumerate(cmds_envs):
            log = open(tmp_path / f"{tag}_{i}.log", "w")
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
        deadline = time.time() + timeout
        while any(p.poll() is None for p, _ in procs):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.2)
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()
    outs = [(tmp_path / f"{tag}_{i}.log").read_text() for i in range(len(procs))]
    codes = [p.returncode for p, _ in procs]
    if any(c != 0 for c in codes):
        tails = "\n".join(f"--- {tag} process {i} (exit {c}):\n{o[-2500:]}"
                          for i, (c, o) in enumerate(zip(codes, outs)))
        pytest.fail(f"{tag}: exit codes {codes} (negative: killed after {timeout}s)\n{tails}")
    return outs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_text_dit(vocab_size: int = 64, **dit_overrides):
    """(graphdef, state, dit_cfg): a 1-layer DiT + text encoder from the toy config in a
    VideoModel without its VAE (latent-space sampler tests never decode, and building even the
    toy VAE op by op takes tens of seconds on CPU), every parameter re-randomised (zero-initialised
    output heads would hide the prompt and the inputs). `dit_overrides`: DiTConfig fields."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax.models import dit as dit_lib
    from sorajax.models import text as text_lib
    from sorajax.models import video

    cfg = toy_config()
    with cfg.unlocked():
        cfg.dit.overrides = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, freq_dim=16,
                                 **dit_overrides)
        cfg.text.overrides = dict(num_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=64)
    _, dit_cfg, text_cfg = video.model_configs(cfg, vocab_size=vocab_size)

    class NoVAEVideoModel(video.VideoModel):
        def __init__(self, *, rngs):
            self.dit = dit_lib.WanDiT(dit_cfg, rngs=rngs)
            self.text = text_lib.UMT5Encoder(text_cfg, rngs=rngs)

    graphdef, state = nnx.split(NoVAEVideoModel(rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    state = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
                                      if jnp.issubdtype(p.dtype, jnp.floating) else p
                                      for p, k in zip(leaves, keys)])
    return graphdef, state, dit_cfg
