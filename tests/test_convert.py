"""Wan 2.1 diffusers folder -> convert -> sample: reproduces diffusers WanPipeline's final latents
(same weights, prompts, noise, Euler flow-match schedule, steps, guidance) and decoded frames;
fine-tuning resumes from the imported checkpoint.

Fixture: tests/fixtures/wan_pipeline_tiny (scripts/make_pipeline_fixtures.py)."""
import json

import numpy as np
import pytest

from tests.helpers import FIXTURES, ROOT, cli_env, run_cli

SRC = FIXTURES / "wan_pipeline_tiny"


def _io():
    io = dict(np.load(SRC / "io.npz"))
    meta = json.loads((SRC / "io.json").read_text())
    return io, meta


@pytest.mark.parametrize("guidance,key", [(4.0, "latents_cfg"), (1.0, "latents_nocfg")])
def test_sample_reproduces_wan_pipeline_latents(wan_ckpt, tmp_path, guidance, key):
    io, meta = _io()
    noise = io["noise"].transpose(0, 2, 3, 4, 1)  # diffusers (B, C, F, H, W) -> ours (B, F, H, W, C)
    np.save(tmp_path / "n.npy", noise)
    argv = ["-m", "sorajax.sample", "--checkpoint", str(wan_ckpt), "--noise", str(tmp_path / "n.npy"),
            "--solver", "euler", "--steps", "4", "--guidance", str(guidance), "--shift", "3.0",
            "--negative-prompt", meta["negative_prompt"], "--save-latents", str(tmp_path / "l.npy"),
            "--save-frames", str(tmp_path / "f.npy"), "--out", str(tmp_path / "v.png")]
    for p in meta["prompts"]:
        argv += ["--prompt", p]
    r = run_cli(argv)
    assert r.returncode == 0, r.stderr[-3000:]
    ours = np.load(tmp_path / "l.npy")
    ref = io[key].transpose(0, 2, 3, 4, 1)
    err = float(np.abs(ours - ref).max())
    assert err <= 3e-4, err  # PARITY.md: 2.8e-5 measured
    if key == "latents_cfg":
        frames = np.load(tmp_path / "f.npy")
        assert frames.shape == io["frames_cfg"].shape
        assert float(np.abs(frames - io["frames_cfg"]).max()) <= 1e-4  # PARITY.md: 7.8e-6


def test_sample_config_changes_how_a_checkpoint_runs_not_what_it_is(wan_ckpt, tmp_path):
    """`sample --config`: the mesh, sharding rules and kernels of a config file replace the
    checkpoint's; the weights and architecture stay. configs/pods/wan14b_sample.py's tiny variant
    (its rules: weights over fsdp x context; all-to-all context parallelism over 2 of the 8 fake
    devices around the splash kernel, which falls back to flash on CPU): the latents still match
    diffusers' WanPipeline."""
    io, meta = _io()
    np.save(tmp_path / "n.npy", io["noise"].transpose(0, 2, 3, 4, 1))
    argv = ["-m", "sorajax.sample", "--checkpoint", str(wan_ckpt), "--noise", str(tmp_path / "n.npy"),
            "--solver", "euler", "--steps", "4", "--guidance", "4.0", "--shift", "3.0",
            "--negative-prompt", meta["negative_prompt"], "--save-latents", str(tmp_path / "l.npy"),
            "--out", str(tmp_path / "v.png"), "--config", f"configs/pods/wan14b_sample.py:runlocal:{wan_ckpt}"]
    for p in meta["prompts"]:
        argv += ["--prompt", p]
    r = run_cli(argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampling on mesh data=4, fsdp=1, context=2, tensor=1" in r.stderr
    err = float(np.abs(np.load(tmp_path / "l.npy") - io["latents_cfg"].transpose(0, 2, 3, 4, 1)).max())
    assert err <= 3e-4, err
    # A config of another architecture (the 14B sampling preset) is refused, nothing written.
    argv[argv.index("--config") + 1] = "configs/pods/wan14b_sample.py"
    argv[argv.index("--out") + 1] = str(tmp_path / "w.png")
    r = run_cli(argv)
    assert r.returncode == 2 and "differs from the checkpoint's" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "w.png").exists()


def test_convert_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    r = run_cli(["scripts/convert_diffusers.py", "--src", str(bad), "--dst", str(tmp_path / "o")])
    assert r.returncode == 2 and "missing vae/" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    # A transformer whose weights do not match its config: missing/unexpected keys are listed.
    import shutil

    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    cfg = json.loads((src / "transformer" / "config.json").read_text())
    cfg["num_layers"] = cfg["num_layers"] + 1
    (src / "transformer" / "config.json").write_text(json.dumps(cfg))
    r = run_cli(["scripts/convert_diffusers.py", "--src", str(src), "--dst", str(tmp_path / "o")])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "missing" in r.stderr and "blocks" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp*"))


def test_finetune_from_imported_checkpoint(wan_ckpt, tmp_path):
    wd = tmp_path / "ft"
    r = run_cli(["-m", "sorajax.train", "--config", f"configs/wan2_1_finetune.py:{wan_ckpt}", "--workdir", str(wd),
                 f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.num_train=16",
                 "--config.dit_train.steps=2", "--config.dit_train.log_every=1", "--config.dit_train.ckpt_every=2"],
                env=cli_env(2))  # fsdp=2: the sharded restore of the imported weights
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2] and all(np.isfinite(x["loss"]) for x in rows)
    # The fine-tuned run samples like any run.
    r = run_cli(["-m", "sorajax.sample", "--workdir", str(wd), "--prompt", "a red circle moves right",
                 "--steps", "2", "--out", str(tmp_path / "ft.gif")], env=cli_env(2))
    assert r.returncode == 0, r.stderr[-3000:]


def test_finetune_starts_from_the_imported_weights(wan_ckpt, tmp_path):
    """The fine-tune stage's fresh state is the converted model: before any step its velocity
    and its decoded frames equal the converted checkpoint's (so the imported weights loaded)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import config_lib, inference, sharding, stages
    from sorajax.train_state import Trainer

    cfg = config_lib.load_config(f"{ROOT / 'configs' / 'wan2_1_finetune.py'}:{wan_ckpt}")
    mesh = sharding.make_mesh(cfg.mesh)
    tok_path = stages.ensure_tokenizer(cfg, str(tmp_path))
    stage = stages.DiTStage(cfg, str(tmp_path), stages.load_tokenizer(tok_path), tok_path)
    trainer = Trainer(stage, cfg, mesh)
    fresh = trainer.init()
    state = stage.init_state(jax.tree.map(jnp.copy, fresh), trainer, mesh)
    ours = nnx.merge(trainer.graphdef, state["params"], state["frozen"])
    _, ref, tok, _, _ = inference.load_model(str(wan_ckpt), mesh_cfg=cfg.mesh)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 3, 4, 6, 4)), jnp.float32)  # (B, t, h, w, z)
    ids, mask = tok.encode(["a red circle moves right"], cfg.text.max_length)[:2]
    ctx_ours = ours.encode_text(jnp.asarray(ids), jnp.asarray(mask))
    ctx_ref = ref.encode_text(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(ctx_ours), np.asarray(ctx_ref))
    sigma = jnp.asarray([0.7], jnp.float32)
    v_ours = np.asarray(ours.velocity(x, sigma, ctx_ours))
    np.testing.assert_array_equal(v_ours, np.asarray(ref.velocity(x, sigma, ctx_ref)))
    np.testing.assert_array_equal(np.asarray(ours.decode_latents(x)), np.asarray(ref.decode_latents(x)))
    # ... and not what a fresh random init computes.
    rand = nnx.merge(trainer.graphdef, fresh["params"], fresh["frozen"])
    assert not np.allclose(v_ours, np.asarray(rand.velocity(x, sigma, rand.encode_text(jnp.asarray(ids), jnp.asarray(mask)))))
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), state["ema"], state["params"])
    assert all(jax.tree.leaves(same))  # the EMA starts at the imported weights too
