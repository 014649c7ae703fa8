"""diffusers-format Wan 2.1 folders -> sorajax checkpoints.

`convert(src, dst)` reads each component's config (vae/, transformer/, text_encoder/,
scheduler/), builds the matching sorajax config (so any Wan 2.1-family size converts: 1.3B, 14B,
tiny test models), streams the safetensors tensors one at a time into an abstract model (no
random init, never two full copies in host memory), and writes an Orbax checkpoint + config.json
+ the tokenizer that `python -m sorajax.sample --checkpoint DST` loads. The output directory is
assembled under a temporary name and renamed at the end: a failed conversion leaves nothing.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import ml_collections
from flax import nnx
from safetensors import safe_open

from sorajax import checkpoint as ckpt_lib
from sorajax import cli, config_base, config_lib
from sorajax import tokenizer as tok_lib
from sorajax.errors import UserError
from sorajax.models import dit_diffusers
from sorajax.models import text as text_lib
from sorajax.models import vae as vae_lib
from sorajax.models import video

COMPONENTS = ("vae", "transformer", "text_encoder", "tokenizer", "scheduler")


class SafetensorsReader:
    """Mapping-like view over one or more .safetensors files: keys() and reader[name] ->
    np.ndarray, read lazily one tensor at a time (no torch)."""

    def __init__(self, folder: str):
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise UserError(f"{folder}: no .safetensors weights (only safetensors are supported)")
        self._handles = {}
        self._where = {}
        for f in files:
            try:
                h = safe_open(f, framework="np")
            except Exception as e:
                raise UserError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f

    def keys(self):
        return list(self._where)

    def __contains__(self, k):
        return k in self._where

    def __getitem__(self, k):
        return self._handles[self._where[k]].get_tensor(k)


def _read_json(path):
    if not os.path.exists(path):
        raise UserError(f"missing {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def _plain(cfg) -> dict:
    """Dataclass config -> JSON-friendly overrides (dtypes stay at their defaults)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name in ("dtype", "param_dtype"):
            continue
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def run_config(src: str, *, frames: int = 81, height: int = 480, width: int = 832,
               max_length: int = 512) -> ml_collections.ConfigDict:
    """The sorajax run config for a diffusers Wan folder (models from its config.json files)."""
    try:
        vae_cfg = vae_lib.config_from_diffusers(_read_json(os.path.join(src, "vae", "config.json")))
        dit_cfg = dit_diffusers.config_from_diffusers(_read_json(os.path.join(src, "transformer", "config.json")))
        text_cfg = text_lib.config_from_transformers(_read_json(os.path.join(src, "text_encoder", "config.json")))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{src}: unsupported component config ({e})") from None
    sched_path = os.path.join(src, "scheduler", "scheduler_config.json")
    sched = _read_json(sched_path) if os.path.exists(sched_path) else {}
    shift = float(sched.get("flow_shift", sched.get("shift", 3.0)) or 3.0)
    # The folder's own scheduler: "unipc" reproduces diffusers' UniPCMultistepScheduler (bh2,
    # order 2, flow sigmas) step by step (tests/test_solvers.py); anything else samples with Euler,
    # which is FlowMatchEulerDiscreteScheduler's update.
    solver = "unipc" if sched.get("_class_name") == "UniPCMultistepScheduler" else "euler"

    c = config_base.get_config()
    c.stages = ("dit",)
    c.source.update(diffusers=os.path.abspath(src), scheduler=sched.get("_class_name", ""))
    c.data.update(frames=frames, height=height, width=width)
    c.vae.update(variant="wan2.1", overrides=_plain(vae_cfg), precompute_latents=False,
                 normalize_latents=False)
    c.dit.update(variant="wan2.1-1.3b", overrides=_plain(dit_cfg))
    c.text.update(variant="umt5-xxl", overrides=_plain(text_cfg), max_length=max_length,
                  trainable=False, vocab_from_tokenizer=False, tokenizer="", vocab_size=0)
    c.flow.shift = shift
    c.sample.update(steps=50, guidance=5.0, shift=shift, solver=solver)
    return c


def load_weights(model, src: str) -> None:
    """Streams the diffusers/transformers tensors of `src` into `model` (a VideoModel)."""
    vae_lib.load_diffusers(model.vae, SafetensorsReader(os.path.join(src, "vae")))
    dit_diffusers.load_diffusers(model.dit, SafetensorsReader(os.path.join(src, "transformer")))
    text_lib.load_transformers(model.text, SafetensorsReader(os.path.join(src, "text_encoder")),
                               ignore_prefixes=("decoder.", "lm_head."))


def convert(src: str, dst: str, *, frames: int = 81, height: int = 480, width: int = 832,
            max_length: int = 512, overwrite: bool = False) -> str:
    if not os.path.isdir(src):
        raise UserError(f"--src {src!r}: no such directory")
    for comp in ("vae", "transformer", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(src, comp)):
            raise UserError(f"--src {src!r}: missing {comp}/ (expected a diffusers-format Wan 2.1 folder)")
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise UserError(f"--dst {dst!r} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"--dst {dst!r}: parent directory is missing or not writable")

    cli.probe_writable_dir(parent, f"--dst {dst!r}")  # before the conversion, not after


    try:
        tok_lib.Tokenizer.load(os.path.join(src, "tokenizer"))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise UserError(f"{src}/tokenizer: {e}") from None
    config = run_config(src, frames=frames, height=height, width=width, max_length=max_length)
    vae_cfg, dit_cfg, text_cfg = video.model_configs(config)
    rt, rs = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    if frames < 1 or (frames - 1) % rt:
        raise UserError(f"--frames {frames}: this model takes 1 + {rt}k frames (1, {1 + rt}, {1 + 2 * rt}, ...)")
    for flag, v, p in (("--height", height, dit_cfg.patch_size[1]), ("--width", width, dit_cfg.patch_size[2])):
        if v < 1 or v % (rs * p):
            raise UserError(f"{flag} {v}: must be a positive multiple of {rs * p} (VAE stride {rs} x patch {p})")
    if max_length < 2:
        raise UserError(f"--max-length {max_length}: must be >= 2 (tokens and </s>)")
    model = nnx.eval_shape(lambda: video.VideoModel(vae_cfg, dit_cfg, text_cfg, rngs=nnx.Rngs(0)))
    load_weights(model, src)
    _, params, frozen = nnx.split(model, video.trainable_filter(config), ...)

    tmp = dst + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))
        ck = ckpt_lib.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False)
        ck.save(0, {"model": {"params": params, "frozen": frozen},
                    "meta": {"converted_from": os.path.abspath(src), "kind": "wan2.1-diffusers"}})
        ck.close()
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
