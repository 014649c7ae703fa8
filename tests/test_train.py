"""Trainer: sharded steps equal the 1-device step; guarded numerics. (Exact resume: test_cli.py.)"""
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
        # A real update from the first step (warm-up starts at lr 0). Adam moves every weight by
        # about lr whatever its gradient's size, so a weight whose gradient is ~eps (1e-8) can
        # move by +-lr on float noise alone: lr 1e-4 keeps that below the 1e-5 bound.
        cfg.train.warmup_steps = 0
        cfg.train.lr = 1e-4
    return cfg


def _two_steps(trainer, mesh, batch):
    """Two train steps on `batch`: (params, losses, grad norms). Adam's second update depends on
    gradient magnitudes, not only their signs, so it checks the gradients themselves."""
    step, state, out = trainer.step_fn(), trainer.init(), []
    for _ in range(2):
        state, m = step(state, sharding.global_batch(batch, mesh, trainer.rules))
        out.append((float(m["loss"]), float(m["grad_norm"])))
    assert int(state["train"]["step"]) == 2 and int(state["train"]["nonfinite_total"]) == 0
    return jax.device_get(state["params"]), out


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
    return (batch, *_two_steps(one, mesh1, batch))


MESHES = {
    "data": dict(data=8),
    "fsdp": dict(data=1, fsdp=8),
    "tensor": dict(data=4, tensor=2),
    "context-ring": dict(data=1, context=8),
    "context-all_to_all": dict(data=4, context=2, cp="all_to_all"),
    "mixed": dict(data=2, fsdp=2, context=2, tensor=1),
    "mixed-tensor": dict(data=1, fsdp=2, context=2, tensor=2),
}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_train_step_matches_single_device(reference_step, name):
    """DiT train steps on a multi-device mesh equal the 1-device steps (f32, 1e-5 in loss,
    gradient norm and updated params): data, fsdp, tensor and context parallelism (ring and
    all-to-all attention), and mixes."""
    batch, p1, out1 = reference_step
    mesh_kw = dict(MESHES[name])
    cfg = small(toy_config())
    if "cp" in mesh_kw:
        with cfg.unlocked():
            cfg.dit.overrides = dict(cfg.dit.overrides, context_parallel=mesh_kw.pop("cp"))
    many, mesh8, _ = _dit_trainer(cfg, jax.devices()[:8], dict(dict(data=1, fsdp=1, context=1, tensor=1), **mesh_kw))
    assert mesh8.devices.size == 8
    abstract = many.abstract_target()
    # Shardings really are split over the mesh (not everything replicated).
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(abstract["params"])}
    assert any(s != "PartitionSpec()" for s in specs)
    if mesh8.shape["context"] > 1:  # the sequence really was split: context-parallel collectives
        hlo = many.step_fn().lower(abstract, sharding.global_batch(batch, mesh8, many.rules)).as_text()
        assert ("collective_permute" in hlo) or ("all_to_all" in hlo)
    p8, out8 = _two_steps(many, mesh8, batch)
    for (l1, g1), (l8, g8) in zip(out1, out8):
        assert abs(l1 - l8) < 1e-5 and abs(g1 - g8) < 1e-5 * max(1.0, g1)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p1, p8)
    assert max(jax.tree.leaves(diffs)) < 1e-5
    p0 = jax.device_get(many.init()["params"])  # the steps really moved the weights
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p0, p8)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_grad_accumulation_is_the_mean_of_micro_steps():
    """grad_accum=2: the loss is the mean over micro-batches (rows i::2) with keys fold_in(key, i),
    and the sharded accumulated step equals the 1-device one."""
    cfg = small(toy_config())
    with cfg.unlocked():
        cfg.train.grad_accum = 2
    one, mesh1, tok = _dit_trainer(cfg, jax.devices()[:1], dict(data=1))
    batch = _batch(cfg, tok, 8)
    state = one.init()
    key = jax.random.fold_in(jax.random.wrap_key_data(state["train"]["rng"]), 0)
    model = nnx.merge(one.graphdef, state["params"], state["frozen"])
    micro = [jax.tree.map(lambda x: jnp.asarray(x[i::2]), batch) for i in range(2)]
    want = np.mean([float(one.stage.loss(model, mb, jax.random.fold_in(key, i))[0]) for i, mb in enumerate(micro)])
    n1, m1 = one.step_fn()(state, sharding.global_batch(batch, mesh1, one.rules))
    assert abs(float(m1["loss"]) - want) < 1e-5
    many, mesh4, _ = _dit_trainer(cfg, jax.devices()[:4], dict(data=4))
    n4, m4 = many.step_fn()(many.init(), sharding.global_batch(batch, mesh4, many.rules))
    assert abs(float(m4["loss"]) - float(m1["loss"])) < 1e-5
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), n1["params"], n4["params"])
    assert max(jax.tree.leaves(diffs)) < 1e-5


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
