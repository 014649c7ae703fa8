"""Generation-mode benchmark: every Sora mode measured against the synthetic world's truth.

    python -m sorajax.evaluate --workdir RUN --modes all --out R.json [--seeds 3] [--prompts validation]

The prompts are the set's single-object moving prompts without a wall (28 of the 48 test
prompts, 10 of the 24 validation prompts). Each is rendered by the world generator at the
model's size and a longer length (its path kept inside the frame), and the modes get their
inputs from that ground truth (sorajax/modes.py Runner, per-prompt inputs in one batch):

    i2v         frame 0 of the truth -> i2v_psnr (dB, output frame 0 against it) and the clip's
                colour / direction adherence (the motion after the given frame)
    extend      truth frames 0..T-1 extended forward by T-1 frames, and truth frames T-1..2T-2
                extended backward by T-1 -> extend_seam_continuity: the share of clips whose
                object continues across the seam (seam_continuous: found on both sides with the
                same measured colour and shape, persisting, moving within 45 degrees of the same
                direction; both directions pooled)
    connect     truth frames 0..T-1 and the T frames after the transition's length -> a
                transition -> connect_psnr (dB, the output's given ends against the truth) and
                connect_continuity (seam_continuous between the first clip and the rest)
    loop        a text-to-video clip closed into a loop -> loop_closure_ratio: mean |last - first|
                frame difference over the mean consecutive-frame difference (1 = seamless)
    long        4x the training length -> long_drift_ratio: colour + direction adherence of the
                last quarter over that of the first (1 = no drift; null when the first is 0)
    v2v         the truth at strength 0.3 under its own prompt -> v2v_structure_psnr (dB); at
                strength 0.9 under the prompt with another colour -> v2v_prompt_adherence (the
                new colour's adherence)
    keyframes   truth frames 0 and T-1 as keyframes -> keyframes_psnr (dB at those frames)

Every mode also reports MODE_color_adherence and MODE_direction_adherence (the world analyzer on
its output, sorajax/analysis.py). With --seeds N each figure is the mean over N sampling seeds,
with its standard error in "stderr".
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any

import numpy as np

from sorajax import analysis, modes, video_io
from sorajax.data import world as world_lib

MODE_SETS = ("i2v", "extend", "connect", "loop", "long", "v2v", "keyframes")
STRUCTURE_STRENGTH, EDIT_STRENGTH = 0.3, 0.9


def mode_prompts(split: str, num: int | None = None) -> list:
    """The set's prompts with one moving object and no wall (their first `num`)."""
    ps = [p for p in world_lib.PROMPT_SETS[split] if len(p.spec["objects"]) == 1
          and not p.spec["occluder"] and p.spec["objects"][0]["motion"] != "still"]
    return ps[:num]


def _truth(prompts, frames: int, height: int, width: int) -> np.ndarray:
    cfg = world_lib.WorldConfig(frames=frames, height=height, width=width)
    return np.stack([world_lib.render_prompt(p, cfg)["frames"] for p in prompts]).astype(np.float32) / 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over clips of the PSNR (dB) of a against b, (N, ...) in [0, 1]."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=tuple(range(1, np.ndim(a))))
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def _adherence(clips, specs) -> tuple[list[dict[str, Any]], float, float]:
    vids = [analysis.analyze_clip(c, s) for c, s in zip(clips, specs)]
    return vids, float(np.mean([v["color_ok"] for v in vids])), float(np.mean([v["direction_ok"] for v in vids]))


def seam_continuous(before, after, spec) -> bool:
    """The clip's one object continues across a seam: found on both sides with the same measured
    colour and shape, moving both before and after, in directions within 45 degrees, and
    persisting (nothing appears, vanishes or changes size) on each side."""
    a, b = (analysis.analyze_clip(x, spec) for x in (before, after))
    oa, ob = a["objects"][0], b["objects"][0]
    if not (oa["found"] and ob["found"] and a["persistence_ok"] and b["persistence_ok"]):
        return False
    if oa["color"] != ob["color"] or oa["shape"] != ob["shape"] or None in (oa["displacement"], ob["displacement"]):
        return False
    da, db = np.asarray(oa["displacement"], np.float64), np.asarray(ob["displacement"], np.float64)
    na, nb = np.linalg.norm(da), np.linalg.norm(db)
    return bool(na > 1.0 and nb > 1.0 and da @ db / (na * nb) > np.cos(np.pi / 4))


def recolor(prompt) -> tuple[str, dict[str, Any]]:
    """The prompt with its object in the next colour of the palette -> (caption, spec)."""
    names = list(world_lib.COLORS)
    old = prompt.spec["objects"][0]["color"]
    new = names[(names.index(old) + 1) % len(names)]
    spec = dict(prompt.spec, objects=[dict(prompt.spec["objects"][0], color=new)])
    return re.sub(rf"\b{re.escape(old)}\b", new, prompt.caption, count=1), spec


def run_modes(runner: modes.Runner, which=MODE_SETS, *, prompts: str = "test", num_prompts: int | None = None,
              seeds: int = 1, sheets_dir: str | None = None) -> dict[str, Any]:
    """Runs the modes in `which` on the prompt set's mode prompts with `seeds` sampling seeds
    (runner.seed + k) -> {"metrics", "stderr", "info", "videos"} (module docstring)."""
    plist = mode_prompts(prompts, num_prompts)
    if not plist:
        raise ValueError(f"no single-object prompts in the {prompts!r} set")
    caps, specs = [p.caption for p in plist], [p.spec for p in plist]
    T, H, W = runner.frames, runner.height, runner.width
    s = runner.stride
    base_seed = runner.seed
    per_seed, videos = [], {}
    for k in range(seeds):
        runner.seed = base_seed + k
        m: dict[str, float | None] = {}
        sheets: dict[str, np.ndarray] = {}

        def score(name, out_frames, spec_list=specs):
            vids, c, d = _adherence(out_frames, spec_list)
            m[f"{name}_color_adherence"], m[f"{name}_direction_adherence"] = c, d
            videos.setdefault(name, []).extend(
                dict(prompt=cp, sample=k, color_ok=v["color_ok"], direction_ok=v["direction_ok"],
                     shape_ok=v["shape_ok"], persistence_ok=v["persistence_ok"]) for cp, v in zip(caps, vids))
            sheets[name] = out_frames
            return vids

        if "i2v" in which:
            gt = _truth(plist, T, H, W)
            out = runner.i2v(caps, gt[:, 0])["frames"]
            m["i2v_psnr"] = psnr(out[:, 0], gt[:, 0])
            score("i2v", out)
        if "extend" in which:
            gt = _truth(plist, 2 * T - 1, H, W)
            new = (T - 1) // s
            fwd = runner.extend_forward(caps, gt[:, :T], new)["frames"]
            bwd = runner.extend_backward(caps, gt[:, T - 1:], new)["frames"]
            score("extend_forward", fwd)
            score("extend_backward", bwd)
            cont = [seam_continuous(f[:T], f[T:], sp) for f, sp in zip(fwd, specs)]
            cont += [seam_continuous(f[:-(T - 1)], f[-(T - 1):], sp) for f, sp in zip(bwd, specs)]
            m["extend_seam_continuity"] = float(np.mean(cont))
        if "connect" in which:
            t = runner.latent_frames(T)
            k1, k2 = runner.bridge_given(t, t - 1)
            gap = s * (runner.window[0] - k1 - k2)  # generated frames; the last is b's frame 0
            gt = _truth(plist, 2 * T + gap - 1, H, W)
            a, b = gt[:, :T], gt[:, T + gap - 1:]
            out = runner.connect(caps, a, b)["frames"]  # a, the transition, b from its frame 1
            m["connect_psnr"] = 0.5 * (psnr(out[:, :T], a) + psnr(out[:, -(T - 1):], b[:, 1:]))
            score("connect", out)
            m["connect_continuity"] = float(np.mean([seam_continuous(f[:T], f[T:], sp) for f, sp in zip(out, specs)]))
        if "loop" in which:
            out = runner.loop(caps)["frames"]
            step = np.mean(np.abs(np.diff(out, axis=1)), axis=(1, 2, 3, 4))  # (N,)
            close = np.mean(np.abs(out[:, -1] - out[:, 0]), axis=(1, 2, 3))
            m["loop_closure_ratio"] = float(np.mean(close / np.maximum(step, 1e-6)))
            score("loop", out)
        if "long" in which:
            total = 1 + 4 * (runner.latent_frames(T) - 1)  # 4x the training length in latent frames
            out = runner.long(caps, total)["frames"]
            q = out.shape[1] // 4
            _, c0, d0 = _adherence(out[:, :q], specs)
            _, c1, d1 = _adherence(out[:, -q:], specs)
            m["long_first_quarter_adherence"], m["long_last_quarter_adherence"] = (c0 + d0) / 2, (c1 + d1) / 2
            m["long_drift_ratio"] = (c1 + d1) / (c0 + d0) if c0 + d0 > 0 else None
            score("long", out)
        if "v2v" in which:
            gt = _truth(plist, T, H, W)
            keep = runner.v2v(caps, gt, STRUCTURE_STRENGTH)["frames"]
            m["v2v_structure_psnr"] = psnr(keep, gt)
            edits = [recolor(p) for p in plist]
            out = runner.v2v([c for c, _ in edits], gt, EDIT_STRENGTH)["frames"]
            vids = score("v2v", out, [sp for _, sp in edits])
            m["v2v_prompt_adherence"] = float(np.mean([v["color_ok"] for v in vids]))
        if "keyframes" in which:
            gt = _truth(plist, T, H, W)
            last = runner.latent_frames(T) - 1
            out = runner.keyframes(caps, [(gt[:, 0], 0), (gt[:, -1], last)])["frames"]
            m["keyframes_psnr"] = 0.5 * (psnr(out[:, 0], gt[:, 0]) + psnr(out[:, s * last], gt[:, -1]))
            score("keyframes", out)
        per_seed.append(m)
        if sheets_dir and k == 0:
            os.makedirs(sheets_dir, exist_ok=True)
            for name, fr in sheets.items():
                video_io.write(os.path.join(sheets_dir, f"{name}.png"), fr[:4], caps[:4])
        print(f"mode benchmark: seed {k + 1}/{seeds} done", file=sys.stderr, flush=True)
    runner.seed = base_seed
    metrics, stderr = {}, {}
    for n in per_seed[0]:
        vals = [p[n] for p in per_seed if p[n] is not None]
        metrics[n] = float(np.mean(vals)) if vals else None
        stderr[n] = float(np.std(vals, ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else None
    info = dict(prompts=prompts, num_prompts=len(plist), seeds=seeds, seed=base_seed, modes=list(which),
                frames=T, height=H, width=W, structure_strength=STRUCTURE_STRENGTH, edit_strength=EDIT_STRENGTH)
    return {"metrics": metrics, "stderr": stderr, "info": info, "videos": videos}
