"""World benchmark: attribute and motion adherence measured on generated frames.

A fixed set of single-object prompts (EVAL_PROMPTS, captions in the exact training grammar) is
sampled from a trained model, and each clip is read back by a small analyzer that knows only the
prompt's spec:

* colour: pixels far from the estimated background colour (per-frame median) are foreground;
  each is assigned to the named object colour whose background→colour line it lies closest to
  (so blur, i.e. blends with the background, keeps its hue), weighted by foreground strength;
  the majority colour is the measured one.
* direction: the strength-weighted foreground centroid is tracked over frames; a least-squares
  line through it gives the displacement over the clip. A moving prompt passes when the
  displacement is at least 0.1 of the frame size and within ~37° of the prompted direction
  (cosine >= 0.8, which rejects the neighbouring diagonal/axis at 45°); "still" passes when the
  displacement is below 0.1 of the frame size (moving prompts travel >= 0.24 of it).
* shape (fill ratio of the foreground's bounding box) and size (equivalent radius) are reported
  as extra metrics.

    python -m sorajax.evaluate --workdir runs/toy --out report.json
    python -m sorajax.evaluate --ground-truth --out gt.json   # renders the prompts instead

The report's "metrics" are floats in [0, 1]; "videos" has per-clip details.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from sorajax import cli, fileio, inference
from sorajax.data import world as world_lib
from sorajax.errors import UserError

# Thresholds
# ----------------------------------------------------------------------------------------------
STILL_THRESHOLD = 0.1  # displacement / frame size below which a clip counts as still
MOVE_THRESHOLD = 0.1  # displacement / frame size a moving prompt must at least reach
COS_THRESHOLD = 0.8


# ----------------------------------------------------------------------------------------------
# Analyzer
# ----------------------------------------------------------------------------------------------

_PALETTE_NAMES = list(world_lib.COLORS)
_PALETTE = np.asarray([world_lib.COLORS[c] for c in _PALETTE_NAMES], np.float32) / 255.0


def _to_unit(frames) -> np.ndarray:
    """uint8 [0, 255], float [0, 1] (or float [-1, 1]) → float32 [0, 1], (T, H, W, 3)."""
    x = np.asarray(frames)
    if x.ndim == 3:  # an image is a 1-frame video
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if np.nanmin(x) < -0.05:  # [-1, 1] convention
        x = (x + 1.0) / 2.0
    return np.clip(np.nan_to_num(x), 0.0, 1.0)


def analyze_clip(frames, spec: dict[str, Any], *, lo: float = 0.12, hi: float = 0.3
                 ) -> dict[str, Any]:
    """Measures colour / direction (and shape / size) adherence of one clip to a single-object
    spec (the first object of `spec["objects"]` or the object dict itself).

    frames: (T, H, W, 3) uint8 or float in [0, 1]. lo/hi: distance from the background (RGB in
    [0, 1]) at which a pixel starts to count as foreground / counts fully.
    Returns a JSON-serialisable dict with the measurements and *_ok booleans.
    """
    obj = spec["objects"][0] if "objects" in spec else spec
    x = _to_unit(frames)  # (T, H, W, 3)
    T, H, W, _ = x.shape
    S = float(min(H, W))
    bg = np.median(x.reshape(T, -1, 3), axis=1)  # (T, 3) background colour per frame
    diff = x - bg[:, None, None, :]  # (T, H, W, 3)
    dist = np.linalg.norm(diff, axis=-1)  # (T, H, W)
    w = np.clip((dist - lo) / (hi - lo), 0.0, 1.0)  # (T, H, W) foreground strength
    mass = w.sum(axis=(1, 2))  # (T,)
    out: dict[str, Any] = {"target": {k: obj[k] for k in ("shape", "color", "size", "motion")},
                           "foreground_fraction": float(w.mean())}

    # ---- colour: nearest background→colour line, strength-weighted vote ----
    strong = w >= 0.5  # (T, H, W)
    votes = np.zeros(len(_PALETTE_NAMES))
    if strong.any():
        t_idx = np.nonzero(strong)[0]
        d = diff[strong]  # (N, 3)
        v = _PALETTE[None, :, :] - bg[t_idx][:, None, :]  # (N, K, 3)
        alpha = np.clip((d[:, None, :] * v).sum(-1) / np.maximum((v * v).sum(-1), 1e-6),
                        0.0, 1.0)  # (N, K)
        res = np.linalg.norm(d[:, None, :] - alpha[..., None] * v, axis=-1)  # (N, K)
        k = res.argmin(axis=1)  # (N,)
        np.add.at(votes, k, w[strong] * alpha[np.arange(len(k)), k])
    if votes.sum() > 0:
        measured = _PALETTE_NAMES[int(votes.argmax())]
        purity = float(votes[_PALETTE_NAMES.index(obj["color"])] / votes.sum())
    else:
        measured, purity = None, 0.0
    out.update(color=measured, color_ok=measured == obj["color"], color_purity=purity,
               color_votes={n: round(float(s), 3) for n, s in zip(_PALETTE_NAMES, votes) if s})

    # ---- direction: least-squares line through the weighted centroids ----
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    valid = mass >= 2.0
    cx = (w * xs).sum(axis=(1, 2)) / np.maximum(mass, 1e-6)  # (T,)
    cy = (w * ys).sum(axis=(1, 2)) / np.maximum(mass, 1e-6)  # (T,)
    t = np.arange(T, dtype=np.float64)[valid]
    if T >= 2 and valid.sum() >= 2 and np.ptp(t) > 0:
        A = np.stack([np.ones_like(t), t], axis=1)
        coef, *_ = np.linalg.lstsq(A, np.stack([cx[valid], cy[valid]], 1), rcond=None)
        disp = coef[1] * (T - 1)  # (2,) pixels over the clip, (dx, dy), y down
        norm = float(np.linalg.norm(disp)) / S
        want = np.asarray(world_lib.MOTIONS[obj["motion"]])
        if obj["motion"] == "still":
            cos = None
            ok = norm < STILL_THRESHOLD
        else:
            cos = float(disp @ want / max(np.linalg.norm(disp), 1e-6))
            ok = norm >= MOVE_THRESHOLD and cos >= COS_THRESHOLD
        out.update(displacement=[round(float(disp[0]), 3), round(float(disp[1]), 3)],
                   displacement_norm=round(norm, 4), direction_cosine=cos, direction_ok=bool(ok),
                   centroid_first=[round(float(cx[valid][0]), 2), round(float(cy[valid][0]), 2)],
                   centroid_last=[round(float(cx[valid][-1]), 2), round(float(cy[valid][-1]), 2)])
    else:
        out.update(displacement=None, displacement_norm=None, direction_cosine=None,
                   direction_ok=False)

    # ---- shape and size (extra): median over frames with a visible object ----
    if valid.any():
        fills, areas = [], []
        for i in np.nonzero(valid)[0]:
            m = w[i] >= 0.5
            if m.sum() < 3:
                continue
            rr, cc = np.nonzero(m)
            box = (rr.max() - rr.min() + 1) * (cc.max() - cc.min() + 1)
            fills.append(m.sum() / box)
            areas.append(mass[i])
        if fills:
            fill = float(np.median(fills))
            shape = "square" if fill > 0.9 else ("triangle" if fill < 0.68 else "circle")
            radius = float(np.sqrt(np.median(areas) / world_lib.SHAPE_AREA[obj["shape"]])) / S
            cut = float(np.sqrt(np.prod(list(world_lib.SIZES.values()))))
            size = "large" if radius > cut else "small"
            out.update(fill_ratio=round(fill, 4), shape=shape, shape_ok=shape == obj["shape"],
                       radius=round(radius, 4), size=size, size_ok=size == obj["size"])
    out.setdefault("shape", None)
    out.setdefault("shape_ok", False)
    out.setdefault("size", None)
    out.setdefault("size_ok", False)
    out["color_ok"] = bool(out["color_ok"])
    return out


def score_clips(clips: Sequence, specs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Analyzes clips against their specs → {"metrics": {name: float in [0, 1]}, "videos": [...]}.

    metrics: color_adherence, direction_adherence, prompt_adherence (colour and direction both
    right), shape_adherence, size_adherence, color_purity (mean vote share of the prompted
    colour), direction_cosine ((1 + cos) / 2 averaged over moving prompts)."""
    if len(clips) != len(specs):
        raise ValueError(f"{len(clips)} clips for {len(specs)} specs")
    videos = [analyze_clip(c, s) for c, s in zip(clips, specs)]
    if not videos:
        raise ValueError("no clips to score")

    def mean(vals):
        vals = [float(v) for v in vals]
        return float(np.mean(vals)) if vals else 0.0

    cos = [(1.0 + v["direction_cosine"]) / 2 for v in videos if v["direction_cosine"] is not None]
    metrics = {
        "color_adherence": mean(v["color_ok"] for v in videos),
        "direction_adherence": mean(v["direction_ok"] for v in videos),
        "prompt_adherence": mean(v["color_ok"] and v["direction_ok"] for v in videos),
        "shape_adherence": mean(v["shape_ok"] for v in videos),
        "size_adherence": mean(v["size_ok"] for v in videos),
        "color_purity": mean(v["color_purity"] for v in videos),
        "direction_cosine": mean(cos) if cos else 0.0,
    }
    return {"metrics": metrics, "videos": videos}


# ----------------------------------------------------------------------------------------------
# Benchmark runner and CLI
# ----------------------------------------------------------------------------------------------

# generate(captions, seed) -> frames (N, T, H, W, 3) in [0, 1]: the model under test, as a
# function (the benchmark never loads a model itself; the CLI builds this from a workdir).
Generate = Callable[[Sequence[str], int], np.ndarray]


def ground_truth_generate(cfg: world_lib.WorldConfig) -> Generate:
    """A `Generate` that renders each prompt's ground truth (the analyzer's self-check)."""
    by_caption = {p.caption: p for p in world_lib.EVAL_PROMPTS}

    def generate(captions, seed):
        return np.stack([world_lib.render_prompt(by_caption[c], cfg, seed)["frames"]
                         for c in captions]).astype(np.float32) / 255.0
    return generate


def model_generate(pipe, *, steps=None, guidance=None, frames=None, height=None,
                   width=None) -> Generate:
    """A `Generate` over a sampling `inference.Pipeline` (its defaults unless given)."""
    size = {k: v for k, v in (("frames", frames), ("height", height), ("width", width)) if v is not None}

    def generate(captions, seed):
        out = pipe.generate(list(captions), seed=seed, steps=steps, guidance=guidance, **size)
        return np.asarray(out["frames"], np.float32)
    return generate


def run_benchmark(generate: Generate, *, seed: int = 0, batch_size: int = 13,
                  info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generates EVAL_PROMPTS in batches (batch i uses seed + its first prompt's index) and
    scores them -> {"metrics", "videos", "info"}."""
    prompts = world_lib.EVAL_PROMPTS
    clips, seeds = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch",
                      file=sys.stderr):
        chunk = prompts[start:start + batch_size]
        s = seed + start
        clips.extend(np.asarray(generate([p.caption for p in chunk], s), np.float32))
        seeds.extend([s] * len(chunk))
    report = score_clips(clips, [p.spec for p in prompts])
    for v, p, s in zip(report["videos"], prompts, seeds):
        v.update(prompt=p.caption, seed=int(s), passed=bool(v["color_ok"] and v["direction_ok"]))
    t, h, w = clips[0].shape[:3]
    report["info"] = dict(info or {}, seed=seed, frames=int(t), height=int(h), width=int(w))
    return report


def evaluate_workdir(workdir: str, out: str, **kw) -> dict[str, Any]:
    """Samples the benchmark from a trained run (its EMA weights) and writes the report."""
    cli.check_writable_output(out, (".json",), "--out")
    gen_kw = {k: kw.pop(k) for k in ("steps", "guidance", "frames", "height", "width") if k in kw}
    pipe = inference.load_pipeline(workdir=workdir)
    d = pipe.defaults
    info = dict(source="model", workdir=os.path.abspath(workdir),
                steps=gen_kw.get("steps") or d["steps"],
                guidance=d["guidance"] if gen_kw.get("guidance") is None else gen_kw["guidance"])
    report = run_benchmark(model_generate(pipe, **gen_kw), info=info, **kw)
    fileio.write_json(out, report)
    return report


def parse_args(argv):
    p = cli.Parser(
        prog="python -m sorajax.evaluate",
        description="World benchmark: samples the fixed evaluation prompts from a trained "
                    "model (or renders them with --ground-truth), measures colour and "
                    "direction adherence from the frames, writes a JSON report with "
                    "'metrics' (floats in [0, 1]) and per-video details.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir of the model to sample from")
    src.add_argument("--ground-truth", action="store_true",
                     help="score clips rendered by the world generator instead of a model "
                          "(analyzer self-check; should score ~1.0)")
    p.add_argument("--out", required=True, help="report path, must end with .json")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (offsets render seeds)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (model default)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (model default)")
    p.add_argument("--frames", type=int, default=None, help="clip length (default 9 / model's)")
    p.add_argument("--height", type=int, default=None, help="height (default 32 / model's)")
    p.add_argument("--width", type=int, default=None, help="width (default 32 / model's)")
    p.add_argument("--batch-size", type=int, default=13,
                   help="prompts per sampler call (26 prompts: 13 = two calls of one compiled shape)")
    return p.parse_args(argv)


def _main(argv) -> int:
    a = parse_args(argv)
    for name in ("frames", "height", "width", "steps", "batch_size"):
        val = getattr(a, name)
        if val is not None and val < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {val}")
    if a.height is not None and a.height < 8 or a.width is not None and a.width < 8:
        raise UserError("--height and --width must be >= 8")
    if a.ground_truth:
        cli.check_writable_output(a.out, (".json",), "--out")
        cfg = world_lib.WorldConfig(frames=a.frames or 9, height=a.height or 32, width=a.width or 32)
        report = run_benchmark(ground_truth_generate(cfg), seed=a.seed, batch_size=a.batch_size,
                               info={"source": "ground_truth"})
        fileio.write_json(a.out, report)
    else:
        if not os.path.isdir(a.workdir):
            raise UserError(f"--workdir does not exist: {a.workdir}")
        report = evaluate_workdir(a.workdir, a.out, seed=a.seed, batch_size=a.batch_size,
                                  steps=a.steps, guidance=a.guidance, frames=a.frames,
                                  height=a.height, width=a.width)
    print(json.dumps(report["metrics"], indent=1))
    print(f"wrote {a.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
