"""Trainer: sharded steps equal the 1-device step; guarded numerics. (Exact resume: test_cli.py.)"""
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
from tests.helpers import FIXTURES, toy_config


def small(cfg):
    """The toy config with a 1-layer DiT and text encoder: same code paths, faster compiles."""
    with cfg.unlocked():
        cfg.dit.overrides = dict(num_layers=1, num_attention_heads=2, attention_head_dim=32, ffn_dim=128)
        cfg.text.overrides = dict(num_layers=1, d_model=64, d_kv=16, num_heads=4, d_ff=128)
    return cfg


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


@pytest.fixture(scope="module")
def reference_step():
    """The 1-device DiT train step: (trainer, batch, new state, metrics)."""
    cfg = small(toy_config())
    one, mesh1, tok = _dit_trainer(cfg, jax.devices()[:1], dict(data=1))
    batch = _batch(cfg, tok, 8)
    n1, m1 = one.step_fn()(one.init(), sharding.global_batch(batch, mesh1, one.rules))
    return batch, jax.device_get(n1["params"]), float(m1["loss"])


@pytest.mark.parametrize("mesh_kw", [dict(data=4, fsdp=2), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_train_step_matches_single_device(reference_step, mesh_kw):
    """One DiT train step on a multi-device mesh equals the 1-device step (f32, 1e-5)."""
    batch, p1, loss1 = reference_step
    many, mesh8, _ = _dit_trainer(small(toy_config()), jax.devices()[:8], mesh_kw)
    assert mesh8.devices.size == 8
    s8 = many.init()
    # Shardings really are split over the mesh (not everything replicated).
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(s8["params"])}
    assert any(s != "PartitionSpec()" for s in specs)
    n8, m8 = many.step_fn()(s8, sharding.global_batch(batch, mesh8, many.rules))
    assert abs(loss1 - float(m8["loss"])) < 1e-5
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p1, n8["params"])
    assert max(jax.tree.leaves(diffs)) < 1e-5
    assert int(n8["train"]["step"]) == 1


def test_nonfinite_update_is_skipped_and_counted():
    cfg = small(toy_config())
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
