"""Trainer: sharded steps equal the 1-device step; exact resume; guarded numerics."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sorajax  # noqa: F401
from sorajax import sharding, train
from sorajax import tokenizer as tok_lib
from tests.helpers import FIXTURES, run_cli, toy_config


def _dit_trainer(config, devices, mesh_kw):
    tok = tok_lib.Tokenizer.load(str(FIXTURES / "umt5_tiny" / "tokenizer"))
    with config.unlocked():
        config.mesh.update(mesh_kw)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    stage = train.DiTStage(config, "/nonexistent", tok)
    return train.Trainer(stage, config, mesh), mesh, tok


def _batch(config, tok, n):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((n, 3, 8, 8, 8)).astype(np.float32)
    caps = ["a large red circle moves right on a black background"] * (n // 2) + \
           ["a small blue square moves up on a navy background"] * (n - n // 2)
    ids, mask = tok.encode(caps, config.text.max_length)[:2]
    return {"latents": lat, "ids": np.asarray(ids, np.int32), "mask": np.asarray(mask, np.int32)}


@pytest.mark.parametrize("mesh_kw", [dict(data=4, fsdp=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_train_step_matches_single_device(mesh_kw):
    """One DiT train step on a multi-device mesh equals the 1-device step (f32, 1e-5)."""
    cfg = toy_config()
    one, mesh1, tok = _dit_trainer(toy_config(), jax.devices()[:1], dict(data=1))
    many, mesh8, _ = _dit_trainer(cfg, jax.devices()[:8], dict(mesh_kw, data=mesh_kw["data"]))
    assert mesh8.devices.size == 8
    batch = _batch(cfg, tok, 8)
    s1 = one.init()
    s8 = many.init()
    # Shardings really are split over the mesh (not everything replicated).
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(s8["params"])}
    assert any(s != "PartitionSpec()" for s in specs)
    n1, m1 = one.step_fn()(s1, sharding.global_batch(batch, mesh1, one.rules))
    n8, m8 = many.step_fn()(s8, sharding.global_batch(batch, mesh8, many.rules))
    assert abs(float(m1["loss"]) - float(m8["loss"])) < 1e-5
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))),
                         n1["params"], n8["params"])
    assert max(jax.tree.leaves(diffs)) < 1e-5
    assert int(n8["train"]["step"]) == 1


def test_nonfinite_update_is_skipped_and_counted():
    cfg = toy_config()
    tr, mesh, tok = _dit_trainer(cfg, jax.devices()[:1], dict(data=1))
    state = tr.init()
    before = jax.tree.map(np.asarray, state["params"])
    batch = _batch(cfg, tok, 8)
    batch["latents"][0, 0, 0, 0, 0] = np.nan
    state, m = tr.step_fn()(state, sharding.global_batch(batch, mesh, tr.rules))
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(state["train"]["nonfinite_in_a_row"]) == 1
    assert int(state["train"]["nonfinite_total"]) == 1
    after = jax.tree.map(np.asarray, state["params"])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    good = _batch(cfg, tok, 8)
    state, m = tr.step_fn()(state, sharding.global_batch(good, mesh, tr.rules))
    assert int(m["skipped"]) == 0 and int(state["train"]["nonfinite_in_a_row"]) == 0
    assert int(state["train"]["nonfinite_total"]) == 1


def _losses(workdir, stage_dir=""):
    with open(os.path.join(workdir, stage_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.xdist_group("cli_train")
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    """Train 6 steps straight vs 3 steps + restart to 6: identical metrics.jsonl losses."""
    data = str(tmp_path / "data")
    common = ["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", f"--config.data.data_dir={data}",
              "--config.train.log_every=1", "--config.vae_train.log_every=1", "--config.train.sample_at_end=False"]
    a = run_cli(common + ["--workdir", str(tmp_path / "a")])
    assert a.returncode == 0, a.stderr[-3000:]
    # Interrupted twice: the VAE stage at step 3, then the DiT stage at step 3.
    b1 = run_cli(common + ["--workdir", str(tmp_path / "b"), "--config.vae_train.steps=3",
                           "--config.stages=('vae',)"])
    assert b1.returncode == 0, b1.stderr[-3000:]
    b2 = run_cli(common + ["--workdir", str(tmp_path / "b"), "--config.train.steps=3"])
    assert b2.returncode == 0, b2.stderr[-3000:]
    b3 = run_cli(common + ["--workdir", str(tmp_path / "b")])
    assert b3.returncode == 0, b3.stderr[-3000:]
    assert "[vae] resumed" in b2.stdout and "[dit] resumed" in b3.stdout
    for stage in ("vae", ""):
        la, lb = _losses(tmp_path / "a", stage), _losses(tmp_path / "b", stage)
        assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, 7))
        assert [l for _, l in la] == [l for _, l in lb]
    # Checkpoints and TensorBoard events exist where the README says.
    assert os.path.isdir(tmp_path / "a" / "checkpoints" / "6")
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "a" / "tensorboard"))
