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
from tests.helpers import ROOT, cli_env, run_cli

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
        if path.name.startswith("_"):  # __init__.py
            continue
        doc = path.read_text().split('"""')[1]
        assert "python -m sorajax.train --config configs/" + path.name in doc, path.name


def test_wan_family_runlocal_trains(tmp_path):
    wd = tmp_path / "wan"
    r = run_cli(["-m", "sorajax.train", "--config", "configs/wan2_1_t2v_1p3b.py:runlocal", "--workdir", str(wd),
                 f"--config.data.data_dir={tmp_path / 'data'}"], env=cli_env(2))  # data=2: sharded, cheap
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)
    # Sampling a Wan-family run (frozen UMT5, tokenizer from a file, UniPC): tests/test_convert.py
    # samples its fine-tuned run, and the converted checkpoint in tests/test_cli_fuzz.py.


POD_PRESETS = {  # preset -> (topology, slices): the chips its mesh must use exactly
    "wan14b_v5p256.py": ("v5p-256", 1), "wan14b_2xv5p128.py": ("v5p-128", 2),
    "wan14b_60s_v5p1024.py": ("v5p-1024", 1), "wan1p3b_8xh100.py": (None, 1),
}


@pytest.mark.parametrize("name", sorted(POD_PRESETS))
def test_pod_presets_match_their_hardware(name, converted_config_dir):
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
    assert cfg.dit_train.batch_size % data_axes == 0
    _, dit_cfg, _ = video.model_configs(cfg)
    frames, h, w = cfg.data.frames, cfg.data.height, cfg.data.width
    tokens = (1 + (frames - 1) // 4) * (h // 16) * (w // 16)
    assert tokens % (ici["context"] * dcn["context"]) == 0
    if dit_cfg.context_parallel == "all_to_all":
        assert dit_cfg.num_attention_heads % (ici["context"] * ici["tensor"]) == 0
    # Every preset fine-tunes an imported checkpoint on a latent cache, at scale and in runlocal.
    assert cfg.init_from and cfg.data.source == "latents" and cfg.data.dir and cfg.stages == ("dit",)
    tiny = config_lib.load_config(f"{path}:runlocal:{converted_config_dir}")
    assert tiny.init_from == str(converted_config_dir) and tiny.data.source == "latents"
    for axis in ("fsdp", "context", "tensor"):  # the preset's parallelism, at toy scale
        assert (tiny.mesh[axis] > 1) == (ici[axis] * dcn[axis] > 1), axis
    from sorajax.errors import UserError

    with pytest.raises(UserError, match="runlocal:CKPT_DIR"):
        config_lib.load_config(f"{path}:runlocal")


def _config_files():
    out = []
    for path in sorted((ROOT / "configs").rglob("*.py")):
        if path.name.startswith("_") or path.parent.name == "experiments":
            continue  # __init__.py, _preset.py: helpers; experiments: tests/test_experiments.py
        out.append(path)
    return out


def _specs(ckpt):
    """Every config in configs/, with and without :runlocal (the fine-tune config and the pod
    presets' runlocal take a converted checkpoint: the tiny Wan pipeline's config.json stands in
    for one)."""
    specs = []
    for path in _config_files():
        rel = str(path.relative_to(ROOT))
        if path.name == "wan2_1_finetune.py":
            specs.append(f"{rel}:{ckpt}")
            continue
        specs += [rel, rel + (f":runlocal:{ckpt}" if path.parent.name == "pods" else ":runlocal")]
    return specs


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def converted_config_dir(tmp_path_factory):
    """A converted checkpoint's config.json (what configs/wan2_1_finetune.py:CKPT reads)."""
    from sorajax import convert

    d = tmp_path_factory.mktemp("ckpt")
    cfg = convert.run_config(str(ROOT / "tests" / "fixtures" / "wan_pipeline_tiny"), frames=9,
                             height=32, width=48, max_length=16)
    (d / "config.json").write_text(config_lib.to_json(cfg))
    return d


def test_every_config_sets_only_declared_keys_and_takes_grad_accum(converted_config_dir):
    from sorajax import config_base

    declared = set(config_lib.flat_keys(config_base.get_config()))
    specs = _specs(converted_config_dir)
    assert len(specs) >= 13
    for spec in specs:
        cfg = config_lib.load_config(str(ROOT / spec))
        keys = set(config_lib.flat_keys(cfg))
        assert keys <= declared, (spec, sorted(keys - declared))
        # Model overrides: fields of the model dataclasses (checked when the configs are built).
        video.model_configs(cfg)
        # The documented way to accumulate gradients is accepted on every config.
        config_lib.apply_overrides(cfg, ["--config.dit_train.grad_accum=2",
                                          "--config.vae_train.grad_accum=2"])
        assert cfg.dit_train.grad_accum == 2 and cfg.vae_train.grad_accum == 2


def test_undeclared_keys_are_refused(tmp_path):
    from sorajax.errors import UserError

    bad = tmp_path / "bad.py"
    bad.write_text("from sorajax import config_base\n\n\ndef get_config():\n"
                   "    c = config_base.get_config()\n    c.dit_train.grad_acum = 2\n    return c\n")
    with pytest.raises(UserError, match=r"dit_train.grad_acum.*not declared"):
        config_lib.load_config(str(bad))
    cfg = config_lib.load_config(str(ROOT / "configs" / "toy.py"))
    with pytest.raises(UserError, match="unknown config key 'dit_train.grad_acum'"):
        config_lib.apply_overrides(cfg, ["--config.dit_train.grad_acum=2"])
    with pytest.raises(UserError, match="not declared"):
        config_lib.from_json('{"seed": 1, "dit_train": {"nope": 1}}')
    # A model override names a dataclass field, checked when the model configs are built.
    config_lib.apply_overrides(cfg, ["--config.dit.overrides.not_a_field=1"])
    with pytest.raises(UserError, match="unknown field"):
        video.model_configs(cfg)


def test_a_type_error_inside_get_config_surfaces(tmp_path):
    """A bug inside get_config(arg) is reported with its type, never retried without the arg."""
    from sorajax.errors import UserError

    calls = tmp_path / "calls.txt"
    bad = tmp_path / "typo.py"
    bad.write_text(f"def get_config(arg=''):\n    open({str(calls)!r}, 'a').write(arg + '\\n')\n"
                   "    return len(3)\n")
    with pytest.raises(UserError, match=r"get_config failed: TypeError: object of type 'int'"):
        config_lib.load_config(f"{bad}:runlocal")
    assert calls.read_text().splitlines() == ["runlocal"]  # called once, with its argument


def test_saved_configs_load_over_the_base():
    """A config.json from before a key was declared still loads (the key takes its default);
    one from before the stage sections were renamed maps `train` to `dit_train`."""
    cfg = config_lib.from_json('{"seed": 3, "train": {"steps": 7, "keep_checkpoints": 2}, '
                               '"vae_train": {"steps": 5}}')
    assert cfg.seed == 3 and cfg.dit_train.steps == 7 and cfg.vae_train.steps == 5
    assert cfg.vae_train.keep_checkpoints == 2 and cfg.dit_train.grad_accum == 1


def test_no_config_defaults_outside_the_base():
    """`grep -rn '.get("' sorajax/ | grep -i config` finds nothing: no `.get("key", default)` on
    our configs; every default lives in sorajax/config_base.py. (Reading the reference's own
    config.json files, e.g. vae.config_from_diffusers, uses `c.get`, with the reference's
    defaults: those lines do not name a config.)"""
    hits = []
    for path in sorted((ROOT / "sorajax").rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if '.get("' in line and "config" in line.lower():
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
