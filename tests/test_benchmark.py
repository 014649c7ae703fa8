"""scripts/benchmark.py --quick and scripts/gpu_bench.sh --dry-run run end to end and write every
figure (finite, positive), and sorajax.flops.peak_flops knows the chips of shared/REFERENCE.md.

No timing assertions (the numbers of a --quick run mean nothing): these guard against the
benchmarks rotting, e.g. a renamed config key, Trainer API or sampler argument that would make a
section fail (recorded under "errors", exit 1) or drop a figure from the JSON."""
import json
import math
import subprocess
import sys

import pytest

from sorajax import flops
from tests.helpers import ROOT, cli_env

CPU_KEYS = (
    "matmul_ceiling_gflops", "dit_train_step_s", "dit_train_tokens_per_s", "dit_train_mfu",
    "dit_forward_s", "dit_forward_mfu", "dit_train_compile_s", "dit_forward_compile_s",
    "toy_train_step_s", "toy_train_mfu", "toy_train_compile_s", "sampler_step_s", "sampler_loop_s",
    "sampler_model_call_s", "sampler_compile_s", "vae_encode_per_frame_s", "vae_decode_per_frame_s",
    "vae_decode_compile_s", "vae_decode_mfu", "peak_rss_mib", "total_s",
)


def _run(args):
    # One CPU device (conftest's 8 fake devices would split the cores) and the session's
    # persistent compilation cache (inherited from conftest): reruns compile little.
    proc = subprocess.run(args, cwd=ROOT, env=dict(cli_env(1), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_cpu_benchmark_quick_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run([sys.executable, "scripts/benchmark.py", "--suite", "cpu", "--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["errors"] == {}
    bad = {k: res.get(k) for k in CPU_KEYS if not _positive(res.get(k))}
    assert not bad, bad
    assert math.isfinite(res["sampler_loop_overhead"]) and res["sampler_loop_overhead"] > -1
    # The text K/V once per sample computes what per-step K/V does (same ops, hoisted).
    assert res["sampler_text_kv_speedup"] > 0 and res["sampler_text_kv_max_abs_diff"] < 1e-5
    # The step cache: timed, with the share of model calls that ran the blocks (2 steps: the
    # first always runs them) and how far its latents are from the uncached loop's.
    assert _positive(res["step_cache_speedup"]) and res["step_cache_note"]
    assert 0.5 <= res["step_cache_block_run_fraction"] <= 1 and math.isfinite(res["step_cache_max_abs_diff"])
    # Without --torch-python the speed-ups are present and null, not missing.
    for k in ("dit_train_speedup_vs_torch", "dit_forward_speedup_vs_torch", "vae_decode_speedup_vs_torch"):
        assert k in res and res[k] is None
    assert "DiT-S train MFU" in proc.stdout  # the table


def test_gpu_bench_dry_run_writes_every_section(tmp_path):
    """Through the shell entry point, which forwards its flags and forces CPU for --dry-run."""
    out = tmp_path / "gpu.json"
    proc = _run(["bash", "scripts/gpu_bench.sh", "--dry-run", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["errors"] == {} and res["dry_run"] is True and res["platform"] == "cpu"
    assert "card: " in proc.stdout
    assert _positive(res["matmul_ceiling_tflops"])
    rows = res["attention"]
    assert {r["backend"] for r in rows} == {"xla", "cudnn"}
    for r in rows:
        assert "error" not in r, r
        assert _positive(r["fwd_tflops"]) and _positive(r["fwd_bwd_tflops"])
    for k in ("train_step_s", "train_tokens_per_s", "train_tflops", "sampler_step_s", "sampler_model_call_s"):
        assert _positive(res[k]), (k, res[k])
    assert res["train_mfu"] is None and res["peak_tflops"] is None  # CPU: no peak


class _Dev:
    def __init__(self, platform, kind):
        self.platform, self.device_kind = platform, kind


@pytest.mark.parametrize("platform,kind,tflops", [
    ("tpu", "TPU v4", 275), ("tpu", "TPU v5 lite", 197), ("tpu", "TPU v5", 459), ("tpu", "TPU v5p", 459),
    ("tpu", "TPU v6 lite", 918), ("gpu", "NVIDIA H100 80GB HBM3", 989), ("gpu", "NVIDIA H200", 989),
    # not in the table (or a lower-power part of a listed chip): unknown, never a wrong peak
    ("gpu", "NVIDIA H100 PCIe", None), ("gpu", "NVIDIA H200 NVL", None),
    ("gpu", "NVIDIA A100-SXM4-80GB", None),
    ("cpu", "cpu", None),
])
def test_peak_flops(platform, kind, tflops):
    got = flops.peak_flops(_Dev(platform, kind))
    assert got == (None if tflops is None else tflops * 1e12)


def test_peak_flops_of_this_cpu_is_none():
    import jax

    assert flops.peak_flops(jax.devices()[0]) is None
