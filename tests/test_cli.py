"""Commands end to end on a tiny trained run: sample (jitted, compiles once per shape), evaluate,
and the bad-input contract (one line, exit code 2, no partial output)."""
import json
import os

import numpy as np
import pytest

from tests.helpers import run_cli


def _train(workdir, data_dir, *extra):
    # In-training evaluation at steps 3 and 6 on 4 validation prompts (the shape of the
    # end-of-training samples: the same compiled sampler).
    return run_cli(["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", str(workdir),
                    f"--config.data.data_dir={data_dir}", "--config.dit_train.log_every=1",
                    "--config.vae_train.log_every=1", "--config.dit_train.eval_every=3",
                    "--config.dit_train.eval_prompts=4", *extra])


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def run_dir(tmp_path_factory):
    """A tiny trained run (both stages, 6 steps each), shared by the tests below."""
    d = tmp_path_factory.mktemp("run")
    r = _train(d / "run", d / "data")
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "run"


def _losses(path):
    with open(path) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(run_dir, tmp_path):
    """Restarted from the DiT checkpoint of step 3 (its later checkpoint and every logged row
    removed): the steps the resumed process computes itself, 4 to 6, equal the uninterrupted
    run's bit for bit (params, optimizer, EMA, RNG and data iterator all restored; 8 devices)."""
    import shutil

    # The VAE stage's exact resume is tests/test_reliability.py's; here the finished VAE stage is
    # kept (the run skips it) and the DiT stage restarts from its step-3 checkpoint.
    b = tmp_path / "b"
    shutil.copytree(run_dir, b)
    assert sorted(os.listdir(b / "checkpoints")) == ["3", "6"]
    shutil.rmtree(b / "checkpoints" / "6")
    os.remove(b / "metrics.jsonl")  # every row below is written by the resumed process
    r = _train(b, run_dir.parent / "data")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[vae] already trained" in r.stdout and "[dit] resumed" in r.stdout
    want, got = _losses(run_dir / "metrics.jsonl"), _losses(b / "metrics.jsonl")
    assert [s for s, _ in want] == list(range(1, 7)) and [s for s, _ in got] == [4, 5, 6]
    assert got == want[3:]


def test_train_outputs(run_dir):
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    assert rows and all("step" in r and "loss" in r for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows)
    # Throughput against the machine's measured f32 matmul ceiling (flops.run_peak_flops on CPU).
    assert all(r["model_tflops_per_sec"] > 0 and 0 < r["mfu"] < 1.5 for r in rows)
    # In-training evaluation (dit_train.eval_every=3): the world metrics join rows 3 and 6 only.
    evals = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows}
    assert [s for s, e in evals.items() if e] == [3, 6]
    assert {"eval/color_adherence", "eval/direction_adherence", "eval/object_permanence",
            "eval/prompt_adherence"} <= set(evals[6])
    assert all(0 <= v <= 1 for v in evals[6].values()), evals[6]
    assert os.path.isdir(run_dir / "checkpoints" / "6") and os.path.isdir(run_dir / "vae" / "checkpoints" / "6")
    assert any(f.startswith("events") for f in os.listdir(run_dir / "tensorboard"))
    assert (run_dir / "config.json").exists() and (run_dir / "tokenizer" / "spiece.model").exists()
    assert any(n.endswith(".gif") for n in os.listdir(run_dir / "samples"))


def test_sampler_compiles_once_per_shape(run_dir):
    from sorajax import inference, sampler

    pipe = inference.load_pipeline(workdir=str(run_dir))
    before = sampler.TRACE_COUNT["sample"]
    a = pipe.generate(["a large red circle moves right on a black background"], seed=0, steps=2)
    b = pipe.generate(["a small blue square moves up on a navy background"], seed=1, steps=2, guidance=2.0)
    c = pipe.generate(["a small blue square moves up on a navy background"], seed=1, steps=2, guidance=2.0)
    assert sampler.TRACE_COUNT["sample"] - before == 1
    assert a["frames"].shape == (1, 9, 32, 32, 3)
    assert a["frames"].min() >= 0 and a["frames"].max() <= 1
    assert not np.allclose(a["latents"], b["latents"])
    np.testing.assert_array_equal(b["latents"], c["latents"])  # deterministic
    pipe.generate(["x"], seed=0, steps=2, frames=5)  # new shape: one more trace
    assert sampler.TRACE_COUNT["sample"] - before == 2


def test_sample_cli_outputs_and_noise_injection(run_dir, tmp_path):
    base = ["-m", "sorajax.sample", "--workdir", str(run_dir), "--steps", "2",
            "--prompt", "a large red circle moves right on a black background",
            "--prompt", "a small green square moves left on a black background"]
    noise = np.random.default_rng(0).standard_normal((2, 3, 8, 8, 8)).astype(np.float32)
    np.save(tmp_path / "n.npy", noise)
    r = run_cli(base + ["--out", str(tmp_path / "v.mp4"), "--noise", str(tmp_path / "n.npy"),
                        "--save-latents", str(tmp_path / "l1.npy"), "--save-frames", str(tmp_path / "f.npy")])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "v.mp4").stat().st_size > 0
    frames = np.load(tmp_path / "f.npy")
    assert frames.shape == (2, 9, 32, 32, 3) and frames.dtype == np.float32
    r = run_cli(base + ["--out", str(tmp_path / "v.png"), "--noise", str(tmp_path / "n.npy"),
                        "--save-latents", str(tmp_path / "l2.npy"), "--solver", "euler"])
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "l1.npy"), np.load(tmp_path / "l2.npy"))
    r = run_cli(base + ["--out", str(tmp_path / "v.gif"), "--solver", "heun"])
    assert r.returncode == 0 and (tmp_path / "v.gif").stat().st_size > 0


def test_evaluate_cli_on_trained_run(run_dir, tmp_path):
    r = run_cli(["-m", "sorajax.evaluate", "--workdir", str(run_dir), "--out", str(tmp_path / "r.json"),
                 "--steps", "2", "--prompts", "validation"])  # 24 prompts: half the test set's cost
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.load(open(tmp_path / "r.json"))
    assert set(rep["metrics"]) >= {"color_adherence", "direction_adherence"}
    assert all(0.0 <= v <= 1.0 for v in rep["metrics"].values())
    vae = rep["vae"]  # the run's VAE on the prompt set's ground truth, per frame position
    assert len(vae["psnr_by_frame"]) == 9 and len(vae["ssim_by_frame"]) == 9 and vae["clips"] == 24
    assert 5 < vae["psnr"] < 60 and -1 <= vae["ssim"] <= 1
    assert abs(vae["first_frame_psnr_gap_db"] - (np.mean(vae["psnr_by_frame"][1:]) - vae["psnr_by_frame"][0])) < 0.02
    assert len(rep["videos"]) >= 24


BAD = [
    # (argv, words the one-line error must contain)
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.dit_train.nope=1"], "unknown config key"),
    (["-m", "sorajax.train", "--config", "configs/missing.py", "--workdir", "{tmp}/w"], "no such file"),
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "/proc/sorajax_unwritable"],
     "--workdir"),
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.data.frames=8"], "1 + 4k"),
    # Config validation before any compile (one line: field, value, what is allowed).
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.data.height=20"], "data.height=20: must be divisible by 8"),
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.mesh.data=3"], "multiply to 3, but there are 8 devices"),
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.dit_train.batch_size=12"], "train.batch_size=12: must be a multiple of 8"),
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.dit_train.log_every=0"], "train.log_every=0"),
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "gs://bucket/run"],
     "URLs are not supported"),
    (["-m", "sorajax.sample", "--checkpoint", "{tmp}/nockpt", "--prompt", "a red circle", "--out", "{tmp}/o.mp4"],
     "no such directory"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "  ", "--out", "{tmp}/o.mp4"], "empty prompt"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.avi"],
     "unsupported extension"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.mp4",
      "--frames", "6"], "--frames"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/nodir/o.mp4"],
     "does not exist"),
    (["-m", "sorajax.evaluate", "--workdir", "{tmp}/nothere", "--out", "{tmp}/r.json"], "workdir"),
    # Context parallelism never switches itself off: 9x40x32 -> 60 tokens over 8 context devices.
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.mesh.data=1", "--config.mesh.context=8", "--config.data.height=40"],
     "60 DiT tokens, which the 8 context-parallel devices cannot split"),
    # Flags no mode uses are not offered; flags that contradict the mode are refused.
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.png",
      "--image", "{tmp}/x.png"], "unrecognized arguments: --image"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.png",
      "--mode", "t2i", "--frames", "5"], "--frames 5 with --mode t2i"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.png",
      "--mode", "i2v"], "invalid choice: 'i2v'"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[f"{a[1]}-{w}" for a, w in BAD])
def test_bad_input_one_line_exit_2_no_partial_output(run_dir, tmp_path, capfd, argv, words):
    """In process (a subprocess costs ~4 s of imports each): `python -m sorajax.X ARGS` is
    `sys.exit(sorajax.X.main(ARGS))`, the same code path; an exception escaping main fails the
    test as a traceback would (tests/test_cli_fuzz.py runs the real subprocesses)."""
    import importlib

    argv = [a.format(tmp=tmp_path, run=run_dir) for a in argv]
    before = set(os.listdir(tmp_path))
    main = importlib.import_module(argv[1]).main
    capfd.readouterr()
    try:
        rc = main(argv[2:])
    except SystemExit as e:  # argparse
        rc = e.code
    err = capfd.readouterr().err
    assert rc == 2, (rc, err[-2000:])
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error:") and words in lines[-1], err[-2000:]
    assert "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before  # nothing half-written, no stray workdir


def test_sampler_refuses_a_context_split_it_cannot_make(run_dir):
    """Sampling on a mesh with 8 context devices: 48 tokens split, 60 do not (a clear error,
    never a silent full attention on every device)."""
    from sorajax import inference
    from sorajax.errors import UserError

    pipe = inference.load_pipeline(workdir=str(run_dir), mesh_cfg=dict(data=1, context=8))
    out = pipe.generate(["a red circle moves right"], seed=0, steps=1, decode=False)
    assert out["latents"].shape == (1, 3, 8, 8, 8)
    with pytest.raises(UserError, match="60 DiT tokens, which the 8 context-parallel devices cannot split"):
        pipe.generate(["a red circle moves right"], seed=0, steps=1, height=40, decode=False)


def test_commands_turn_the_persistent_compilation_cache_on(monkeypatch, tmp_path):
    """cli.run (every command) points JAX at a persistent compilation cache: the user's
    JAX_COMPILATION_CACHE_DIR, else ~/.cache/sorajax/xla; SORAJAX_COMPILATION_CACHE=0 opts out."""
    import jax

    from sorajax import cli

    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        assert cli.use_compilation_cache({"SORAJAX_COMPILATION_CACHE": "0"}) == ""
        assert jax.config.jax_compilation_cache_dir is None
        assert cli.use_compilation_cache({}) == str(tmp_path / ".cache" / "sorajax" / "xla")
        jax.config.update("jax_compilation_cache_dir", None)
        assert cli.run(lambda argv: 0, []) == 0  # what every command's main goes through
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / ".cache" / "sorajax" / "xla")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert cli.use_compilation_cache({}) == str(tmp_path / "mine")  # the user's choice stands
    finally:
        jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR"))
