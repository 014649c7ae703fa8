"""Commands end to end on a tiny trained run: sample (jitted, compiles once per shape), evaluate,
and the bad-input contract (one line, exit code 2, no partial output)."""
import dataclasses
import json
import os

import numpy as np
import pytest

from tests.helpers import cli_env, run_cli

# The trained run and the commands on it use 2 fake devices (data=2): still the sharded path, and
# the run takes 75 s instead of 96 s on 8 (idle 2-core machine); the 8-device and multi-process
# resumes are tests/test_multihost.py's.
ENV = cli_env(2)


def _train(workdir, data_dir, *extra):
    # In-training evaluation at steps 3 and 6 on 4 validation prompts (the shape of the
    # end-of-training samples: the same compiled sampler).
    return run_cli(["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", str(workdir),
                    f"--config.data.data_dir={data_dir}", "--config.dit_train.log_every=1",
                    "--config.vae_train.log_every=1", "--config.dit_train.eval_every=3",
                    "--config.dit_train.eval_prompts=4", *extra], env=ENV)


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
    run's bit for bit (params, optimizer, EMA, RNG and data iterator all restored; 2 devices)."""
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
                        "--save-latents", str(tmp_path / "l1.npy"), "--save-frames", str(tmp_path / "f.npy")], env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "v.mp4").stat().st_size > 0
    frames = np.load(tmp_path / "f.npy")
    assert frames.shape == (2, 9, 32, 32, 3) and frames.dtype == np.float32
    r = run_cli(base + ["--out", str(tmp_path / "v.png"), "--noise", str(tmp_path / "n.npy"),
                        "--save-latents", str(tmp_path / "l2.npy"), "--solver", "euler"], env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "l1.npy"), np.load(tmp_path / "l2.npy"))
    r = run_cli(base + ["--out", str(tmp_path / "v.gif"), "--solver", "heun"], env=ENV)
    assert r.returncode == 0 and (tmp_path / "v.gif").stat().st_size > 0


def test_evaluate_cli_on_trained_run(run_dir, tmp_path):
    r = run_cli(["-m", "sorajax.evaluate", "--workdir", str(run_dir), "--out", str(tmp_path / "r.json"),
                 "--steps", "2", "--prompts", "validation"], env=ENV)  # 24 prompts: half the test set's cost
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.load(open(tmp_path / "r.json"))
    assert set(rep["metrics"]) >= {"color_adherence", "direction_adherence"}
    assert all(0.0 <= v <= 1.0 for v in rep["metrics"].values())
    vae = rep["vae"]  # the run's VAE on the prompt set's ground truth, per frame position
    assert len(vae["psnr_by_frame"]) == 9 and len(vae["ssim_by_frame"]) == 9 and vae["clips"] == 24
    assert 5 < vae["psnr"] < 60 and -1 <= vae["ssim"] <= 1
    assert abs(vae["first_frame_psnr_gap_db"] - (np.mean(vae["psnr_by_frame"][1:]) - vae["psnr_by_frame"][0])) < 0.02
    assert set(vae["ceiling"]) == set(rep["metrics"]) - {"heldout_color_adherence", "seen_color_adherence"}
    assert all(0.0 <= v <= 1.0 for v in vae["ceiling"].values())
    # Scored on the round trip, not the truth (which scores 1.0 on colour and shape): a VAE
    # trained for 6 steps cannot give back the prompts' colours and shapes.
    assert vae["ceiling"]["color_adherence"] < 0.9 and vae["ceiling"]["shape_adherence"] < 0.9
    assert "VAE ceiling" in r.stdout
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
      "--config.data.holdout=('red hexagon',)"], "holdout 'red hexagon': expected 'COLOR SHAPE'"),
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
      "--frames", "6"], "--frames 6: this model takes 1 + 4k frames (1, 5, 9, ...); nearest: 5 or 9; trained on"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.mp4",
      "--height", "44"], "--height 44: must be a positive multiple of 8 (VAE stride 4 x patch 2); nearest: 40 or 48; trained on 9x32x32"),
    # Native shapes: clips of several shapes only train packed.
    (["-m", "sorajax.train", "--config", "configs/native.py:runlocal", "--workdir", "{tmp}/w",
      "--config.dit_train.packing=none"], "set dit_train.packing='pack'"),
    (["-m", "sorajax.train", "--config", "configs/native.py:runlocal", "--workdir", "{tmp}/w",
      "--config.dit.overrides.text_pool=True"], "dit.overrides.text_pool=True: pools one caption per row"),
    (["-m", "sorajax.train", "--config", "configs/native.py:runlocal", "--workdir", "{tmp}/w",
      "--config.dit_train.motion_weight=1.0"], "dit_train.motion_weight=1.0: weighs one clip's latents per row"),
    (["-m", "sorajax.train", "--config", "configs/native.py:runlocal", "--workdir", "{tmp}/w",
      "--config.data.durations=(9, 10)"], "data.durations=(9, 10): must be a tuple of frame counts 1 + 4k"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/nodir/o.mp4"],
     "does not exist"),
    (["-m", "sorajax.evaluate", "--workdir", "{tmp}/nothere", "--out", "{tmp}/r.json"], "workdir"),
    # Context parallelism never switches itself off: 9x40x32 -> 60 tokens over 8 context devices.
    (["-m", "sorajax.train", "--config", "configs/toy.py:runlocal", "--workdir", "{tmp}/w",
      "--config.mesh.data=1", "--config.mesh.context=8", "--config.data.height=40"],
     "60 DiT tokens, which the 8 context-parallel devices cannot split"),
    # Flags that contradict the mode are refused, never ignored.
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.png",
      "--image", "{inp}/a.png"], "--image is not read by --mode t2v"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.png",
      "--mode", "t2i", "--frames", "5"], "--frames 5 with --mode t2i"),
    # The generation modes' inputs (sorajax/modes.py).
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "i2v"], "--mode i2v needs --image"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "i2v", "--image", "{inp}/notanimage.png"], "cannot be read as an image"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "v2v", "--video", "{inp}/bad.mp4"], "cannot be read as a video"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "extend_forward", "--video", "{inp}/one.gif", "--seconds", "1"],
     "--video has 1 frame(s): at least 5 are needed"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "v2v", "--video", "{inp}/v.mp4", "--strength", "1.5"], "--strength 1.5: must be in (0, 1]"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "v2v", "--video", "{inp}/v.mp4", "--strength", "0"], "--strength 0: must be in (0, 1]"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "connect", "--video", "{inp}/v.mp4"], "--mode connect needs --video2"),
    (["-m", "sorajax.sample", "--workdir", "{run}", "--prompt", "a red circle", "--out", "{tmp}/o.gif",
      "--mode", "keyframes", "--keyframe", "{inp}/a.png@5"], "past the last frame"),
]


@pytest.fixture(scope="module")
def mode_inputs(tmp_path_factory):
    """Inputs for the generation modes: an image (not the model's size or aspect), a 9-frame mp4
    and a 9-frame gif of a red square moving (the window's length, as the mode benchmark's
    inputs: the two tests share compiled programs), a 1-frame gif, broken files."""
    import imageio.v2 as iio
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    img = np.zeros((48, 64, 3), np.uint8)
    img[16:30, 20:34] = (220, 40, 30)
    img += rng.integers(0, 20, img.shape, np.uint8)
    Image.fromarray(img).save(d / "a.png")
    fr = np.zeros((9, 32, 32, 3), np.uint8)
    for t in range(9):
        fr[t, 12:20, 2 + 2 * t:10 + 2 * t] = (230, 30, 30)
    iio.mimwrite(d / "v.mp4", fr, fps=8, macro_block_size=1)
    iio.mimwrite(d / "v2.gif", fr[::-1])
    iio.mimwrite(d / "one.gif", fr[:1])
    (d / "bad.mp4").write_text("not a video")
    (d / "notanimage.png").write_text("not an image")
    return d


@pytest.mark.parametrize("argv,words", BAD, ids=[f"{a[1]}-{w}" for a, w in BAD])
def test_bad_input_one_line_exit_2_no_partial_output(run_dir, mode_inputs, tmp_path, capfd, argv, words):
    """In process (a subprocess costs ~4 s of imports each): `python -m sorajax.X ARGS` is
    `sys.exit(sorajax.X.main(ARGS))`, the same code path; an exception escaping main fails the
    test as a traceback would (tests/test_cli_fuzz.py runs the real subprocesses)."""
    import importlib

    argv = [a.format(tmp=tmp_path, run=run_dir, inp=mode_inputs) for a in argv]
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


@pytest.fixture(scope="module")
def mode_runner(run_dir):
    """One Pipeline + modes.Runner on the tiny run for the mode tests (its compiled encode and
    decode programs shared between them)."""
    from sorajax import inference, modes

    return modes.Runner(inference.load_pipeline(workdir=str(run_dir)), seed=0, steps=2)


def test_every_mode_keeps_its_given_frames(mode_runner, mode_inputs):
    """Every generation mode on the tiny run (trained with conditioning masks): output lengths,
    and the decoded given region equals the VAE round trip of the input (the causal decoder makes
    a clip's frames independent of what follows them). One sampler program serves every mode
    with given frames."""
    from sorajax import modes, sampler, video_io

    run, pipe = mode_runner, mode_runner.pipe
    inp = modes.Inputs(image=str(mode_inputs / "a.png"), video=str(mode_inputs / "v.mp4"),
                       video2=str(mode_inputs / "v2.gif"), fps=8.0)
    img = video_io.read_image(inp.image, 32, 32)
    vid = video_io.fit_video(video_io.read_video(inp.video), 32, 32)  # 9 frames
    vid2 = video_io.fit_video(video_io.read_video(inp.video2), 32, 32)  # 9 frames
    rt_img = pipe.reconstruct(img[None, None])[0, 0]
    rt1, rt2 = pipe.reconstruct(vid[None])[0], pipe.reconstruct(vid2[None])[0]
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3)
    prompt = ["a large red square moves right on a black background"]
    before = sampler.TRACE_COUNT["sample"]

    out = run.run("i2v", prompt, inp)
    assert out["frames"].shape == (1, 9, 32, 32, 3) and out["given"].tolist() == [True] + [False] * 8
    close(out["frames"][0, 0], rt_img)
    kf = run.run("keyframes", prompt, modes.Inputs(keyframes=(f"{inp.image}@0", f"{inp.image}@0.5"), fps=8.0))
    close(kf["frames"][0, 0], rt_img)
    assert np.flatnonzero(kf["given"]).tolist() == [0, 4]  # 0.5 s = frame 4 -> latent 1 (frames 1-4)

    fwd = run.run("extend_forward", prompt, dataclasses.replace(inp, seconds=1.0))  # 8 frames = 2 latents
    assert fwd["frames"].shape[1] == 9 + 8 and fwd["given"][:9].all() and not fwd["given"][9:].any()
    close(fwd["frames"][0, :9], rt1)
    # A clip after generated footage is given from its second latent frame: the generated
    # latent before it covers its frame 0, and its frames 1.. are its own round trip.
    bwd = run.run("extend_backward", prompt, dataclasses.replace(inp, seconds=1.0))
    assert bwd["frames"].shape[1] == 5 + 8 and bwd["given"].tolist() == [False] * 5 + [True] * 8
    close(bwd["frames"][0, 5:], rt1[1:])
    con = run.run("connect", prompt, inp)  # 9 frames, 1 generated latent frame, 9 - 1 frames
    assert con["frames"].shape[1] == 9 + 4 + 8
    close(con["frames"][0, :9], rt1)
    close(con["frames"][0, 13:], rt2[1:])
    assert sampler.TRACE_COUNT["sample"] - before == 1  # every given-frame window: one program

    loop = run.run("loop", prompt, inp)
    assert loop["frames"].shape[1] == 8 + 4  # the clip from frame 1, then 1 latent frame leading back
    long = run.run("long", prompt, dataclasses.replace(inp, seconds=4.5))  # 36 frames: 9 latents
    assert long["frames"].shape[1] == 33 and long["latents"].shape[1] == 9
    assert np.isfinite(long["frames"]).all()
    near = run.run("v2v", prompt, dataclasses.replace(inp, strength=0.02))
    far = run.run("v2v", prompt, dataclasses.replace(inp, strength=1.0))
    d_near, d_far = (float(np.abs(o["frames"][0] - rt1).mean()) for o in (near, far))
    assert near["frames"].shape[1] == 9 and d_near < 0.02 and d_far > 2 * d_near, (d_near, d_far)
    assert run.run("t2i", prompt, inp)["frames"].shape == (1, 1, 32, 32, 3)


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


def test_mode_benchmark_reports_every_mode(mode_runner, run_dir, tmp_path):
    """The mode benchmark on the tiny run (1 prompt, the shapes of the test above): every named figure is there and in range,
    with a contact sheet per mode; `evaluate --modes` writes it (one mode, to keep it short)."""
    from sorajax import evaluate, mode_eval

    rep = mode_eval.run_modes(mode_runner, num_prompts=1, sheets_dir=str(tmp_path / "sheets"))
    m = rep["metrics"]
    for k in ("i2v_psnr", "connect_psnr", "keyframes_psnr", "v2v_structure_psnr"):
        assert 3 < m[k] < 100, (k, m[k])
    for k in ("extend_seam_continuity", "connect_continuity", "v2v_prompt_adherence",
              "long_first_quarter_adherence", "i2v_color_adherence", "loop_direction_adherence"):
        assert 0 <= m[k] <= 1, (k, m[k])
    assert m["loop_closure_ratio"] > 0 and (m["long_drift_ratio"] is None or m["long_drift_ratio"] >= 0)
    assert sorted(os.listdir(tmp_path / "sheets")) == sorted(
        f"{n}.png" for n in ("i2v", "extend_forward", "extend_backward", "connect", "loop", "long", "v2v", "keyframes"))
    out = tmp_path / "m.json"
    assert evaluate.main(["--workdir", str(run_dir), "--modes", "i2v", "--out", str(out), "--steps", "2",
                          "--num-prompts", "1"]) == 0
    assert set(json.load(open(out))["metrics"]) == {"i2v_psnr", "i2v_color_adherence", "i2v_direction_adherence"}


def _text_probe_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("text_probe", "scripts/text_probe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_text_probe_on_trained_run(run_dir):
    """scripts/text_probe.py (README "Why the DiT plateaus"): the swapped captions differ from the
    true ones in exactly the word they name, and the error of a frame given clean (i2v) is 0."""
    tp = _text_probe_module()
    cap = "a small red circle moves up-left on a black background"
    assert tp.swap_direction(cap) == "a small red circle moves down-right on a black background"
    assert tp.swap_color(cap) == "a small yellow circle moves up-left on a black background"
    res = tp.probe(str(run_dir), clips=4, sigmas=(0.8,))
    rows = {(r["setting"], r["caption"]): r["x0_mse_by_frame"] for r in res["rows"]}
    assert len(rows) == 8 and res["clips"] == 4
    assert all(np.isfinite(v).all() and len(v) == 3 for v in rows.values())
    for caption in ("true", "colour swapped", "direction swapped", "empty"):
        assert rows[("i2v", caption)][0] == 0.0  # latent frame 0 is given: nothing to estimate
        assert rows[("t2v", caption)][0] > 0.0
    assert rows[("t2v", "empty")] != rows[("t2v", "true")]  # the caption reaches the DiT
    assert "x0 MSE" in tp.table(res)
