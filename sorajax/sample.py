"""Sampling CLI: `python -m sorajax.sample (--workdir DIR | --checkpoint DIR) --prompt TEXT --out PATH`.

A thin entry point: it parses flags, checks the outputs can be written, and calls
`inference.load_pipeline(...).generate(...)` (sorajax/inference.py).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from sorajax import cli, config_lib, fileio, inference, modes, sampler, video_io
from sorajax.errors import UserError

MODE_HELP = """generation mode (sorajax/modes.py):
t2v = video from text; t2i = image from text (a 1-frame video);
i2v = --image is the first frame; extend_forward / extend_backward = --seconds of new footage
after / before --video; connect = a transition from --video to --video2; loop = a clip whose end
leads into its start; keyframes = --keyframe FILE@SECONDS images at those times; v2v = --video
re-generated under the prompt at --strength; long = --seconds of video, window after window"""
# The flags each mode reads (any other mode given one of them is an error, not ignored).
MODE_FLAGS = {"image": ("i2v",), "video": ("extend_forward", "extend_backward", "connect", "v2v"),
              "video2": ("connect",), "seconds": ("extend_forward", "extend_backward", "long"),
              "keyframe": ("keyframes",), "strength": ("v2v",)}


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
    p.add_argument("--step-cache", type=float,
                   help="step cache threshold (TeaCache-style: skip the DiT blocks and extrapolate their residual "
                        "from the last two runs while their modulated input changes little; 0 = off; "
                        "default: config's sample.step_cache). "
                        "docs/PERFORMANCE.md has its speed-up and its cost on the world metrics")
    p.add_argument("--frames", type=int, help="frame count, 1 + 4k (default: the run's; not with --mode t2i)")
    p.add_argument("--height", type=int, help="height in pixels (default: the run's data.height); any multiple of "
                   "VAE stride x patch -- a size it cannot take is an error naming the nearest ones and the "
                   "sizes the run was trained on (docs/SHAPES.md)")
    p.add_argument("--width", type=int, help="width in pixels (default: the run's data.width); likewise")
    p.add_argument("--mode", choices=modes.MODES, default="t2v", help=MODE_HELP)
    p.add_argument("--image", help="i2v: the first frame (png/jpg/webp), resized to cover and centre-cropped")
    p.add_argument("--video", help="extend_*, connect, v2v: the input clip (mp4/gif/webm)")
    p.add_argument("--video2", help="connect: the clip the transition leads into")
    p.add_argument("--seconds", type=float,
                   help="extend_*: seconds of new footage; long: the video's length (any, beyond the training length)")
    p.add_argument("--keyframe", action="append", default=[],
                   help="keyframes: FILE@SECONDS, an image at that time of the clip; repeatable")
    p.add_argument("--strength", type=float, help="v2v: how much is re-generated, in (0, 1] (default 0.7)")
    p.add_argument("--fps", type=float, default=8.0,
                   help="frames per second of the output and of --seconds / --keyframe times (default 8)")
    p.add_argument("--noise", help="initial latent noise .npy, float32 (N, t, h, w, z) channels-last")
    p.add_argument("--save-latents", help="write the final latents (N, t, h, w, z) to this .npy")
    p.add_argument("--save-frames", help="write decoded frames float32 in [0, 1] (N, T, H, W, 3) to this .npy")
    p.add_argument("--no-ema", action="store_true", help="use the raw (not EMA) weights of a run")
    p.add_argument("--config", help="config file[:arg] whose runtime settings replace the checkpoint's: mesh, "
                                    "sharding rules, DiT attention kernel, context parallelism, remat and compute "
                                    "dtypes (e.g. configs/pods/wan14b_sample.py on a TPU slice)")
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
    for flag, users in MODE_FLAGS.items():
        if getattr(a, flag) not in (None, []) and a.mode not in users:
            raise UserError(f"--{flag} is not read by --mode {a.mode} (it is for {', '.join(users)})")
    if a.save_latents and a.mode in ("extend_backward", "connect"):
        raise UserError(f"--save-latents: --mode {a.mode} joins generated frames and the input clip's own "
                        "pixels; it has no one latent sequence to save (use --save-frames)")
    for flag in modes.REQUIRED.get(a.mode, ()):  # before the model loads
        if getattr(a, flag) in (None, []):
            modes.missing(a.mode, "--" + flag)
    for flag in ("image", "video", "video2"):
        if getattr(a, flag) and not os.path.isfile(getattr(a, flag)):
            raise UserError(f"--{flag} {getattr(a, flag)!r} does not exist")
    if a.strength is not None and not 0.0 < a.strength <= 1.0:
        raise UserError(f"--strength {a.strength:g}: must be in (0, 1] (how much of the video is re-generated)")
    if a.seconds is not None and (not a.seconds > 0 or not np.isfinite(a.seconds)):
        raise UserError(f"--seconds {a.seconds}: must be a number > 0")
    if a.noise and a.mode not in ("t2v", "t2i"):
        raise UserError(f"--noise is for --mode t2v / t2i, not {a.mode} (its windows draw their own noise from --seed)")
    if not a.fps > 0 or not np.isfinite(a.fps):
        raise UserError(f"--fps {a.fps}: must be a number > 0")
    # Videos are read before JAX starts (imageio's ffmpeg runs in a subprocess).
    videos = {k: video_io.read_video(getattr(a, k), "--" + k) if getattr(a, k) else None for k in ("video", "video2")}
    runtime = config_lib.load_config(a.config) if a.config else None
    pipe = inference.load_pipeline(workdir=a.workdir, checkpoint=a.checkpoint, use_ema=not a.no_ema,
                                   runtime=runtime)
    if pipe.mesh.devices.size > 1:
        print("sampling on mesh " + ", ".join(f"{k}={v}" for k, v in pipe.mesh.shape.items()), file=sys.stderr)
    kw = dict(steps=a.steps, guidance=a.guidance, shift=a.shift, solver=a.solver, negative_prompt=a.negative_prompt,
              step_cache=a.step_cache)
    if a.mode in ("t2v", "t2i"):
        frames = 1 if a.mode == "t2i" else a.frames
        out = pipe.generate(prompts, seed=a.seed, frames=frames, height=a.height, width=a.width, noise=noise, **kw)
    else:
        inp = modes.Inputs(image=a.image, video=videos["video"], video2=videos["video2"], seconds=a.seconds,
                           keyframes=tuple(a.keyframe), strength=a.strength, fps=a.fps)
        out = modes.Runner(pipe, seed=a.seed, frames=a.frames, height=a.height, width=a.width,
                           **kw).run(a.mode, prompts, inp)
    video_io.write(a.out, out["frames"], prompts, fps=max(1, round(a.fps)))
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
