"""Sampling Wan 2.1 14B at 81 x 720 x 1280 (75,600 tokens) on a small TPU slice: v6e-8 (8 chips,
32 GiB each) or v5p-8 (4 chips, 95 GiB each). The weights as `scripts/convert_diffusers.py` writes
them (f32, unscanned layers) are sharded over every chip ("embed" over fsdp x context), the
75,600 tokens over `context` (all-to-all heads <-> sequence around the splash kernel), the VAE
decode by rows; compute in bf16. Classifier-free guidance runs both branches in one batch of 2,
split over `fsdp`.

    # 1. prove it fits (CPU-only machine, libtpu): docs/SCALING.md
    python scripts/aot_compile.py --config configs/pods/wan14b_sample.py --topology v6e-8 --sample
    python scripts/aot_compile.py --config configs/pods/wan14b_sample.py:v5p-8 --topology v5p-8 --sample
    # 2. on the slice: the converted checkpoint with this file's mesh, rules and kernels
    python -m sorajax.sample --checkpoint /mnt/gcs/ckpt/wan2.1-t2v-14b --config configs/pods/wan14b_sample.py \\
        --prompt "a red fox running through snow" --frames 81 --height 720 --width 1280 --out fox.mp4

`sorajax.sample --config` takes only the runtime settings from this file (mesh, sharding rules,
attention kernel, context parallelism, compute dtype); the architecture and weights come from the
checkpoint. Argument "v5p-8": the 4-chip mesh (fsdp 1 x context 4).

Tiny variant, the same path (tests/test_convert.py): a converted checkpoint's own config with
this file's rules and kernels on 8 fake CPU devices (data 4 x context 2; splash falls back to the
flash kernel off TPU, with a warning), compute left in f32 so its latents still match diffusers:
    python -m sorajax.sample --checkpoint CKPT --config configs/pods/wan14b_sample.py:runlocal:CKPT \
        --prompt "a red ball" --out ball.png
"""
import os

from configs import wan2_1_t2v_14b
from sorajax import config_lib
from sorajax.sharding import DEFAULT_RULES

RUNTIME = dict(attention="splash", context_parallel="all_to_all", dtype="bfloat16")
# Weights over every chip: a rule for "embed" ahead of the default ("embed" -> fsdp).
RULES = (("embed", ("fsdp", "context")),) + DEFAULT_RULES


def get_config(arg: str = ""):
    mode, _, ckpt = arg.partition(":")
    if mode == "runlocal":
        if not ckpt:
            raise ValueError("runlocal samples a converted checkpoint: configs/pods/wan14b_sample.py:runlocal:CKPT_DIR")
        with open(os.path.join(ckpt, "config.json")) as f:
            c = config_lib.from_json(f.read())
        c.mesh.update(data=-1, fsdp=1, context=2, tensor=1)
        c.sharding_rules = RULES
        c.dit.overrides = dict(c.dit.overrides, attention=RUNTIME["attention"],
                               context_parallel=RUNTIME["context_parallel"])
        return c
    if arg not in ("", "v6e-8", "v5p-8"):
        raise ValueError(f"unknown config argument {arg!r} (known: v6e-8 (default), v5p-8, runlocal:CKPT_DIR)")
    c = wan2_1_t2v_14b.get_config("")
    c.stages = ("dit",)
    c.data.update(frames=81, height=720, width=1280)
    c.mesh.update(data=1, fsdp=1 if arg == "v5p-8" else 2, context=4, tensor=1)
    c.sharding_rules = RULES
    c.dit.overrides = dict(RUNTIME, scan_layers=False, remat="none")
    c.text.overrides = dict(dtype="bfloat16")
    c.sample.update(steps=50, guidance=5.0, shift=5.0, solver="unipc")
    return c
