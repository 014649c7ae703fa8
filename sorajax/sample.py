"""Sampling: `python -m sorajax.sample (--workdir DIR | --checkpoint DIR) --prompt TEXT --out PATH`.

`load_pipeline()` restores a trained run (EMA weights) or a converted checkpoint onto the mesh;
`Pipeline.generate()` tokenizes, draws or takes the initial noise, and runs the jitted sampler
(sorajax/sampler.py): the whole denoising loop plus the VAE decode in one compiled program.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import config_lib, sampler, sharding
from sorajax.errors import UserError

MODES = ("t2v", "t2i", "i2v", "extend_forward", "extend_backward", "connect", "loop", "v2v", "long")
AVAILABLE_MODES = ("t2v", "t2i")


def default_prompts() -> list[str]:
    from sorajax.evaluate import EVAL_PROMPTS

    return [p.caption for p in EVAL_PROMPTS]


def _find_tokenizer(run_dir: str, config) -> str:
    cand = os.path.join(run_dir, "tokenizer")
    if os.path.isdir(cand) and any(os.path.exists(os.path.join(cand, f)) for f in ("spiece.model", "tokenizer.json")):
        return cand
    if config.text.get("tokenizer"):
        return config.text.tokenizer
    raise UserError(f"{run_dir}: no tokenizer found (expected tokenizer/spiece.model or tokenizer/tokenizer.json)")


class Pipeline:
    def __init__(self, config, graphdef, state, tokenizer, mesh, vae_cfg, dit_cfg):
        self.config, self.graphdef, self.state = config, graphdef, state
        self.tokenizer, self.mesh = tokenizer, mesh
        self.vae_cfg, self.dit_cfg = vae_cfg, dit_cfg
        s = config.sample
        self.defaults = dict(frames=int(config.data.frames), height=int(config.data.height),
                             width=int(config.data.width), steps=int(s.steps), guidance=float(s.guidance),
                             shift=float(s.shift), solver=str(s.solver),
                             negative_prompt=str(s.get("negative_prompt", "")))
        self.max_length = int(config.text.max_length)

    # -- shapes ------------------------------------------------------------------------------
    def latent_shape(self, frames, height, width):
        from sorajax.models.vae import latent_shape

        return tuple(latent_shape(self.vae_cfg, frames, height, width))

    def check_shape(self, frames, height, width):
        rt = 2 ** sum(bool(x) for x in self.vae_cfg.temporal_downsample)
        rs = 2 ** (len(self.vae_cfg.dim_mult) - 1)
        ph, pw = self.dit_cfg.patch_size[1], self.dit_cfg.patch_size[2]
        if frames < 1 or (frames - 1) % rt:
            raise UserError(f"--frames {frames}: this model takes 1 + {rt}k frames (1, {1 + rt}, {1 + 2 * rt}, ...)")
        for name, v, p in (("--height", height, ph), ("--width", width, pw)):
            if v <= 0 or v % (rs * p):
                raise UserError(f"{name} {v}: must be a positive multiple of {rs * p} (VAE stride {rs} x patch {p})")

    # -- generation --------------------------------------------------------------------------
    def encode_prompts(self, prompts):
        ids, mask, truncated = self.tokenizer.encode(list(prompts), self.max_length)[:3]
        if np.any(truncated):
            print(f"warning: prompt(s) longer than {self.max_length} tokens were truncated", file=sys.stderr)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

    def generate(self, prompts, *, seed=0, steps=None, guidance=None, shift=None, solver=None,
                 negative_prompt=None, frames=None, height=None, width=None, noise=None,
                 decode=True) -> dict:
        prompts = list(prompts)
        for p in prompts:
            if not str(p).strip():
                raise UserError("empty prompt: give a non-empty --prompt")
        d = self.defaults
        frames = d["frames"] if frames is None else int(frames)
        height = d["height"] if height is None else int(height)
        width = d["width"] if width is None else int(width)
        self.check_shape(frames, height, width)
        steps = d["steps"] if steps is None else int(steps)
        if steps < 1:
            raise UserError(f"--steps {steps}: must be >= 1")
        guidance = d["guidance"] if guidance is None else float(guidance)
        if not np.isfinite(guidance):
            raise UserError(f"--guidance {guidance}: must be a finite number (1 = no guidance)")
        shift = d["shift"] if shift is None else float(shift)
        if not shift > 0 or not np.isfinite(shift):
            raise UserError(f"--shift {shift}: must be a finite number > 0")
        if not -2**63 <= int(seed) < 2**63:
            raise UserError(f"--seed {seed}: must be a 64-bit integer")
        solver = d["solver"] if solver is None else solver
        if solver not in sampler.SOLVERS:
            raise UserError(f"--solver {solver!r}: choose from {', '.join(sampler.SOLVERS)}")
        neg = d["negative_prompt"] if negative_prompt is None else negative_prompt
        n = len(prompts)
        shape = (n,) + self.latent_shape(frames, height, width)
        if noise is None:
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
            noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)
        else:
            noise = jnp.asarray(noise, jnp.float32)
            if tuple(noise.shape) != shape:
                raise UserError(f"--noise: shape {tuple(noise.shape)} does not match the latent shape {shape} "
                                f"(N, t, h, w, z) for {n} prompt(s) at {frames}x{height}x{width}")
        ids, mask = self.encode_prompts(prompts)
        nids, nmask = self.encode_prompts([neg] * n)
        # The restored state already carries its mesh shardings; jit follows them.
        latents, out = sampler.sample(self.graphdef, self.state, noise, ids, mask, nids, nmask,
                                      steps=steps, shift=shift, guidance=guidance, solver=solver,
                                      decode=decode, mesh=self.mesh,
                                      rules=self.config.get("sharding_rules"))
        res = {"latents": np.asarray(jax.device_get(latents))}
        if decode:
            res["frames"] = np.asarray(jax.device_get(out), np.float32)
        return res


def load_model(run_dir: str, *, use_ema: bool = True, mesh_cfg=None, flag: str = "--checkpoint"):
    """Restores (config, model, tokenizer, mesh) from a run dir or converted checkpoint dir: the
    newest readable checkpoint, EMA weights when present and asked for, sharded over the mesh."""
    from sorajax import checkpoint as ckpt_lib
    from sorajax import tokenizer as tok_lib
    from sorajax.models import video

    if not run_dir or not os.path.isdir(run_dir):
        raise UserError(f"{flag} {run_dir!r}: no such directory")
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise UserError(f"{flag} {run_dir!r}: not a sorajax run or checkpoint (no config.json)")
    try:
        with open(cfg_path) as f:
            config = config_lib.from_json(f.read())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{cfg_path}: unreadable config ({e})") from None
    if "dit" not in config or "text" not in config or "vae" not in config:
        raise UserError(f"{flag} {run_dir!r}: not a text-to-video checkpoint (its config has no vae/dit/text)")
    ckdir = os.path.join(run_dir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckdir) if s.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise UserError(f"{flag} {run_dir!r}: no checkpoint found in {ckdir} (train the DiT stage first)")
    try:
        tokenizer = tok_lib.Tokenizer.load(_find_tokenizer(run_dir, config))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UserError(f"{flag} {run_dir!r}: tokenizer: {e}") from None
    mesh = sharding.make_mesh(mesh_cfg or config.mesh)
    rules = sharding.normalize_rules(config.get("sharding_rules"))
    vocab = tokenizer.vocab_size if config.text.get("vocab_from_tokenizer", True) else None
    vae_cfg, dit_cfg, text_cfg = video.model_configs(config, vocab_size=vocab)
    abstract = nnx.eval_shape(lambda: video.VideoModel(vae_cfg, dit_cfg, text_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_frozen = nnx.split(abstract, video.trainable_filter(config), ...)

    def target(s):
        sh = sharding.state_shardings(s, mesh, rules)
        return jax.tree.map(lambda a, h: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=h), s, sh)

    ck = ckpt_lib.Checkpointer(ckdir)
    items = {"model": {"params": target(abs_params), "frozen": target(abs_frozen)}}
    result = None
    for step in reversed(steps):
        want = dict(items)
        if use_ema and os.path.isdir(os.path.join(ckdir, str(step), "ema")):
            want["ema"] = target(abs_params)
        try:
            result = ck.restore(step, want)
            break
        except Exception as e:
            print(f"warning: checkpoint {ckdir}/{step} is unreadable or does not match its config "
                  f"({type(e).__name__}); trying an older one", file=sys.stderr)
    ck.close()
    if result is None:
        raise UserError(f"{flag} {run_dir!r}: no readable checkpoint, or it does not match this model config")
    params = result.get("ema") or result["model"]["params"]
    model = nnx.merge(graphdef, params, result["model"]["frozen"])
    return config, model, tokenizer, mesh, (vae_cfg, dit_cfg)


def load_pipeline(workdir: str | None = None, checkpoint: str | None = None, *, use_ema: bool = True,
                  mesh_cfg=None) -> Pipeline:
    """A Pipeline over the newest complete checkpoint of a run dir (or converted checkpoint dir)."""
    run_dir = workdir if workdir is not None else checkpoint
    flag = "--workdir" if workdir is not None else "--checkpoint"
    config, model, tokenizer, mesh, (vae_cfg, dit_cfg) = load_model(
        run_dir, use_ema=use_ema, mesh_cfg=mesh_cfg, flag=flag)
    gd, state = nnx.split(model)
    return Pipeline(config, gd, state, tokenizer, mesh, vae_cfg, dit_cfg)


# ==============================================================================================
# CLI.
# ==============================================================================================
def parse_args(argv):
    p = argparse.ArgumentParser(
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
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--negative-prompt", help="text for the unconditional branch (default: config's, usually empty)")
    p.add_argument("--solver", choices=sampler.SOLVERS, help="ODE solver (default: config's)")
    p.add_argument("--shift", type=float, help="flow-matching time shift (default: config's)")
    p.add_argument("--frames", type=int, help="frame count, 1 + 4k (default: the run's)")
    p.add_argument("--height", type=int, help="height in pixels (default: the run's)")
    p.add_argument("--width", type=int, help="width in pixels (default: the run's)")
    p.add_argument("--mode", choices=MODES, default="t2v",
                   help=f"generation mode; available now: {', '.join(AVAILABLE_MODES)} (t2i = 1 frame)")
    p.add_argument("--image", help="conditioning image (i2v)")
    p.add_argument("--video", help="conditioning video (extend/connect/loop/v2v)")
    p.add_argument("--video2", help="second video (connect)")
    p.add_argument("--strength", type=float, help="v2v edit strength in (0, 1]")
    p.add_argument("--seconds", type=float, help="length of a long video")
    p.add_argument("--noise", help="initial latent noise .npy, float32 (N, t, h, w, z) channels-last")
    p.add_argument("--save-latents", help="write the final latents (N, t, h, w, z) to this .npy")
    p.add_argument("--save-frames", help="write decoded frames float32 in [0, 1] (N, T, H, W, 3) to this .npy")
    p.add_argument("--no-ema", action="store_true", help="use the raw (not EMA) weights of a run")
    return p.parse_args(argv)


def _save_npy(path, arr):
    from sorajax.cli import atomic_target

    tmp = atomic_target(path) + ".npy"
    try:
        np.save(tmp, arr)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path!r}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _main(argv):
    from sorajax import video_io
    from sorajax.cli import check_writable_output

    a = parse_args(argv)
    prompts = a.prompt
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt: give a non-empty --prompt")
    check_writable_output(a.out, video_io.EXTS, "--out")
    for flag, path in (("--save-latents", a.save_latents), ("--save-frames", a.save_frames)):
        if path:
            check_writable_output(path, (".npy",), flag)
    if a.mode not in AVAILABLE_MODES:
        raise UserError(f"--mode {a.mode}: not available yet (available: {', '.join(AVAILABLE_MODES)}); "
                        "see README 'Roadmap'")
    noise = None
    if a.noise:
        if not os.path.exists(a.noise):
            raise UserError(f"--noise {a.noise!r} does not exist")
        try:
            noise = np.load(a.noise).astype(np.float32)
        except Exception as e:
            raise UserError(f"--noise {a.noise!r} cannot be read as .npy ({type(e).__name__})") from None
    pipe = load_pipeline(workdir=a.workdir, checkpoint=a.checkpoint, use_ema=not a.no_ema)
    frames = 1 if a.mode == "t2i" else a.frames
    out = pipe.generate(prompts, seed=a.seed, steps=a.steps, guidance=a.guidance, shift=a.shift,
                        solver=a.solver, negative_prompt=a.negative_prompt, frames=frames,
                        height=a.height, width=a.width, noise=noise)
    video_io.write(a.out, out["frames"], prompts)
    if a.save_latents:
        _save_npy(a.save_latents, out["latents"])
    if a.save_frames:
        _save_npy(a.save_frames, out["frames"])
    print(f"wrote {os.path.abspath(a.out)} ({len(prompts)} prompt(s), frames {out['frames'].shape[1:]})")
    return 0


def main(argv=None):
    from sorajax import cli

    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
