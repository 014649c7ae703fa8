"""Sampling CLI: `python -m sorajax.sample (--workdir DIR | --checkpoint DIR) --prompt TEXT --out PATH`.

A thin entry point: it parses flags, checks the outputs can be written, and calls
`inference.load_pipeline(...).generate(...)` (sorajax/inference.py).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from sorajax import cli, fileio, inference, sampler, video_io
from sorajax.errors import UserError

# Modes this sampler runs. The other Sora modes (i2v, extend, connect, loop, v2v, long) and
# their flags (--image, --video, --video2, --strength, --seconds) come with masked training.
MODES = ("t2v", "t2i")


def parse_args(argv):
    p = cli.Parser(
        prog="python -m sorajax.sample",
        description="Generate videos (or images) from text with a trained run or a converted checkpoint. "
                    "The denoising loop and the VAE decode run as one jitted program.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run directory (uses its EMA weights)")
    src.add_argument("--checkpoint", help="a checkpoint directory written by scripts/convert_diffusers.py (or a run)")
    p.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several videos")
    p.add_argument("--out", required=True, help="output .mp4 / .gif (clips tiled) or .png (contact sheet of all prompts)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (prompt i uses fold_in(seed, i))")
    p.add_argument("--steps", type=int, help="denoising steps (default: the run's config.sample.steps)")
    p.add_argument("--guidance", type=float,
                   help="classifier-free guidance scale: 1 = conditional only, 0 = unconditional "
                        "(the negative prompt), >1 = guided (default: config's)")
    p.add_argument("--negative-prompt", help="text for the unconditional branch (default: config's, usually empty)")
    p.add_argument("--solver", choices=sampler.SOLVERS, help="ODE solver (default: config's)")
    p.add_argument("--shift", type=float, help="flow-matching time shift (default: config's)")
    p.add_argument("--frames", type=int, help="frame count, 1 + 4k (default: the run's; not with --mode t2i)")
    p.add_argument("--height", type=int, help="height in pixels (default: the run's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the run's)")
    p.add_argument("--mode", choices=MODES, default="t2v",
                   help="t2v = video from text; t2i = image from text (a 1-frame video)")
    p.add_argument("--noise", help="initial latent noise .npy, float32 (N, t, h, w, z) channels-last")
    p.add_argument("--save-latents", help="write the final latents (N, t, h, w, z) to this .npy")
    p.add_argument("--save-frames", help="write decoded frames float32 in [0, 1] (N, T, H, W, 3) to this .npy")
    p.add_argument("--no-ema", action="store_true", help="use the raw (not EMA) weights of a run")
    return p.parse_args(argv)


def _main(argv):
    a = parse_args(argv)
    prompts = a.prompt
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt: give a non-empty --prompt")
    cli.check_writable_output(a.out, video_io.EXTS, "--out")
    for flag, path in (("--save-latents", a.save_latents), ("--save-frames", a.save_frames)):
        if path:
            cli.check_writable_output(path, (".npy",), flag)
    if a.mode == "t2i" and a.frames is not None and a.frames != 1:
        raise UserError(f"--frames {a.frames} with --mode t2i: an image is 1 frame (drop --frames, "
                        "or use --mode t2v)")
    noise = None
    if a.noise:
        if not os.path.exists(a.noise):
            raise UserError(f"--noise {a.noise!r} does not exist")
        try:
            noise = np.load(a.noise).astype(np.float32)
        except Exception as e:
            raise UserError(f"--noise {a.noise!r} cannot be read as .npy ({type(e).__name__})") from None
    pipe = inference.load_pipeline(workdir=a.workdir, checkpoint=a.checkpoint, use_ema=not a.no_ema)
    frames = 1 if a.mode == "t2i" else a.frames
    out = pipe.generate(prompts, seed=a.seed, steps=a.steps, guidance=a.guidance, shift=a.shift,
                        solver=a.solver, negative_prompt=a.negative_prompt, frames=frames,
                        height=a.height, width=a.width, noise=noise)
    video_io.write(a.out, out["frames"], prompts)
    if a.save_latents:
        fileio.save_npy(a.save_latents, out["latents"])
    if a.save_frames:
        fileio.save_npy(a.save_frames, out["frames"])
    print(f"wrote {os.path.abspath(a.out)} ({len(prompts)} prompt(s), frames {out['frames'].shape[1:]})")
    return 0


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
