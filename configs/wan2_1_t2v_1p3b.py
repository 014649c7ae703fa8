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

import ml_collections

_TINY_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                               "umt5_tiny", "tokenizer")


def get_config(arg: str = "", dit_variant: str = "wan2.1-1.3b"):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("vae", "dit")
    c.data = ml_collections.ConfigDict(dict(
        data_dir="data", frames=81, height=480, width=832, num_train=100_000, num_eval=256, seed=0,
        min_objects=1, max_objects=3, occluder_prob=0.3, two_tone_prob=0.3))
    c.vae = ml_collections.ConfigDict(dict(variant="wan2.1", overrides={}, precompute_latents=False,
                                           normalize_latents=False))
    c.dit = ml_collections.ConfigDict(dict(variant=dit_variant, overrides={}))
    c.text = ml_collections.ConfigDict(dict(variant="umt5-xxl", overrides={}, max_length=512, trainable=False,
                                            vocab_from_tokenizer=False, tokenizer="", vocab_size=0))
    c.vae_train = ml_collections.ConfigDict(dict(
        steps=100_000, batch_size=64, lr=1e-4, warmup_steps=1000, kl_weight=1e-6, fg_weight=0.0,
        clip_frames=0, sample_posterior=True, log_every=100, ckpt_every=2000,
        inject_nonfinite_steps=()))
    c.train = ml_collections.ConfigDict(dict(
        steps=200_000, batch_size=256, lr=1e-4, warmup_steps=2000, weight_decay=0.0, grad_clip=1.0,
        b1=0.9, b2=0.999, ema_decay=0.9999, text_dropout=0.1, log_every=100, ckpt_every=2000,
        sample_at_end=True, max_nonfinite_in_a_row=20, keep_checkpoints=3,
        # Testing knob (docs/RELIABILITY.md): NaN gradients at these 1-based steps; keep empty.
        inject_nonfinite_steps=()))
    c.flow = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=1.0, shift=3.0))
    c.sample = ml_collections.ConfigDict(dict(steps=50, guidance=5.0, shift=3.0, solver="unipc", negative_prompt=""))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, context=1, tensor=1,
                                            dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1))
    c.sharding_rules = None

    if arg == "runlocal":
        c.data.update(frames=9, height=32, width=32, num_train=32, num_eval=8)
        c.vae.variant = "tiny"
        c.dit.variant = "tiny"
        c.text.variant = "tiny"
        c.text.max_length = 16
        c.text.tokenizer = os.path.abspath(_TINY_TOKENIZER)
        c.vae_train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2)
        c.train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2, sample_at_end=False)
        c.sample.steps = 2
        c.mesh.update(data=-1, fsdp=1)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    return c
