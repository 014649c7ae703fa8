"""Every config builds (abstractly, no allocation) with the documented sizes, and the Wan
family's tiny variant trains end to end (one smoke run per config family; toy: test_cli.py)."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

import sorajax  # noqa: F401
from sorajax import config_lib
from sorajax.models import video
from tests.helpers import ROOT, run_cli

EXPECTED_DIT = {"wan2_1_t2v_1p3b.py": 1_418_996_800, "wan2_1_t2v_14b.py": 14_288_491_584}


def _count(state):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name", sorted(EXPECTED_DIT))
def test_wan_configs_have_the_real_sizes(name):
    cfg = config_lib.load_config(str(ROOT / "configs" / name))
    vae_cfg, dit_cfg, text_cfg = video.model_configs(cfg)
    model = nnx.eval_shape(lambda: video.VideoModel(vae_cfg, dit_cfg, text_cfg, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(model.dit)) == EXPECTED_DIT[name]
    assert _count(nnx.state(model.vae)) == 126_892_531
    assert _count(nnx.state(model.text)) == 5_680_910_336
    assert (vae_cfg.temporal_stride, vae_cfg.spatial_stride, vae_cfg.z_dim) == (4, 8, 16)


def test_config_docstrings_are_launch_commands():
    for path in sorted((ROOT / "configs").glob("*.py")):
        doc = path.read_text().split('"""')[1]
        assert "python -m sorajax.train --config configs/" + path.name in doc, path.name


@pytest.mark.xdist_group("wan_runlocal")
def test_wan_family_runlocal_trains_and_samples(tmp_path):
    wd = tmp_path / "wan"
    r = run_cli(["-m", "sorajax.train", "--config", "configs/wan2_1_t2v_1p3b.py:runlocal", "--workdir", str(wd),
                 f"--config.data.data_dir={tmp_path / 'data'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)
    r = run_cli(["-m", "sorajax.sample", "--workdir", str(wd), "--prompt", "a red circle moves right",
                 "--out", str(tmp_path / "w.gif")])
    assert r.returncode == 0, r.stderr[-3000:]
