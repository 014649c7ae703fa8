"""Wan 2.1 T2V 1.3B architecture (VAE 4x8x8 z16, DiT 1536x30, UMT5-XXL encoder), trained by sorajax.

To *use* the released weights, convert them instead (README "Using pretrained Wan 2.1 weights")
and fine-tune with configs/wan2_1_finetune.py. This config trains the architecture from a
given tokenizer (frozen UMT5 text encoder, `text.tokenizer` = a folder with spiece.model or
tokenizer.json), e.g. on a TPU VM:

    python -m sorajax.train --config configs/wan2_1_t2v_1p3b.py --workdir /mnt/gcs/runs/wan1p3b \\
        --config.text.tokenizer=/path/to/umt5-xxl-tokenizer

/mnt/gcs = a Cloud Storage bucket mounted with gcsfuse on every worker (docs/RELIABILITY.md).
Tiny variant (same code paths, tiny sizes; used by tests):
    python -m sorajax.train --config configs/wan2_1_t2v_1p3b.py:runlocal --workdir /tmp/wan_tiny
"""
import os

from sorajax import config_base

_TINY_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                               "umt5_tiny", "tokenizer")


def get_config(arg: str = "", dit_variant: str = "wan2.1-1.3b"):
    c = config_base.get_config()
    c.data.update(frames=81, height=480, width=832, num_train=100_000, num_eval=256,
                  min_objects=1, max_objects=3, occluder_prob=0.3, two_tone_prob=0.3)
    c.vae.update(variant="wan2.1", precompute_latents=False, normalize_latents=False)
    c.dit.variant = dit_variant
    c.text.update(variant="umt5-xxl", max_length=512, trainable=False, vocab_from_tokenizer=False,
                  vocab_size=0)
    c.vae_train.update(steps=100_000, batch_size=64, lr=1e-4, warmup_steps=1000, fg_weight=0.0,
                       sample_posterior=True, log_every=100, ckpt_every=2000)
    c.dit_train.update(steps=200_000, batch_size=256, lr=1e-4, warmup_steps=2000, weight_decay=0.0,
                       b2=0.999, ema_decay=0.9999, log_every=100, ckpt_every=2000)
    c.flow.shift = 3.0
    c.sample.update(steps=50, guidance=5.0, shift=3.0, solver="unipc")
    c.mesh.update(data=1, fsdp=-1)

    if arg == "runlocal":
        c.data.update(frames=5, height=32, width=32, num_train=32, num_eval=8)
        c.vae.variant = "tiny"
        c.dit.variant = "tiny"
        c.text.variant = "tiny"
        c.text.max_length = 16
        c.text.tokenizer = os.path.abspath(_TINY_TOKENIZER)
        c.vae_train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2)
        c.dit_train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2, sample_at_end=False)
        c.sample.steps = 2
        c.mesh.update(data=-1, fsdp=1)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    return c
