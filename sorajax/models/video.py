"""The full text-to-video model: causal VAE + DiT + text encoder, built from a config.

Model configs come from each model file's VARIANTS table plus `overrides` in the run config; the
DiT's input/output channels and text width are tied to the VAE's latent channels and the text
encoder's width here so a config cannot get them out of step.
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from sorajax.errors import UserError
from sorajax.models import dit as dit_lib
from sorajax.models import text as text_lib
from sorajax.models import vae as vae_lib


def _variant(table, name, what):
    if name not in table:
        raise UserError(f"{what}.variant: unknown variant {name!r}; known: {sorted(table)}")
    v = table[name]
    return v() if callable(v) else v


def _replace(cfg, overrides, what):
    overrides = dict(overrides or {})
    fields = {f.name for f in dataclasses.fields(cfg)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise UserError(f"{what}.overrides: unknown field(s) {bad}; known: {sorted(fields)}")
    for k, v in overrides.items():
        if isinstance(v, list):
            overrides[k] = tuple(v)
    return dataclasses.replace(cfg, **overrides)


def model_configs(config, vocab_size: int | None = None):
    """(vae_cfg, dit_cfg, text_cfg) for a run config."""
    vae_cfg = _replace(_variant(vae_lib.VARIANTS, config.vae.variant, "vae"), config.vae.overrides, "vae")
    text_cfg = _replace(_variant(text_lib.VARIANTS, config.text.variant, "text"), config.text.overrides, "text")
    if vocab_size is not None:
        text_cfg = dataclasses.replace(text_cfg, vocab_size=int(vocab_size))
    dit_cfg = _replace(_variant(dit_lib.VARIANTS, config.dit.variant, "dit"), config.dit.overrides, "dit")
    dit_cfg = dataclasses.replace(dit_cfg, in_channels=vae_cfg.z_dim, out_channels=vae_cfg.z_dim,
                                  text_dim=text_cfg.d_model)
    return vae_cfg, dit_cfg, text_cfg


def timesteps(sigma):
    """Noise levels -> the DiT's timesteps (x 1000): sigma (B,) or (B, N), or a pair (levels
    (B, M), each token's level (B, N)) whose levels are scaled and index kept."""
    if isinstance(sigma, tuple):
        return sigma[0] * 1000.0, sigma[1]
    return sigma * 1000.0


class VideoModel(nnx.Module):
    """VAE + DiT + text encoder. Sub-modules are attributes `vae`, `dit`, `text`."""

    def __init__(self, vae_cfg, dit_cfg, text_cfg, *, rngs: nnx.Rngs):
        self.vae = vae_lib.WanVAE(vae_cfg, rngs=rngs)
        self.dit = dit_lib.WanDiT(dit_cfg, rngs=rngs)
        self.text = text_lib.UMT5Encoder(text_cfg, rngs=rngs)

    # The module boundaries the trainer and sampler cross: shapes are checked at trace time
    # (chex asserts cost nothing in the compiled program).
    def encode_text(self, ids, mask):
        """Token ids (B, L) -> DiT context (B, L, D): padded positions are zeros, as in Wan."""
        chex.assert_rank([ids, mask], 2)
        chex.assert_equal_shape([ids, mask])
        return text_lib.encode_prompts(self.text, ids, mask)

    def velocity(self, latents, sigma, context, text_kv=None, start=None):
        """v(x_sigma) for latents (B, t, h, w, z) and sigma (B,) or per-token (B, N) or as
        (levels (B, M), each token's level (B, N)) (conditioning.token_levels); the text
        as its DiT context (B, L, D), or (context None) as text_kv(context) computed before;
        `start` (B,) bool: the window begins at its clip's first latent (DiTConfig.start_embedding)."""
        chex.assert_rank(latents, 5)
        s = sigma[0] if isinstance(sigma, tuple) else sigma
        if text_kv is None:
            chex.assert_rank(context, 3)
            chex.assert_equal_shape_prefix([latents, s, context], 1)
        else:
            chex.assert_equal_shape_prefix([latents, s, text_kv[0][0]], 1)
        return self.dit(latents, timesteps(sigma), context, text_kv=text_kv, start=start)

    def velocity_packed(self, tokens, sigma, positions, segment_ids, context, text_segment_ids,
                        start_tokens=None):
        """v of packed clips (sorajax/packing.py): patch vectors (B, N, P) at per-token noise
        levels sigma (B, N) -- or as (levels (B, M), level (B, N)): M noise levels per row and
        each token's index into them, the cheap form (WanDiT.embed_tokens) -- positions (B, N, 3),
        segment_ids (B, N), the slots' captions as a DiT context (B, K*L, D) with
        text_segment_ids (B, K*L) -> (B, N, P)."""
        chex.assert_rank([tokens, positions, segment_ids, context, text_segment_ids], [3, 3, 2, 3, 2])
        if isinstance(sigma, tuple):
            levels, level = sigma
            chex.assert_rank([levels, level], 2)
            chex.assert_equal_shape([level, segment_ids])
        else:
            chex.assert_equal_shape([sigma, segment_ids])
        return self.dit.forward_packed(tokens, timesteps(sigma), positions, segment_ids, context,
                                       text_segment_ids, start_tokens)

    def velocity_cached(self, latents, sigma, text_kv, cache, threshold, start=None):
        """velocity() with a step cache (TeaCache-style): while the first block's modulated input
        has changed by less than `threshold` in accumulated relative L1 since the blocks last
        ran, the call skips them and adds an estimate of their residual (output - input) to its
        input instead: the residual of the last run extrapolated linearly in the noise level
        through the two last runs (the last run's residual alone until there are two).
        `cache` = (probe, residuals of the last two runs, their noise levels, accumulated change,
        calls, block runs) from init_step_cache; returns (v, cache). Deterministic; the skip is
        a lax.cond, so skipped blocks cost nothing."""
        d = self.dit
        hid, e = d.embed(latents, timesteps(sigma), start=start, pooled=d.pooled(None, text_kv))
        probe = d.probe(hid, e)
        s_now = jnp.max((sigma[0] if isinstance(sigma, tuple) else sigma).astype(jnp.float32))
        prev, res1, res2, s1, s2, acc, calls, runs = cache
        rel = jnp.mean(jnp.abs(probe - prev)) / (jnp.mean(jnp.abs(prev)) + 1e-8)
        reuse = (calls > 0) & (acc + rel < threshold)
        slope = jnp.where((runs >= 2) & (s1 != s2), (s_now - s1) / jnp.where(s1 != s2, s1 - s2, 1.0), 0.0)
        est = res1 + slope * (res1 - res2)
        out = jax.lax.cond(reuse, lambda: (hid.astype(jnp.float32) + est).astype(hid.dtype),
                           lambda: d.run(hid, e, None, text_kv))
        new = out.astype(jnp.float32) - hid.astype(jnp.float32)
        res1, res2 = jnp.where(reuse, res1, new), jnp.where(reuse, res2, res1)
        s1, s2 = jnp.where(reuse, s1, s_now), jnp.where(reuse, s2, s1)
        acc = jnp.where(reuse, acc + rel, 0.0)
        return d.head(out, e), (probe, res1, res2, s1, s2, acc, calls + 1, runs + jnp.where(reuse, 0, 1))

    def init_step_cache(self, batch: int, latent_shape):
        """An empty step cache for velocity_cached at `batch` latents of shape (t, h, w, z)."""
        n = dit_lib.num_tokens(self.dit.cfg, tuple(latent_shape)[:3])
        z = jnp.zeros((batch, n, self.dit.cfg.dim), jnp.float32)
        zero = jnp.float32(0.0)
        return (z, z, z, zero, zero, zero, jnp.int32(0), jnp.int32(0))

    def text_kv(self, context):
        """The DiT's cross-attention keys/values of a context (WanDiT.text_kv): once per sample."""
        return self.dit.text_kv(context)

    def encode_video(self, frames):
        """Pixels (B, T, H, W, 3) in [-1, 1] -> normalized latent means (B, t, h, w, z)."""
        chex.assert_rank(frames, 5)
        chex.assert_axis_dimension(frames, 4, 3)
        mean, _ = self.vae.encode(frames)
        return self.vae.normalize(mean)

    def decode_latents(self, latents):
        """Normalized latents (B, t, h, w, z) -> pixels (B, T, H, W, 3) in [-1, 1]."""
        chex.assert_rank(latents, 5)
        return self.vae.decode(self.vae.denormalize(latents))


def window_frames(config) -> int:
    """Frames of the DiT's window: what it trains on (dit_train.clip_frames, cropped from each
    clip at a random start) and the default sampling length; all of data.frames when 0."""
    return int(config.dit_train.clip_frames) or int(config.data.frames)


def build_abstract(config, vocab_size=None):
    vae_cfg, dit_cfg, text_cfg = model_configs(config, vocab_size)
    return nnx.eval_shape(lambda: VideoModel(vae_cfg, dit_cfg, text_cfg, rngs=nnx.Rngs(0)))


def trainable_filter(config):
    """NNX filter of the parameters the DiT stage trains: the DiT, and the text encoder when the
    run trains its own (toy runs) rather than loading a frozen pretrained one."""
    prefixes = ("dit", "text") if config.text.trainable else ("dit",)

    def f(path, value):
        return isinstance(value, nnx.Param) and len(path) > 0 and path[0] in prefixes

    return f
