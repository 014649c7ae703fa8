"""Sampling library: load a trained run or converted checkpoint and generate.

`load_pipeline()` restores a run (EMA weights) or a converted checkpoint onto the mesh;
`Pipeline.generate()` tokenizes, draws or takes the initial noise, and runs the jitted sampler
(sorajax/sampler.py): the whole denoising loop plus the VAE decode in one compiled program.
The command line is sorajax/sample.py; the trainer (end-of-training samples) and the
benchmark (sorajax/evaluate.py) use this module directly.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import checkpoint as ckpt_lib
from sorajax import config_lib, sampler, sharding, validate
from sorajax import tokenizer as tok_lib
from sorajax.data import shapes
from sorajax.errors import UserError
from sorajax.models import vae as vae_lib
from sorajax.models import video


def _find_tokenizer(run_dir: str, config) -> str:
    cand = os.path.join(run_dir, "tokenizer")
    if os.path.isdir(cand) and any(os.path.exists(os.path.join(cand, f)) for f in ("spiece.model", "tokenizer.json")):
        return cand
    if config.text.tokenizer:
        return config.text.tokenizer
    raise UserError(f"{run_dir}: no tokenizer found (expected tokenizer/spiece.model or tokenizer/tokenizer.json)")


class Pipeline:
    def __init__(self, config, graphdef, state, tokenizer, mesh, vae_cfg, dit_cfg):
        self.config, self.graphdef, self.state = config, graphdef, state
        self.tokenizer, self.mesh = tokenizer, mesh
        self.vae_cfg, self.dit_cfg = vae_cfg, dit_cfg
        s = config.sample
        self.defaults = dict(frames=video.window_frames(config), height=int(config.data.height),
                             width=int(config.data.width), steps=int(s.steps), guidance=float(s.guidance),
                             shift=float(s.shift), solver=str(s.solver),
                             negative_prompt=str(s.negative_prompt), step_cache=float(s.step_cache))
        self.max_length = int(config.text.max_length)
        self._encode = self._decode = None  # encode() / decode(): compiled on first use

    # -- shapes ------------------------------------------------------------------------------
    def trained_sizes(self) -> str:
        """What the model was trained on, for messages: "9x32x48" (frames x height x width), or
        with native shapes (data.aspect_ratios) every height x width and duration it saw."""
        d = self.config.data
        native = shapes.native_settings(d)
        if native is None:
            return f"{self.defaults['frames']}x{d.height}x{d.width} (frames x height x width)"
        sizes = ", ".join(f"{h}x{w}" for h, w in shapes.all_sizes(native, d.height, d.width))
        frames = ", ".join(map(str, native["durations"])) + (" and 1 (images)" if native["image_share"] else "")
        return f"{sizes} (height x width) at {frames} frames"

    def latent_shape(self, frames, height, width):
        return tuple(vae_lib.latent_shape(self.vae_cfg, frames, height, width))

    def check_shape(self, frames, height, width):
        """Sizes this model takes (UserError naming the flag otherwise), including the split of
        its tokens over the mesh's context-parallel devices."""
        rt, rs = self.vae_cfg.temporal_stride, self.vae_cfg.spatial_stride
        ph, pw = self.dit_cfg.patch_size[1], self.dit_cfg.patch_size[2]
        if frames < 1 or (frames - 1) % rt:
            lo = 1 + max(0, (frames - 1) // rt) * rt
            near = f"{lo} or {lo + rt}" if frames > 1 else "1"
            raise UserError(f"--frames {frames}: this model takes 1 + {rt}k frames (1, {1 + rt}, {1 + 2 * rt}, ...); "
                            f"nearest: {near}; trained on {self.trained_sizes()}")
        for name, v, p in (("--height", height, ph), ("--width", width, pw)):
            m = rs * p
            if v <= 0 or v % m:
                near = f"{v // m * m} or {v // m * m + m}" if v > m else f"{m}"
                raise UserError(f"{name} {v}: must be a positive multiple of {m} (VAE stride {rs} x patch {p}); "
                                f"nearest: {near}; trained on {self.trained_sizes()}")
        validate.check_context_split(self.vae_cfg, self.dit_cfg, frames, height, width, self.mesh,
                                     self.config.sharding_rules, "--frames/--height/--width")

    # -- generation --------------------------------------------------------------------------
    def encode_prompts(self, prompts):
        ids, mask, truncated = self.tokenizer.encode(list(prompts), self.max_length)[:3]
        if np.any(truncated):
            print(f"warning: prompt(s) longer than {self.max_length} tokens were truncated", file=sys.stderr)
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)

    def generate(self, prompts, *, seed=0, steps=None, guidance=None, shift=None, solver=None,
                 negative_prompt=None, frames=None, height=None, width=None, noise=None,
                 decode=True, cond_latents=None, cond_mask=None, init_latents=None,
                 strength=1.0, step_cache=None, start=True) -> dict:
        """Samples one clip per prompt -> {"latents": (N, t, h, w, z), "frames": (N, T, H, W, 3)
        in [0, 1] (with decode)}. `cond_latents` + `cond_mask` (N, t): given latent frames, kept
        (sorajax/modes.py); `init_latents` + `strength`: video-to-video (SDEdit); `step_cache`:
        the step cache's threshold (0 = off; default config.sample.step_cache), and then
        "block_runs" / "model_calls" in the result; `start` False: windows cut mid-clip
        (DiTConfig.start_embedding)."""
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
            raise UserError(f"--guidance {guidance}: must be a finite number (1 = no guidance, 0 = unconditional)")
        shift = d["shift"] if shift is None else float(shift)
        if not shift > 0 or not np.isfinite(shift):
            raise UserError(f"--shift {shift}: must be a finite number > 0")
        if not -2**63 <= int(seed) < 2**63:
            raise UserError(f"--seed {seed}: must be a 64-bit integer")
        solver = d["solver"] if solver is None else solver
        if solver not in sampler.SOLVERS:
            raise UserError(f"--solver {solver!r}: choose from {', '.join(sampler.SOLVERS)}")
        neg = d["negative_prompt"] if negative_prompt is None else negative_prompt
        step_cache = d["step_cache"] if step_cache is None else float(step_cache)
        if not step_cache >= 0 or not np.isfinite(step_cache):
            raise UserError(f"--step-cache {step_cache}: must be a finite number >= 0 (0 = off)")
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
        if cond_mask is not None:
            if self.dit_cfg.patch_size[0] != 1:
                raise UserError(f"conditioning frames need a DiT with temporal patch 1, this one has "
                                f"{self.dit_cfg.patch_size[0]}")
            cond_mask = np.asarray(cond_mask, bool)
            if cond_mask.shape != shape[:2] or tuple(np.shape(cond_latents)) != shape:
                raise ValueError(f"cond_mask {cond_mask.shape} / cond_latents {np.shape(cond_latents)} "
                                 f"do not match the latent shape {shape}")
        if init_latents is not None and tuple(np.shape(init_latents)) != shape:
            raise ValueError(f"init_latents {np.shape(init_latents)} do not match the latent shape {shape}")
        ids, mask = self.encode_prompts(prompts)
        nids, nmask = self.encode_prompts([neg] * n)
        # The restored state already carries its mesh shardings; jit follows them.
        latents, out, st = sampler.sample(self.graphdef, self.state, noise, ids, mask, nids, nmask,
                                      steps=steps, shift=shift, guidance=guidance, solver=solver,
                                      decode=decode, mesh=self.mesh,
                                      rules=self.config.sharding_rules, cond_latents=cond_latents,
                                      cond_mask=cond_mask, init_latents=init_latents,
                                      strength=float(strength), step_cache=step_cache, stats=True,
                                      start=np.full((n,), bool(start)))
        res = {"latents": np.asarray(jax.device_get(latents)), **st}
        if decode:
            res["frames"] = np.asarray(jax.device_get(out), np.float32)
        return res

    def encode(self, frames) -> np.ndarray:
        """Clips (N, T, H, W, 3) in [0, 1] -> the VAE's normalized latent means (N, t, h, w, z), as
        the DiT sees them. One compiled program per shape."""
        if self._encode is None:
            self._encode = jax.jit(lambda st, x: nnx.merge(self.graphdef, st).encode_video(x * 2.0 - 1.0))
        x = jnp.asarray(np.asarray(frames, np.float32))
        return np.asarray(jax.device_get(self._encode(self.state, x)), np.float32)

    def decode(self, latents) -> np.ndarray:
        """Normalized latents (N, t, h, w, z) -> clips (N, T, H, W, 3) in [0, 1]."""
        if self._decode is None:
            self._decode = jax.jit(lambda st, z: jnp.clip(
                (nnx.merge(self.graphdef, st).decode_latents(z) + 1.0) * 0.5, 0.0, 1.0))
        z = jnp.asarray(np.asarray(latents, np.float32))
        return np.asarray(jax.device_get(self._decode(self.state, z)), np.float32)

    def reconstruct(self, frames) -> np.ndarray:
        """The VAE round trip of clips (N, T, H, W, 3) in [0, 1]: encode (posterior mean), decode,
        back in [0, 1] (the programs of encode() and decode())."""
        return self.decode(self.encode(frames))


# What `sorajax.sample --config` takes from a config (configs/pods/wan14b_sample.py): how the model
# runs, never what it is. Layer stacking (scan_layers) and parameter dtypes are the checkpoint's.
RUNTIME_MODEL_KEYS = {"dit": ("attention", "context_parallel", "remat", "dtype"), "text": ("dtype",)}


def apply_runtime(config, runtime):
    """`config` (a checkpoint's) with the mesh, sharding rules and the RUNTIME_MODEL_KEYS of
    `runtime`; a key of runtime's model overrides outside those is an error, not ignored."""
    with config.unlocked():
        config.mesh = runtime.mesh
        config.sharding_rules = runtime.sharding_rules
        for sec, keys in RUNTIME_MODEL_KEYS.items():
            mine, theirs = dict(config[sec].overrides), dict(runtime[sec].overrides)
            for k, v in theirs.items():
                if k in keys:
                    mine[k] = v
                elif mine.get(k, v) != v:
                    raise UserError(f"--config: {sec}.overrides.{k}={v!r} differs from the checkpoint's "
                                    f"{mine.get(k)!r}; --config sets only the mesh, sharding rules and "
                                    f"{sec} {', '.join(keys)}")
            config[sec].overrides = mine
    return config


def load_model(run_dir: str, *, use_ema: bool = True, mesh_cfg=None, flag: str = "--checkpoint",
               runtime=None):
    """Restores (config, model, tokenizer, mesh, (vae_cfg, dit_cfg)) from a run dir or converted
    checkpoint dir: the newest readable checkpoint (checkpoint.Checkpointer.restore_latest_good,
    the trainer's restore path), EMA weights when present and asked for, sharded over the mesh."""
    if not run_dir or not os.path.isdir(run_dir):
        raise UserError(f"{flag} {run_dir!r}: no such directory")
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise UserError(f"{flag} {run_dir!r}: not a sorajax run or checkpoint (no config.json)")
    try:
        with open(cfg_path) as f:
            config = config_lib.from_json(f.read(), where=cfg_path)
    except (json.JSONDecodeError, OSError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path}: unreadable config ({e})") from None
    if "dit" not in config.stages:
        raise UserError(f"{flag} {run_dir!r}: not a text-to-video run (its stages are {config.stages})")
    if runtime is not None:
        config = apply_runtime(config, runtime)
        sharding.normalize_rules(config.sharding_rules)  # bad rules: one line
    ckdir = os.path.join(run_dir, "checkpoints")
    if not ckpt_lib.list_steps(ckdir):
        raise UserError(f"{flag} {run_dir!r}: no checkpoint found in {ckdir} (train the DiT stage first)")
    try:
        tokenizer = tok_lib.Tokenizer.load(_find_tokenizer(run_dir, config))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UserError(f"{flag} {run_dir!r}: tokenizer: {e}") from None
    mesh = sharding.make_mesh(mesh_cfg or config.mesh)
    rules = sharding.normalize_rules(config.sharding_rules)
    vocab = tokenizer.vocab_size if config.text.vocab_from_tokenizer else None
    vae_cfg, dit_cfg, text_cfg = video.model_configs(config, vocab_size=vocab)
    abstract = nnx.eval_shape(lambda: video.VideoModel(vae_cfg, dit_cfg, text_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_frozen = nnx.split(abstract, video.trainable_filter(config), ...)

    def target(s):
        sh = sharding.state_shardings(s, mesh, rules)
        return ckpt_lib.abstract_with_shardings(s, sh)

    items = {"model": {"params": target(abs_params), "frozen": target(abs_frozen)}}
    if use_ema:
        items["ema"] = target(abs_params)
    ck = ckpt_lib.Checkpointer(ckdir)
    try:
        got = ck.restore_latest_good(items, optional=("ema",), move_aside=False)
    except UserError:
        raise UserError(f"{flag} {run_dir!r}: no readable checkpoint, or it does not match this "
                        "model config") from None
    finally:
        ck.close()
    if got is None:
        raise UserError(f"{flag} {run_dir!r}: no checkpoint found in {ckdir}")
    result = got[1]
    params = result["ema"] if "ema" in result else result["model"]["params"]
    model = nnx.merge(graphdef, params, result["model"]["frozen"])
    return config, model, tokenizer, mesh, (vae_cfg, dit_cfg)


def load_pipeline(workdir: str | None = None, checkpoint: str | None = None, *, use_ema: bool = True,
                  mesh_cfg=None, runtime=None) -> Pipeline:
    """A Pipeline over the newest complete checkpoint of a run dir (or converted checkpoint dir);
    `runtime`: a config whose runtime settings replace the checkpoint's (apply_runtime)."""
    run_dir = workdir if workdir is not None else checkpoint
    flag = "--workdir" if workdir is not None else "--checkpoint"
    config, model, tokenizer, mesh, (vae_cfg, dit_cfg) = load_model(
        run_dir, use_ema=use_ema, mesh_cfg=mesh_cfg, flag=flag, runtime=runtime)
    gd, state = nnx.split(model)
    return Pipeline(config, gd, state, tokenizer, mesh, vae_cfg, dit_cfg)
