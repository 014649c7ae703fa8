"""Every pod preset's `:runlocal:CKPT` end to end on the path its docstring launches at scale:
a folder of videos -> `sorajax.data.prepare` -> `sorajax.cache_latents` (the imported tiny Wan
checkpoint's VAE) -> `sorajax.train` from the imported checkpoint on the cache, with the preset's
mesh axes and context-parallel scheme on 8 fake CPU devices -> end-of-training samples.
(The full presets' train step is compiled for their TPU topologies by scripts/aot_compile.py:
tests/test_aot.py and docs/SCALING.md.)"""
import json

import imageio.v2 as iio
import numpy as np
import pytest

from tests.helpers import run_cli

PRESETS = ("wan14b_v5p256", "wan14b_2xv5p128", "wan14b_60s_v5p1024", "wan1p3b_8xh100", "wan14b_native_v5p256")


@pytest.fixture(scope="module")
def cache(wan_ckpt, tmp_path_factory):
    """A folder of 8 short captioned mp4s, prepared, and its latents cached (once for all
    presets: the same VAE and clip shape)."""
    d = tmp_path_factory.mktemp("pods")
    src, data, lat = d / "videos", d / "data", d / "latents"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        base = rng.integers(0, 255, (40, 40, 3), np.uint8)
        frames = np.stack([np.roll(base, 2 * t, axis=1) for t in range(12)])  # drifts right
        iio.mimwrite(src / f"clip{i}.mp4", frames, fps=10, macro_block_size=1)
        (src / f"clip{i}.txt").write_text(f"a pattern drifting right, number {i}")
    spec = f"configs/pods/{PRESETS[0]}.py:runlocal:{wan_ckpt}"
    r = run_cli(["-m", "sorajax.data.prepare", "--src", str(src), "--out", str(data), "--fps", "10",
                 "--config", spec, "--workers", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(["-m", "sorajax.cache_latents", "--config", spec, "--data", str(data), "--out", str(lat)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "latent cache: 8 clips" in r.stdout, r.stdout
    return lat


@pytest.mark.parametrize("name", PRESETS)
def test_pod_preset_runlocal_trains_from_the_cache_and_samples(name, cache, wan_ckpt, tmp_path):
    wd = tmp_path / "run"
    r = run_cli(["-m", "sorajax.train", "--config", f"configs/pods/{name}.py:runlocal:{wan_ckpt}",
                 "--workdir", str(wd), f"--config.data.dir={cache}"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)
    if "native" in name:  # packed: two 12-token clips fill each 24-token row, one compile
        assert all(x["packing_efficiency"] == 1.0 and x["step_traces"] == 1 for x in rows), rows
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["data"]["source"] == "latents" and cfg["init_from"] == str(wan_ckpt)
    assert any(f.suffix == ".gif" for f in (wd / "samples").iterdir())
