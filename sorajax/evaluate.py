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

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

from sorajax.errors import UserError

from sorajax.data import world as world_lib

# ----------------------------------------------------------------------------------------------
# Evaluation prompts
# ----------------------------------------------------------------------------------------------

_EVAL_MOTIONS = ("right", "left", "up", "down", "up-right", "down-left", "up-left", "down-right")
STILL_THRESHOLD = 0.1  # displacement / frame size below which a clip counts as still
MOVE_THRESHOLD = 0.1  # displacement / frame size a moving prompt must at least reach
COS_THRESHOLD = 0.8


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    caption: str
    spec: dict[str, Any]
    seed: int


def _make_eval_prompts() -> list[EvalPrompt]:
    """26 prompts: 3 rounds over the 8 colours, each colour with 3 different directions (all 8
    directions, all shapes x sizes appear), plus 2 still objects. Plain black background, no
    occluder."""
    colors = list(world_lib.COLORS)
    sizes = list(world_lib.SIZES)
    specs = []
    for k in range(3):
        for i, color in enumerate(colors):
            specs.append({"shape": world_lib.SHAPES[(i + k) % 3], "color": color,
                          "size": sizes[(i + k) % 2],
                          "motion": _EVAL_MOTIONS[(i + 3 * k) % len(_EVAL_MOTIONS)]})
    specs.append({"shape": "circle", "color": "yellow", "size": "large", "motion": "still"})
    specs.append({"shape": "triangle", "color": "blue", "size": "small", "motion": "still"})
    prompts = []
    for j, obj in enumerate(specs):
        spec = {"objects": [obj], "background": ["black"], "occluder": False}
        prompts.append(EvalPrompt(world_lib.caption_from_meta(spec), spec, 1000 + j))
    return prompts


EVAL_PROMPTS: list[EvalPrompt] = _make_eval_prompts()


def render_prompt(prompt: EvalPrompt, cfg: world_lib.WorldConfig | None = None,
                  seed_offset: int = 0) -> dict[str, Any]:
    """Ground-truth clip for an eval prompt at cfg's size. The speed is capped so the straight
    path fits in the frame (no bounce at any clip length)."""
    cfg = cfg or world_lib.WorldConfig()
    seed = prompt.seed + seed_offset
    obj = dict(prompt.spec["objects"][0])
    if obj["motion"] != "still":
        rng = np.random.default_rng(seed)
        r = world_lib.SIZES[obj["size"]] * cfg.scale
        room = (cfg.scale - 2 * r - 3) * 0.95
        speed = rng.uniform(*cfg.speed_range) * cfg.scale
        obj["speed"] = float(min(speed, room / max(cfg.frames - 1, 1)))
    spec = dict(prompt.spec, objects=[obj])
    return world_lib.render_from_spec(spec, seed, dataclasses.replace(cfg, avoid_bounce=True))


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

class UsageError(UserError):
    """Bad command-line input: reported as one `error:` line, exit code 2."""


def _check_out(out: str) -> str:
    if not out.endswith(".json"):
        raise UsageError(f"--out must end with .json, got {out!r}")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    if not os.path.isdir(parent):
        raise UsageError(f"--out directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out directory is not writable: {parent}")
    from sorajax.cli import probe_writable_dir

    probe_writable_dir(parent, f"--out {out!r}")  # before sampling, not after
    if os.path.isdir(out):
        raise UsageError(f"--out is a directory: {out}")
    return out


def write_json_atomic(path: str, obj: Any) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    except OSError as e:  # e.g. a read-only or pseudo file system that os.access calls writable
        raise UsageError(f"--out {path!r}: cannot create files in {parent!r} ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_benchmark(*, out: str, workdir: str | None = None, ground_truth: bool = False,
                  seed: int = 0, steps: int | None = None, guidance: float | None = None,
                  frames: int | None = None, height: int | None = None,
                  width: int | None = None, batch_size: int = 13) -> dict[str, Any]:
    """Samples (or, with ground_truth, renders) EVAL_PROMPTS, scores them, writes `out`."""
    _check_out(out)
    prompts = EVAL_PROMPTS
    info: dict[str, Any] = {"seed": seed}
    if ground_truth:
        cfg = world_lib.WorldConfig(frames=frames or 9, height=height or 32, width=width or 32)
        clips = [render_prompt(p, cfg, seed)["frames"] for p in prompts]
        seeds = [p.seed + seed for p in prompts]
        info.update(source="ground_truth", frames=cfg.frames, height=cfg.height, width=cfg.width)
    else:
        if not workdir:
            raise UsageError("--workdir is required (or pass --ground-truth)")
        if not os.path.isdir(workdir):
            raise UsageError(f"--workdir does not exist: {workdir}")
        try:
            from sorajax.sample import load_pipeline
        except ImportError as e:
            raise UsageError(f"cannot import the sampler (sorajax.sample): {e}") from e
        try:
            pipe = load_pipeline(workdir=workdir)
        except FileNotFoundError as e:
            raise UsageError(f"cannot load a model from {workdir}: {e}") from e
        defaults = dict(pipe.defaults)
        steps = steps if steps is not None else defaults.get("steps")
        guidance = guidance if guidance is not None else defaults.get("guidance")
        size_kw = {k: v for k, v in (("frames", frames), ("height", height), ("width", width))
                   if v is not None}
        from tqdm import tqdm
        clips, seeds = [], []
        for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch",
                          file=sys.stderr):
            chunk = prompts[start:start + batch_size]
            s = seed + start
            res = pipe.generate([p.caption for p in chunk], seed=s, steps=steps,
                                guidance=guidance, **size_kw)
            clips.extend(np.asarray(res["frames"], np.float32))
            seeds.extend([s] * len(chunk))
        info.update(source="model", workdir=os.path.abspath(workdir), steps=steps,
                    guidance=guidance, frames=int(clips[0].shape[0]),
                    height=int(clips[0].shape[1]), width=int(clips[0].shape[2]))
    report = score_clips(clips, [p.spec for p in prompts])
    for v, p, s in zip(report["videos"], prompts, seeds):
        v.update(prompt=p.caption, seed=int(s), passed=bool(v["color_ok"] and v["direction_ok"]))
    report["info"] = info
    write_json_atomic(out, report)
    return report


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (the command contract)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m sorajax.evaluate",
                description="World benchmark: samples the fixed evaluation prompts from a trained "
                            "model (or renders them with --ground-truth), measures colour and "
                            "direction adherence from the frames, writes a JSON report with "
                            "'metrics' (floats in [0, 1]) and per-video details.")
    p.add_argument("--workdir", help="training workdir of the model to sample from")
    p.add_argument("--out", required=True, help="report path, must end with .json")
    p.add_argument("--ground-truth", action="store_true",
                   help="score clips rendered by the world generator instead of a model "
                        "(analyzer self-check; should score ~1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (offsets render seeds)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (model default)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (model default)")
    p.add_argument("--frames", type=int, default=None, help="clip length (default 9 / model's)")
    p.add_argument("--height", type=int, default=None, help="height (default 32 / model's)")
    p.add_argument("--width", type=int, default=None, help="width (default 32 / model's)")
    p.add_argument("--batch-size", type=int, default=13,
                   help="prompts per sampler call (26 prompts: 13 = two calls of one compiled shape)")
    a = p.parse_args(argv)
    try:
        for name in ("frames", "height", "width", "steps", "batch_size"):
            val = getattr(a, name)
            if val is not None and val < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {val}")
        if a.height is not None and a.height < 8 or a.width is not None and a.width < 8:
            raise UsageError("--height and --width must be >= 8")
        report = run_benchmark(out=a.out, workdir=a.workdir, ground_truth=a.ground_truth,
                               seed=a.seed, steps=a.steps, guidance=a.guidance, frames=a.frames,
                               height=a.height, width=a.width, batch_size=a.batch_size)
    except UserError as e:  # UsageError included
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(json.dumps(report["metrics"], indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
