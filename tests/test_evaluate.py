"""World-benchmark analyzer and CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sorajax import evaluate as ev
from sorajax.data import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = world.WorldConfig(frames=9, height=32, width=32)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up",
            "up-left": "down-right", "down-right": "up-left", "up-right": "down-left",
            "down-left": "up-right"}


SINGLE = [p for p in world.EVAL_PROMPTS if len(p.spec["objects"]) == 1 and not p.spec["occluder"]]


def _render(prompts, **override):
    clips = []
    for p in prompts:
        obj = dict(p.spec["objects"][0], **{k: f(p.spec["objects"][0]) for k, f in override.items()})
        q = world.EvalPrompt(p.caption, dict(p.spec, objects=[obj]), p.seed)
        clips.append(world.render_prompt(q, CFG)["frames"])
    return clips


def test_eval_prompts_are_the_test_set():
    assert world.EVAL_PROMPTS is world.TEST_PROMPTS  # older callers keep working
    assert world.PROMPT_SETS == {"test": world.TEST_PROMPTS, "validation": world.VALIDATION_PROMPTS}
    assert len(SINGLE) >= 24


def test_eval_seeds_are_not_training_seeds():
    """Ground truth of eval prompts draws from its own SeedSequence stream; the integers also
    miss the toy run's training clip seeds."""
    from sorajax.data import builders
    train = {builders.clip_seed(0, split, i) for split in builders.SPLIT_IDS for i in range(4096)}
    for ps in world.PROMPT_SETS.values():
        assert not {p.seed for p in ps} & train


def test_ground_truth_scores_high():
    clips = [world.render_prompt(p, CFG)["frames"] for p in world.EVAL_PROMPTS]
    r = ev.score_clips(clips, [p.spec for p in world.EVAL_PROMPTS])
    m = r["metrics"]
    for k in ("color_adherence", "direction_adherence", "shape_adherence", "size_adherence",
              "count_adherence", "background_adherence", "persistence", "temporal_consistency",
              "object_permanence", "prompt_adherence"):
        assert m[k] >= 0.98, (k, m)
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())
    json.dumps(r)
    # float [0, 1] input reads the same as uint8
    f = ev.analyze_clip(clips[0].astype(np.float32) / 255, world.EVAL_PROMPTS[0].spec)
    assert f["color_ok"] and f["direction_ok"]


def test_robust_to_blur_and_noise():
    rng = np.random.default_rng(0)

    def degrade(x):
        x = x.astype(np.float32) / 255
        for ax in (1, 2):  # 3-tap blur along H and W
            x = 0.25 * np.roll(x, -1, ax) + 0.5 * x + 0.25 * np.roll(x, 1, ax)
        return np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)

    clips = [degrade(world.render_prompt(p, CFG)["frames"]) for p in world.EVAL_PROMPTS]
    m = ev.score_clips(clips, [p.spec for p in world.EVAL_PROMPTS])["metrics"]
    for k in ("color_adherence", "direction_adherence", "count_adherence", "background_adherence",
              "size_adherence", "shape_adherence", "temporal_consistency", "persistence"):
        assert m[k] >= 0.9, (k, m)


def test_wrong_colour_is_detected():
    names = list(world.COLORS)
    clips = _render(SINGLE, color=lambda o: names[(names.index(o["color"]) + 3) % len(names)])
    m = ev.score_clips(clips, [p.spec for p in SINGLE])["metrics"]
    assert m["color_adherence"] <= 0.05, m
    assert m["direction_adherence"] >= 0.98  # only the colour is wrong


def test_reversed_motion_is_detected():
    moving = [p for p in SINGLE if p.spec["objects"][0]["motion"] != "still"]
    clips = _render(moving, motion=lambda o: OPPOSITE[o["motion"]])
    m = ev.score_clips(clips, [p.spec for p in moving])["metrics"]
    assert m["direction_adherence"] <= 0.05 and m["direction_cosine"] <= 0.05, m
    assert m["color_adherence"] >= 0.98
    # Static clips for moving prompts fail; moving clips for still prompts fail.
    still = _render(moving, motion=lambda o: "still")
    assert ev.score_clips(still, [p.spec for p in moving])["metrics"]["direction_adherence"] == 0
    stills = [p for p in SINGLE if p.spec["objects"][0]["motion"] == "still"]
    assert stills
    moved = _render(stills, motion=lambda o: "right")
    assert ev.score_clips(moved, [p.spec for p in stills])["metrics"]["direction_adherence"] == 0


def test_blank_clip_fails():
    r = ev.analyze_clip(np.zeros((9, 32, 32, 3), np.float32), world.EVAL_PROMPTS[0].spec)
    assert not r["color_ok"] and not r["direction_ok"] and not r["count_ok"]


def test_benchmark_scores_what_a_generate_function_returns():
    """The benchmark takes `generate(captions, seed) -> frames`: it never loads a model itself."""
    truth = ev.ground_truth_generate(CFG)
    calls = []

    def generate(captions, seed):
        calls.append((len(captions), seed))
        return truth(captions, seed)

    rep = ev.run_benchmark(generate, seed=1, info={"source": "test"})
    assert rep["metrics"]["prompt_adherence"] >= 0.98
    assert calls == [(12, 1), (12, 13), (12, 25), (12, 37)]  # batches of one shape, seeds offset
    assert rep["info"]["source"] == "test" and rep["info"]["frames"] == 9
    assert rep["info"]["prompts"] == "test" and len(rep["videos"]) == 48
    assert set(rep["stderr"]) == set(rep["metrics"]) and rep["stderr"]["color_adherence"] is None
    blank = ev.run_benchmark(lambda caps, seed: np.zeros((len(caps), 9, 32, 32, 3), np.float32))
    assert blank["metrics"]["color_adherence"] == 0.0


def test_metrics_by_shape_on_ground_truth_at_native_shapes():
    """configs/native.py's shapes: the benchmark repeated per shape (evaluate_workdir does this
    for a native run) scores the ground truth rendered at each shape high, with the names of
    `metrics`; an image scores colour, shape, size, count and background only. A clip of the
    wrong aspect ratio (or a video for an image) does not pass as the shape asked for."""
    from configs import native

    cases = ev.shape_cases(native.get_config().data)
    assert cases == {"square": (9, 32, 32), "landscape": (9, 32, 48), "portrait": (9, 48, 32), "image": (1, 32, 48)}
    gt = lambda f, h, w: ev.ground_truth_generate(world.WorldConfig(frames=f, height=h, width=w))
    r = ev.by_shape(gt, cases, prompts="validation")
    names = set(ev.run_benchmark(gt(9, 32, 32), prompts="validation", num_prompts=2)["metrics"])
    assert set(r["metrics_by_shape"]) == set(cases) and r["shapes"]["portrait"] == {"frames": 9, "height": 48, "width": 32}
    for name, m in r["metrics_by_shape"].items():
        assert set(m) == names
        if name == "image":
            assert m["direction_adherence"] is None and m["persistence"] is None
            assert m["color_adherence"] >= 0.98 and m["shape_adherence"] >= 0.9, m
        else:
            assert m["color_adherence"] >= 0.98 and m["direction_adherence"] >= 0.98, (name, m)

    def wrong(f, h, w):  # the generator ignores the size asked for
        truth = gt(f, 32, 32)
        return lambda caps, seed: truth(caps, seed)
    with pytest.raises(ValueError, match="shape"):
        ev.by_shape(wrong, {"landscape": (9, 32, 48)}, prompts="validation")


def test_seeds_give_standard_errors_and_prompt_sets_switch():
    calls = []
    truth = ev.ground_truth_generate(CFG)

    def generate(captions, seed):
        calls.append((len(captions), seed))
        if seed >= 24:  # the second sampling seed draws blank clips
            return np.zeros((len(captions), 9, 32, 32, 3), np.float32)
        return truth(captions, seed)

    rep = ev.run_benchmark(generate, seeds=2, prompts="validation")
    assert calls == [(12, 0), (12, 12), (12, 24), (12, 36)]  # seed k starts at k * 24
    m, se = rep["metrics"], rep["stderr"]
    assert abs(m["color_adherence"] - 0.5) < 0.02  # the mean of 1.0 and 0.0
    assert abs(se["color_adherence"] - 0.5) < 0.02  # std (ddof 1) 0.707 / sqrt(2)
    assert len(rep["videos"]) == 48 and rep["info"]["seeds"] == 2
    assert {v["sample"] for v in rep["videos"]} == {0, 1}
    with pytest.raises(ValueError):
        ev.run_benchmark(generate, prompts="train")


def test_heldout_compositions_are_scored_apart():
    """A run's data.holdout: prompts with a held-out colour-shape pair are scored apart
    (metrics_heldout) from the seen ones (metrics_seen). A model that gets only the held-out
    compositions wrong scores low there and high on the seen ones."""
    held = ("yellow circle", "magenta square", "red triangle")
    truth = ev.ground_truth_generate(CFG)
    heldout_caps = {p.caption for p in world.TEST_PROMPTS if world.held_out(p.spec, held)}
    assert 10 <= len(heldout_caps) <= 20  # configs/toy.py's pairs: a third of the test set

    def generate(captions, seed):  # blank clips for the held-out prompts
        x = truth(captions, seed)
        x[[c in heldout_caps for c in captions]] = 0.0
        return x

    rep = ev.run_benchmark(generate, holdout=held)
    assert rep["info"]["heldout_prompts"] == len(heldout_caps)
    assert rep["metrics_seen"]["color_adherence"] >= 0.98
    assert rep["metrics_heldout"]["color_adherence"] == 0.0
    assert rep["metrics"]["heldout_color_adherence"] == 0.0 and rep["metrics"]["seen_color_adherence"] >= 0.98
    assert set(rep["metrics"]) == set(rep["stderr"])
    assert set(rep["metrics_heldout"]) == set(rep["metrics_seen"]) == set(rep["stderr_seen"])
    assert sum(v["heldout"] for v in rep["videos"]) == len(heldout_caps)
    assert "metrics_heldout" not in ev.run_benchmark(truth, prompts="validation")


def test_model_generate_passes_the_sampling_settings():
    by_caption = {p.caption: p for p in world.EVAL_PROMPTS}
    calls = []

    class Pipe:
        def generate(self, prompts, *, seed, steps, guidance, **size):
            calls.append((len(prompts), seed, steps, guidance, size))
            return {"frames": np.stack([world.render_prompt(by_caption[c], CFG, seed)["frames"]
                                        for c in prompts]).astype(np.float32) / 255}

    rep = ev.run_benchmark(ev.model_generate(Pipe(), steps=4, guidance=2.0, frames=9), seed=1)
    assert rep["metrics"]["prompt_adherence"] >= 0.98
    assert calls[0] == (12, 1, 4, 2.0, {"frames": 9})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "sorajax.evaluate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_ground_truth_writes_json(tmp_path):
    out = tmp_path / "gt.json"
    p = _cli("--ground-truth", "--out", str(out))
    assert p.returncode == 0, p.stderr
    rep = json.loads(out.read_text())
    assert rep["metrics"]["color_adherence"] >= 0.98
    assert rep["metrics"]["direction_adherence"] >= 0.98
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in rep["metrics"].values())
    assert len(rep["videos"]) == len(world.EVAL_PROMPTS)
    v = rep["videos"][0]
    for k in ("prompt", "seed", "color", "displacement", "passed", "objects", "background"):
        assert k in v
    for k in ("count_adherence", "object_permanence", "persistence", "background_adherence",
              "temporal_consistency"):
        assert rep["metrics"][k] >= 0.98, rep["metrics"]
    assert set(rep["stderr"]) == set(rep["metrics"])
    assert [f for f in os.listdir(tmp_path)] == ["gt.json"]  # no temp files left


def test_cli_bad_out_dir_subprocess(tmp_path):
    p = _cli("--ground-truth", "--out", str(tmp_path / "missing" / "r.json"))
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [
    ["--ground-truth", "--out", "{tmp}/missing/r.json"],
    ["--ground-truth", "--out", "{tmp}/r.txt"],
    ["--workdir", "{tmp}/nope", "--out", "{tmp}/r.json"],
    ["--out", "{tmp}/r.json"],
    ["--ground-truth", "--out", "{tmp}/r.json", "--frames", "0"],
    ["--ground-truth", "--out", "{tmp}/r.json", "--seeds", "0"],
    ["--ground-truth", "--out", "{tmp}/r.json", "--prompts", "train"],
    ["--ground-truth", "--out", "{tmp}/r.json", "--bogus"],
    ["--ground-truth"],
])
def test_cli_bad_input(tmp_path, capsys, args):
    # In-process (a subprocess costs ~3 s of imports); same code path as `python -m`.
    try:
        rc = ev.main([a.format(tmp=tmp_path) for a in args])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert os.listdir(tmp_path) == []


def test_cli_help():
    p = _cli("--help")
    assert p.returncode == 0 and "--ground-truth" in p.stdout


def test_psnr_ssim_per_frame():
    """Identical clips: SSIM 1 and the PSNR ceiling; noise in frame 0 only lowers frame 0's PSNR
    by what its MSE says, and its SSIM, and leaves the other frames perfect."""
    rng = np.random.default_rng(0)
    a = rng.uniform(0.2, 0.8, (3, 5, 16, 16, 3)).astype(np.float32)
    p, s = ev.psnr_ssim(a, a)
    assert p.shape == s.shape == (5,) and np.all(p >= 99) and np.allclose(s, 1.0, atol=1e-5)
    b = a.copy()
    b[:, 0] += rng.normal(0, 0.05, b[:, 0].shape).astype(np.float32)
    p, s = ev.psnr_ssim(a, b)
    want = np.mean(10 * np.log10(1 / np.mean((a[:, 0] - b[:, 0]) ** 2, axis=(1, 2, 3))))
    assert abs(p[0] - want) < 1e-3 and 20 < p[0] < 30 and np.all(p[1:] >= 99)
    assert s[0] < 0.99 and np.allclose(s[1:], 1.0, atol=1e-5)
