"""Trainer: sharded steps equal the 1-device step; guarded numerics. (Exact resume: test_cli.py.)"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sorajax  # noqa: F401
from sorajax import sharding, stages
from sorajax.train_state import Trainer
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
        cfg.dit_train.warmup_steps = 0
        cfg.dit_train.lr = 1e-4
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
    stage = stages.DiTStage(config, "/nonexistent", tok)
    return Trainer(stage, config, mesh), mesh, tok


def _batch(config, tok, n):
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((n, 3, 8, 8, 8)).astype(np.float32)
    caps = ["a large red circle moves right on a black background"] * (n // 2) + \
           ["a small blue square moves up on a navy background"] * (n - n // 2)
    ids, mask = tok.encode(caps, config.text.max_length)[:2]
    return {"latents": lat, "ids": np.asarray(ids, np.int32), "mask": np.asarray(mask, np.int32)}


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def reference_step():
    """The 1-device DiT train step: (trainer, batch, new state, metrics)."""
    cfg = small(toy_config())
    one, mesh1, tok = _dit_trainer(cfg, jax.devices()[:1], dict(data=1))
    batch = _batch(cfg, tok, 8)
    return (batch, *_two_steps(one, mesh1, batch))


# Four meshes cover every axis and both context-parallel schemes, each on 8 devices (a mesh
# costs ~30 s of compilation on 2 cores, so axes are combined rather than tried one by one).
MESHES = {
    "data-fsdp": dict(data=2, fsdp=4),
    "fsdp-context-ring": dict(fsdp=2, context=4),
    "data-context_a2a": dict(data=4, context=2, cp="all_to_all"),  # a2a needs heads % context == 0
    "fsdp-context-tensor": dict(fsdp=2, context=2, tensor=2),
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
    chex.assert_trees_all_close(p1, p8, atol=1e-5, rtol=0)
    p0 = jax.device_get(many.init()["params"])  # the steps really moved the weights
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p0, p8)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_grad_accumulation_is_the_mean_of_micro_steps():
    """grad_accum=2: the loss is the mean over micro-batches (rows i::2) with keys fold_in(key, i),
    and the sharded accumulated step equals the 1-device one."""
    cfg = small(toy_config())
    with cfg.unlocked():
        cfg.dit_train.grad_accum = 2
    one, mesh1, tok = _dit_trainer(cfg, jax.devices()[:1], dict(data=1))
    batch = _batch(cfg, tok, 8)
    state = one.init()
    key = jax.random.fold_in(jax.random.wrap_key_data(state["train"]["rng"]), 0)
    model = nnx.merge(one.graphdef, state["params"], state["frozen"])
    micro = [jax.tree.map(lambda x: jnp.asarray(x[i::2]), batch) for i in range(2)]
    loss = jax.jit(lambda mb, k: one.stage.loss(model, mb, k)[0])  # one compile, not eager ops
    want = np.mean([float(loss(mb, jax.random.fold_in(key, i))) for i, mb in enumerate(micro)])
    n1, m1 = one.step_fn()(state, sharding.global_batch(batch, mesh1, one.rules))
    assert abs(float(m1["loss"]) - want) < 1e-5
    many, mesh4, _ = _dit_trainer(cfg, jax.devices()[:4], dict(data=4))
    n4, m4 = many.step_fn()(many.init(), sharding.global_batch(batch, mesh4, many.rules))
    assert abs(float(m4["loss"]) - float(m1["loss"])) < 1e-5
    chex.assert_trees_all_close(jax.device_get(n1["params"]), jax.device_get(n4["params"]), atol=1e-5, rtol=0)


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


def test_train_step_compiles_once():
    """The step is traced once for a stage, whatever the batch contents (chex counts traces)."""
    cfg = small(toy_config())
    tr, mesh, tok = _dit_trainer(cfg, jax.devices()[:1], dict(data=1))
    tr._step_fn = chex.assert_max_traces(tr._step_fn, n=1)
    state = tr.init()
    for seed in range(3):
        batch = _batch(cfg, tok, 8)
        batch["latents"] = np.random.default_rng(seed).standard_normal(batch["latents"].shape).astype(np.float32)
        state, m = tr.step_fn()(state, sharding.global_batch(batch, mesh, tr.rules))
    assert int(state["train"]["step"]) == 3


def test_stale_latent_cache_is_rebuilt_never_paired_with_new_captions(tmp_path):
    """RUN/latents is keyed by the data settings and the VAE: another data seed (other clips and
    captions), size or VAE rebuilds it; the same settings reuse it. (The clips here stay
    16x16: the fingerprint, not the clips' shape, must tell the caches apart.)"""
    from sorajax import latents
    from sorajax.models import video
    from sorajax.models.vae import WanVAE

    tiny_vae = dict(base_dim=4, z_dim=4, dim_mult=(1, 2), temporal_downsample=(True,))

    def config(**data):
        c = toy_config()
        with c.unlocked():
            c.vae.overrides = tiny_vae
            c.data.update(dict(dict(height=16, width=16), **data))
        return c

    cfg = config()
    vae_cfg, _, _ = video.model_configs(cfg)
    mesh = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
    vae = nnx.split(WanVAE(vae_cfg, rngs=nnx.Rngs(0)))
    loads = []

    def load_vae():
        loads.append(1)
        return vae

    def source(seed):
        rng = np.random.default_rng(seed)
        return [{"frames": rng.integers(0, 255, (9, 16, 16, 3), dtype=np.uint8),
                 "caption": f"clip {seed}-{i}".encode()} for i in range(3)]

    def cached(c, src, prov):
        cache = latents.build(c, src, mesh, str(tmp_path / "latents"), vae_provenance=prov, load_vae=load_vae)
        return [cache[i]["caption"] for i in range(len(cache))], np.stack([cache[i]["latents"] for i in range(len(cache))])

    a_caps, a_lat = cached(cfg, source(0), "vae@1")
    assert a_caps == ["clip 0-0", "clip 0-1", "clip 0-2"] and a_lat.shape == (3, 5, 8, 8, 4)
    again_caps, again_lat = cached(cfg, source(0), "vae@1")
    assert len(loads) == 1 and again_caps == a_caps  # reused: the VAE was not even loaded
    np.testing.assert_array_equal(again_lat, a_lat)
    for change in ("data.seed", "data.height", "vae"):
        c = config(seed=1) if change == "data.seed" else config(height=24) if change == "data.height" else cfg
        prov = "vae@2" if change == "vae" else "vae@1"
        b_caps, b_lat = cached(c, source(1), prov)
        assert b_caps == ["clip 1-0", "clip 1-1", "clip 1-2"], change  # rebuilt with its captions
        assert not np.allclose(b_lat, a_lat), change
    assert len(loads) == 4


def test_end_of_training_sampling_failure_fails_the_run(tmp_path):
    """A run whose end-of-training samples fail says so and exits non-zero (RunFailed -> 1)."""
    from sorajax.errors import RunFailed

    cfg = toy_config()
    tok = tok_lib.Tokenizer.load(str(FIXTURES / "umt5_tiny" / "tokenizer"))
    stage = stages.DiTStage(cfg, str(tmp_path / "no_run_here"), tok)
    with pytest.raises(RunFailed, match="end-of-training sampling failed"):
        stage.on_end(None, None, None, 6)


def test_mesh_fallback_warns(monkeypatch, capsys):
    """When the device mesh cannot follow the topology, the plain-order fallback says so."""
    from jax.experimental import mesh_utils

    def refuse(*a, **k):
        raise ValueError("cannot embed this mesh in the physical topology")

    monkeypatch.setattr(mesh_utils, "create_device_mesh", refuse)
    mesh = sharding.make_mesh(dict(data=2, fsdp=4), devices=jax.devices()[:8])
    assert dict(mesh.shape) == dict(data=2, fsdp=4, context=1, tensor=1)
    err = capsys.readouterr().err
    assert "warning: mesh" in err and "does not follow the device topology" in err
