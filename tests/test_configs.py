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


POD_PRESETS = {  # preset -> (topology, slices): the chips its mesh must use exactly
    "wan14b_v5p256.py": ("v5p-256", 1), "wan14b_2xv5p128.py": ("v5p-128", 2),
    "wan14b_60s_v5p1024.py": ("v5p-1024", 1), "wan1p3b_8xh100.py": (None, 1),
}


@pytest.mark.parametrize("name", sorted(POD_PRESETS))
def test_pod_presets_match_their_hardware(name):
    """Each pod preset documents its launch commands, its mesh uses exactly its topology's chips,
    its batch divides over the data-parallel axes, and its runlocal variant loads."""
    from sorajax import aot, sharding

    path = ROOT / "configs" / "pods" / name
    doc = path.read_text().split('"""')[1]
    assert f"python -m sorajax.train --config configs/pods/{name}" in doc
    cfg = config_lib.load_config(str(path))
    topo_name, slices = POD_PRESETS[name]
    chips = aot.parse_topology(topo_name, slices).total_chips if topo_name else 8
    if topo_name:
        assert f"aot_compile.py --config configs/pods/{name}" in doc
    ici, dcn = sharding.mesh_shape(cfg.mesh, chips, slices)
    data_axes = ici["data"] * dcn["data"] * ici["fsdp"] * dcn["fsdp"]
    assert cfg.train.batch_size % data_axes == 0
    _, dit_cfg, _ = video.model_configs(cfg)
    frames, h, w = cfg.data.frames, cfg.data.height, cfg.data.width
    tokens = (1 + (frames - 1) // 4) * (h // 16) * (w // 16)
    assert tokens % (ici["context"] * dcn["context"]) == 0
    if dit_cfg.context_parallel == "all_to_all":
        assert dit_cfg.num_attention_heads % (ici["context"] * ici["tensor"]) == 0
    config_lib.load_config(str(path) + ":runlocal")
