"""Conditioning masks over latent frames: which frames of a clip are given (kept clean, noise
level 0) and which are generated.

Training (stages.DiTStage with dit_train.cond_rates) draws one mask kind per clip -- none, the
first frame, the first k, the last k, the first and the last, random keyframes -- so that one
model learns text-to-video, image-to-video, extension forward and backward, connecting clips and
keyframe interpolation. Sampling (sorajax/modes.py) builds the same masks from the user's images
and videos; sorajax/sampler.py keeps the masked frames fixed inside the jitted loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Mask kinds drawn in training, in the order of their rates (config dit_train.cond_rates.KIND);
# "none" (plain text-to-video) takes the rest of the probability.
KINDS = ("first", "first_k", "last_k", "first_last", "keyframes")
KEYFRAME_RATE = 0.3  # "keyframes": each latent frame is given with this probability


def rates(tcfg) -> tuple[float, ...]:
    """The configured rates of KINDS (dit_train.cond_rates), in KINDS order."""
    return tuple(float(tcfg.cond_rates[k]) for k in KINDS)


def enabled(tcfg) -> bool:
    return any(r > 0 for r in rates(tcfg))


def sample_masks(key, batch: int, frames: int, rate_values, lengths=None) -> jax.Array:
    """(batch, frames) bool: True = a given (conditioning) latent frame. One kind per clip, drawn
    with `rate_values` (KINDS order; "none" gets 1 - their sum); k uniform in [1, length - 1].
    At least one frame of every clip is generated (a 1-frame clip -- an image -- is never
    conditioned). `lengths` (batch,) int: each clip's latent frames when they differ (packed
    clips; frames is then their maximum); frames past a clip's length are never given."""
    k_kind, k_len, k_key = jax.random.split(key, 3)
    p = jnp.asarray((max(0.0, 1.0 - sum(rate_values)),) + tuple(rate_values), jnp.float32)
    kind = jax.random.choice(k_kind, len(p), (batch,), p=p / p.sum())  # 0 = none, 1 + KINDS index
    n = jnp.full((batch, 1), frames) if lengths is None else jnp.asarray(lengths)[:, None]
    k = jax.random.randint(k_len, (batch, 1), 1, jnp.maximum(n, 2))  # 1 .. length - 1
    i = jnp.arange(frames)[None]
    kind = kind[:, None]
    m = jnp.where(kind == 1, i == 0, False)
    m = jnp.where(kind == 2, i < k, m)
    m = jnp.where(kind == 3, i >= n - k, m)
    m = jnp.where(kind == 4, (i == 0) | (i == n - 1), m)
    m = jnp.where(kind == 5, jax.random.bernoulli(k_key, KEYFRAME_RATE, (batch, frames)), m)
    m = m & (i < n)
    return m & ~jnp.all(m | (i >= n), axis=1, keepdims=True)


def token_levels(sigma, frame_mask, tokens_per_frame: int):
    """token_sigmas in the DiT's cheap form (WanDiT.embed_tokens): two noise levels per example
    (B, 2) = (sigma, 0) and each token's index into them (B, N) int32 (1: a conditioning frame),
    so the timestep modulation is computed twice per example, not once per token."""
    levels = jnp.stack([sigma, jnp.zeros_like(sigma)], axis=1)
    return levels, jnp.repeat(frame_mask, tokens_per_frame, axis=1).astype(jnp.int32)


def token_sigmas(sigma, frame_mask, tokens_per_frame: int):
    """Per-token noise levels (B, N): `sigma` (B,) everywhere except the conditioning frames,
    which are at 0 (tokens in (frame, row, column) order, temporal patch 1)."""
    tok = jnp.repeat(frame_mask, tokens_per_frame, axis=1)
    return jnp.where(tok, 0.0, sigma[:, None]).astype(sigma.dtype)
