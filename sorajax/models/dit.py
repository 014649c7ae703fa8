"""Wan 2.1 Diffusion Transformer (diffusers `WanTransformer3DModel`) in Flax NNX.

Latents come in channels-last (B, F, H, W, C); (pt, ph, pw) patches become N = F/pt * H/ph * W/pw
tokens of width D = heads * head_dim. Each block: adaLN-modulated self-attention (RMS QK-norm
across heads, 3D RoPE from per-token (t, h, w) positions) -> text cross-attention -> modulated
GELU-tanh MLP. Timesteps may be per example (B,) or per token (B, N) (the Wan 2.2 TI2V path), so
that conditioning frames can be clean while the others are noisy.

In f32 this matches diffusers to ~1e-6 (tests/test_dit.py); the weight import is in
dit_diffusers.py. Norms, modulation and RoPE are computed in f32 whatever `dtype` is, as
diffusers does (`_keep_in_fp32_modules`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import sharding
from sorajax.errors import UserError
from sorajax.models.attention import dot_product_attention, self_attention
from sorajax.models.layers import (F32, AffineLayerNorm, TorchRMSNorm, count_params, dense, layer_norm,
                                   pooled_text)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DiTConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: bool = True  # RMS norm over the fused heads*head_dim features of q and k
    eps: float = 1e-6
    rope_max_seq_len: int = 1024  # positions per axis must be < this (table lookup; beyond: NaN)
    rope_theta: float = 10000.0
    attention: str = "xla"  # sorajax.models.attention backend: xla | flash | cudnn | splash | auto
    context_parallel: str = "ring"  # self-attention when tokens are sharded: ring | all_to_all
    dtype: Any = "float32"  # compute dtype of dense layers / residual stream
    param_dtype: Any = "float32"
    # Rematerialisation of each block in the backward pass (REMAT_POLICIES): "none" keeps every
    # activation, "full" keeps only block inputs, "dots" also keeps matmul outputs without a
    # batch dim, "offload" moves those to host memory (TPU/GPU). True/False = "full"/"none".
    remat: Any = "none"
    scan_layers: bool = True  # lax.scan over the blocks (one compiled block; stacked at call); False: unrolled
    # A learned embedding added to the tokens of a window's first latent frame when that frame
    # is a clip's first latent (which the causal VAE encodes from one frame), so that the model
    # can tell text/image-to-video windows from windows cut mid-clip (extension, long videos;
    # sorajax/modes.py). Not in Wan 2.1 (off: its weights import unchanged).
    start_embedding: bool = False
    # The caption's mean embedding projected into the timestep embedding (adaLN of every block),
    # beside cross-attention. Not in Wan 2.1; not for packed rows; on the toy world it scored
    # below cross-attention alone (README, "Why the DiT plateaus"), so it is off everywhere.
    text_pool: bool = False
    # time_proj and proj_out start at zero (DiT's adaLN-Zero; imported weights overwrite them).
    # On the toy world it did not beat the default init (README), so it is off.
    zero_init: bool = False

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """head_dim split into (t, h, w) rotary sub-dims exactly as diffusers WanRotaryPosEmbed."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw


def num_tokens(cfg: DiTConfig, latent_shape) -> int:
    """Tokens for a latent of shape (F, H, W) or (B, F, H, W, C)."""
    f, h, w = tuple(latent_shape)[1:4] if len(latent_shape) == 5 else tuple(latent_shape)
    pt, ph, pw = cfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def param_count(model) -> int:
    """Number of parameters; works on abstract models from nnx.eval_shape (no allocation)."""
    return count_params(model)


# ----------------------------------------------------------------------------------------------
# Timestep embedding and 3D RoPE (norms and dense layers: sorajax/models/layers.py)
# ----------------------------------------------------------------------------------------------
def patchify(x, patch):
    """(B, F, H, W, C) -> (B, N, pt*ph*pw*C): tokens in (f, h, w) order, each patch vector in
    (pt, ph, pw, C) order (Conv3d with kernel = stride = patch, flattened). numpy or jax."""
    B, F, H, W, C = x.shape
    pt, ph, pw = patch
    f, h, w = F // pt, H // ph, W // pw
    tok = x.reshape(B, f, pt, h, ph, w, pw, C).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return tok.reshape(B, f * h * w, pt * ph * pw * C)


def unpatchify(tok, fhw, patch):
    """patchify's inverse: (B, N, pt*ph*pw*C) of a (f, h, w) token grid -> (B, F, H, W, C)."""
    (f, h, w), (pt, ph, pw) = fhw, patch
    B = tok.shape[0]
    c = tok.shape[-1] // (pt * ph * pw)
    out = tok.reshape(B, f, h, w, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return out.reshape(B, f * pt, h * ph, w * pw, c)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding, diffusers Timesteps(flip_sin_to_cos=True, shift=0): (...) -> (..., dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=F32) / half)  # (half,)
    args = t.astype(F32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
    return emb


def grid_positions(f, h, w) -> np.ndarray:
    """(f*h*w, 3) int32 (t, h, w) token positions in the patchified token order."""
    g = np.meshgrid(np.arange(f), np.arange(h), np.arange(w), indexing="ij")
    return np.stack(g, axis=-1).reshape(-1, 3).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _rope_tables(split, max_len, theta):
    """Per-axis (cos, sin) tables (max_len, d/2), angles in f64 then cast to f32 like diffusers."""
    out = []
    for d in split:
        inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
        ang = np.outer(np.arange(max_len, dtype=np.float64), inv)  # (L, d/2)
        out.append((np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)))
    return tuple(out)


def rope_freqs(positions, cfg: DiTConfig):
    """positions (B, N, 3) int -> cos, sin (B, N, head_dim/2) f32: [t | h | w] frequency bands."""
    tables = _rope_tables(cfg.rope_split, cfg.rope_max_seq_len, float(cfg.rope_theta))
    positions = jnp.asarray(positions, jnp.int32)
    cos = [jnp.take(jnp.asarray(c), positions[..., i], axis=0) for i, (c, _) in enumerate(tables)]
    sin = [jnp.take(jnp.asarray(s), positions[..., i], axis=0) for i, (_, s) in enumerate(tables)]
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]). x (B, N, H, hd); cos/sin (B, N, hd/2)."""
    x32 = x.astype(F32)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]  # (B, N, H, hd/2)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)  # (B, N, H, hd/2, 2)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention, block
# ----------------------------------------------------------------------------------------------
class WanAttention(nnx.Module):
    """Self- (context=None) or cross-attention with RMS QK-norm over the fused heads dim."""

    def __init__(self, cfg: DiTConfig, *, rngs):
        d = cfg.dim
        self.cfg = cfg
        self.to_q = dense(d, d, ("embed", "heads"), cfg, rngs)
        self.to_k = dense(d, d, ("embed", "heads"), cfg, rngs)
        self.to_v = dense(d, d, ("embed", "heads"), cfg, rngs)
        self.to_out = dense(d, d, ("heads", "embed"), cfg, rngs)
        self.norm_q = TorchRMSNorm(d, cfg.eps, cfg) if cfg.qk_norm else None
        self.norm_k = TorchRMSNorm(d, cfg.eps, cfg) if cfg.qk_norm else None

    def project_kv(self, context):
        """Cross-attention keys and values of `context` (B, L, D): (k, v), each (B, L, H, hd)."""
        heads = (self.cfg.num_attention_heads, self.cfg.attention_head_dim)
        k, v = self.to_k(context), self.to_v(context)  # (B, L, D)
        if self.norm_k is not None:
            k = self.norm_k(k)
        return k.reshape(*k.shape[:2], *heads), v.reshape(*v.shape[:2], *heads)

    def __call__(self, x, context=None, rope=None, kv=None, segments=None):
        """Self-attention (context None), or cross-attention on `context` or on its keys and
        values `kv` = project_kv(context) computed beforehand (the sampler: once per sample).
        segments: optional (query ids (B, N), key ids (B, N|L)) of packed clips: a token attends
        only to keys with its id (sorajax/packing.py)."""
        cfg = self.cfg
        heads = (cfg.num_attention_heads, cfg.attention_head_dim)
        q = self.to_q(x)  # (B, N, D)
        if self.norm_q is not None:
            q = self.norm_q(q)
        q = q.reshape(*q.shape[:2], *heads)  # (B, N, H, hd)
        if kv is not None:
            k, v = kv
        else:
            k, v = self.project_kv(x if context is None else context)  # (B, N|L, H, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        names = ("batch", "length", "heads", None)
        q, k, v = (sharding.constrain(a, names) for a in (q, k, v))
        qs, ks = (None, None) if segments is None else segments
        if context is None and kv is None:
            o = self_attention(q, k, v, backend=cfg.attention, context_parallel=cfg.context_parallel,
                               q_segment_ids=qs, kv_segment_ids=ks)
        else:  # text keys are short and replicated over the sequence shards
            o = dot_product_attention(q, k, v, backend=cfg.attention, q_segment_ids=qs,
                                      kv_segment_ids=ks)  # (B, N, H, hd)
        o = sharding.constrain(o, names)
        return self.to_out(o.reshape(*o.shape[:2], cfg.dim))


class WanBlock(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs):
        d = cfg.dim
        self.cfg = cfg
        self.attn1 = WanAttention(cfg, rngs=rngs)
        self.attn2 = WanAttention(cfg, rngs=rngs)
        self.norm2 = AffineLayerNorm(d, cfg.eps, cfg) if cfg.cross_attn_norm else None
        self.ffn_in = dense(d, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
        self.ffn_out = dense(cfg.ffn_dim, d, ("mlp", "embed"), cfg, rngs)
        init = jax.random.normal(rngs.params(), (1, 6, d), F32) / math.sqrt(d)
        self.scale_shift_table = nnx.Param(init.astype(jnp.dtype(cfg.param_dtype)),
                                           out_sharding=(None, "modulation", "embed"))

    def __call__(self, x, context, mod, cos, sin, kv=None, segments=None):
        """x (B, N, D); context (B, L, D), or None with kv = attn2.project_kv(context);
        mod (B, S, 6, D) f32 with S in {1, N}, or (mod (B, M, 6, D), level (B, N)): M timestep
        levels and each token's level (packed clips: see WanDiT.embed_tokens); segments: None, or
        packed clips' ids (tokens (B, N), text (B, L) or None: every token sees the whole text)."""
        cfg, dt = self.cfg, x.dtype
        mod, level = mod if isinstance(mod, tuple) else (mod, None)
        m = self.scale_shift_table[...].astype(F32)[None] + mod  # (B, S|M, 6, D)
        # (B, S, D) each; with levels gathered per token here, one at a time, so no (B, N, 6, D)
        # tensor is ever built (the packed 14B step's largest buffer and its largest all-reduce).
        shift, scale, gate, c_shift, c_scale, c_gate = (at_tokens(m[:, :, i], level) for i in range(6))

        h = (layer_norm(x, cfg.eps) * (1 + scale) + shift).astype(dt)
        seg, text_seg = (None, None) if segments is None else segments
        self_seg = None if seg is None else (seg, seg)
        cross_seg = None if seg is None or text_seg is None else (seg, text_seg)
        x = (x.astype(F32) + self.attn1(h, None, (cos, sin), segments=self_seg).astype(F32) * gate).astype(dt)

        h = (self.norm2(x) if self.norm2 is not None else x).astype(dt)
        x = x + self.attn2(h, context, kv=kv, segments=cross_seg)

        h = (layer_norm(x, cfg.eps) * (1 + c_scale) + c_shift).astype(dt)
        ff = sharding.constrain(self.ffn_in(h), ("batch", "length", "mlp"))  # (B, N, F)
        ff = self.ffn_out(jax.nn.gelu(ff, approximate=True))  # (B, N, D)
        x = (x.astype(F32) + ff.astype(F32) * c_gate).astype(dt)
        return sharding.constrain(x, ACT)


ACT = ("batch", "length", None)  # the residual stream (B, N, D): batch- and sequence-sharded


def at_tokens(x, level):
    """Per-level values x (B, M, ...) -> per token (B, N, ...) by each token's level index
    `level` (B, N); level None: x as it is (one value per example, or already per token)."""
    if level is None:
        return x
    idx = level.reshape(level.shape + (1,) * (x.ndim - 2))
    return sharding.constrain(jnp.take_along_axis(x, idx, axis=1), ("batch", "length") + (None,) * (x.ndim - 2))


def remat_policy(name):
    """REMAT_POLICIES name (or bool) -> (remat?, jax.checkpoint policy)."""
    name = {True: "full", False: "none", None: "none"}.get(name, name)
    if name not in REMAT_POLICIES:
        raise UserError(f"dit.overrides.remat: unknown policy {name!r}; known: {sorted(REMAT_POLICIES)}")
    return name != "none", REMAT_POLICIES[name]()


REMAT_POLICIES = {
    "none": lambda: None,
    "full": lambda: None,  # save nothing but the block inputs
    "dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def run_blocks(blocks, hid, ctx, mod, cos, sin, cfg: DiTConfig, text_kv=None, segments=None):
    """Applies the blocks in order, as pure functions of each block's state so that remat and
    scan act on plain pytrees. scan_layers stacks the blocks' states at call time (one copy of
    the parameters, sharded like them) and scans one compiled block over them. `text_kv`: the
    blocks' cross-attention (k, v), stacked over layers (WanDiT.text_kv), instead of ctx.
    `segments`: packed clips' (token ids, text ids) (WanBlock)."""
    graphdef, first = nnx.split(blocks[0])

    def apply(state, h, kv=None):
        return nnx.merge(graphdef, state)(h, ctx, mod, cos, sin, kv, segments)

    use_remat, policy = remat_policy(cfg.remat)
    if use_remat:
        apply = jax.checkpoint(apply, policy=policy)
    states = [first] + [nnx.split(b)[1] for b in blocks[1:]]
    if cfg.scan_layers and len(states) > 1:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        hid, _ = jax.lax.scan(lambda h, xs: (apply(xs[0], h, xs[1]), None), hid, (stacked, text_kv))
        return hid
    for i, st in enumerate(states):
        hid = apply(st, hid, None if text_kv is None else jax.tree.map(lambda a: a[i], text_kv))
    return hid  # (B, N, D)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class WanDiT(nnx.Module):
    """velocity = WanDiT(cfg, rngs=...)(x (B,F,H,W,Cin), t (B,)|(B,N), context (B,L,text_dim))."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, p = cfg.dim, math.prod(cfg.patch_size)
        if cfg.attention_head_dim % 2 or min(cfg.rope_split) <= 0:
            raise ValueError(f"attention_head_dim {cfg.attention_head_dim} cannot be split for 3D RoPE")
        # Conv3d with kernel = stride = patch, as a dense over the flattened (pt, ph, pw, C) patch.
        self.patch_embedding = dense(p * cfg.in_channels, d, ("conv_in", "embed"), cfg, rngs)
        # Time MLP kept in f32 like diffusers (time_embedder is in _keep_in_fp32_modules).
        self.time_embedder_1 = dense(cfg.freq_dim, d, (None, "mlp"), cfg, rngs, dtype=F32)
        self.time_embedder_2 = dense(d, d, ("mlp", "embed"), cfg, rngs, dtype=F32)
        self.time_proj = dense(d, 6 * d, ("embed", "mlp"), cfg, rngs)  # -> 6 modulation slots
        self.text_embedder_1 = dense(cfg.text_dim, d, ("embed", "mlp"), cfg, rngs)
        self.text_embedder_2 = dense(d, d, ("mlp", "embed"), cfg, rngs)
        self.blocks = nnx.List([WanBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.proj_out = dense(d, p * cfg.out_channels, ("embed", "conv_out"), cfg, rngs)
        init = jax.random.normal(rngs.params(), (1, 2, d), F32) / math.sqrt(d)
        self.scale_shift_table = nnx.Param(init.astype(jnp.dtype(cfg.param_dtype)),
                                           out_sharding=(None, "modulation", "embed"))
        if cfg.start_embedding:
            self.start_embedding = nnx.Param(jnp.zeros((d,), jnp.dtype(cfg.param_dtype)), out_sharding=("embed",))
        if cfg.text_pool:  # f32 like the time MLP it adds to
            self.text_pool_proj = dense(cfg.text_dim, d, (None, "embed"), cfg, rngs, dtype=F32)
        if cfg.zero_init:
            for prm in (self.time_proj.kernel, self.time_proj.bias, self.proj_out.kernel, self.proj_out.bias):
                prm.value = jnp.zeros_like(prm.value)

    def text_kv(self, context):
        """Every block's cross-attention keys and values of `context` (B, L, text_dim), stacked
        over layers: (k, v), each (layers, B, L, H, hd). They do not depend on the noisy input or
        the timestep, so a sampler computes them once per sample, not once per step."""
        dt = jnp.dtype(self.cfg.dtype)
        ctx = self.text_embedder_1(context.astype(dt))
        ctx = self.text_embedder_2(jax.nn.gelu(ctx, approximate=True))  # (B, L, D)
        kvs = [b.attn2.project_kv(ctx) for b in self.blocks]
        kv = tuple(jnp.stack(a) for a in zip(*kvs))  # cfg.text_pool: + the pooled caption
        return kv + (pooled_text(context),) if self.cfg.text_pool else kv

    def pooled(self, context, text_kv=None):
        """cfg.text_pool's pooled caption (B, text_dim) from the context or text_kv, else None."""
        if not self.cfg.text_pool:
            return None
        return pooled_text(context) if text_kv is None else text_kv[2]

    def __call__(self, x, t, context, positions=None, text_kv=None, start=None):
        """x (B, F, H, W, Cin); t (B,) or (B, N) in [0, 1000]; context (B, L, text_dim), or None
        with `text_kv` = self.text_kv(context) computed beforehand; positions: optional
        (B, N, 3) int (t, h, w) per token, default the regular grid; start: optional (B,) bool,
        the window begins at its clip's first latent frame (cfg.start_embedding; default True).
        Returns the velocity (B, F, H, W, Cout) in `cfg.dtype`."""
        hid, e = self.embed(x, t, positions, start, self.pooled(context, text_kv))
        return self.head(self.run(hid, e, context, text_kv), e)

    def embed(self, x, t, positions=None, start=None, pooled=None):
        """The input side: patch tokens (B, N, D) and what the blocks and the head need (the
        timestep modulation, RoPE tables, the shape) -- so that a step cache can skip the blocks
        (sampler.py) and still run the head."""
        cfg = self.cfg
        B, F, H, W, C = x.shape
        pt, ph, pw = cfg.patch_size
        if F % pt or H % ph or W % pw:
            raise ValueError(f"latent (F, H, W)=({F}, {H}, {W}) not divisible by patch {cfg.patch_size}")
        f, h, w = F // pt, H // ph, W // pw
        n = f * h * w
        start_tokens = None
        if cfg.start_embedding:
            first = (jnp.arange(n) < h * w)[None, :]  # the tokens of latent frame 0
            on = jnp.ones((B,), bool) if start is None else jnp.asarray(start, bool)
            start_tokens = first & on[:, None]
        if positions is None:
            positions = grid_positions(f, h, w)[None]  # (1, N, 3): broadcasts over the batch
        elif positions.shape[-2:] != (n, 3):
            raise ValueError(f"positions {positions.shape} must be (B, {n}, 3)")
        hid, e = self.embed_tokens(patchify(x, cfg.patch_size), t, positions, start_tokens, pooled=pooled)
        return hid, dict(e, shape=(f, h, w))

    def embed_tokens(self, tok, t, positions, start_tokens=None, segment_ids=None, text_segment_ids=None,
                     pooled=None):
        """embed() on patch vectors (B, N, pt*ph*pw*Cin) at `positions` (B|1, N, 3), with t (B,)
        or (B, N); `start_tokens` (B, N) bool marks the tokens that get the start embedding;
        `segment_ids` (B, N) / `text_segment_ids` (B, L): packed clips (forward_packed).
        t may also be a pair (levels (B, M), level (B, N) int): M distinct timesteps per row and
        each token's index into them -- packed clips have one timestep per clip (and 0 for
        conditioning frames), so the modulation is computed for M values, not N tokens, and
        gathered per token inside each block."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        t, level = t if isinstance(t, tuple) else (t, None)
        n, d = tok.shape[1], cfg.dim
        hid = self.patch_embedding(tok.astype(dt))  # (B, N, D)
        if cfg.start_embedding and start_tokens is not None:
            on = jnp.asarray(start_tokens, bool)[:, :, None]
            hid = hid + jnp.where(on, self.start_embedding[...].astype(dt), 0).astype(dt)
        hid = sharding.constrain(hid, ACT)
        cos, sin = rope_freqs(positions, cfg)  # (B|1, N, hd/2)

        # Timesteps: (B,) -> one modulation per example (S=1); (B, N) -> per token (S=N).
        t = jnp.asarray(t, F32)
        if t.ndim == 1:
            t = t[:, None]  # (B, 1)
        elif level is not None:
            if t.ndim != 2 or level.shape != (tok.shape[0], n):
                raise ValueError(f"timestep levels {t.shape} / level {level.shape} must be (B, M) / (B, {n})")
            level = sharding.constrain(jnp.asarray(level, jnp.int32), ("batch", "length"))
        elif t.ndim != 2 or t.shape[1] != n:
            raise ValueError(f"timesteps {t.shape} must be (B,) or (B, {n})")
        temb = timestep_embedding(t, cfg.freq_dim)  # (B, S, freq)
        temb = self.time_embedder_2(jax.nn.silu(self.time_embedder_1(temb)))  # (B, S, D) f32
        if cfg.text_pool:  # pooled: WanDiT.pooled, required
            temb = temb + self.text_pool_proj(pooled.astype(F32))[:, None, :]
        mod = self.time_proj(jax.nn.silu(temb.astype(dt)))  # (B, S, 6D)
        mod = mod.astype(F32).reshape(*mod.shape[:2], 6, d)  # (B, S, 6, D)
        segments = None
        if segment_ids is not None:
            seg = sharding.constrain(jnp.asarray(segment_ids, jnp.int32), ("batch", "length"))
            segments = (seg, None if text_segment_ids is None else jnp.asarray(text_segment_ids, jnp.int32))
        return hid, dict(mod=mod, temb=temb, level=level, cos=cos, sin=sin, shape=None, segments=segments)

    def forward_packed(self, tok, t, positions, segment_ids, context, text_segment_ids,
                       start_tokens=None, text_kv=None):
        """The velocity of packed clips (sorajax/packing.py): patch vectors tok (B, N, p*Cin) of
        several clips per row, their timesteps t (B, N), 3D positions (B, N, 3) counted from each
        clip's origin, segment_ids (B, N) (0: padding), the captions' context (B, L, text_dim)
        (or text_kv) with text_segment_ids (B, L) naming the clip each text token belongs to.
        Each clip's tokens attend only to its own tokens and caption, so a packed row gives the
        same velocity as its clips one by one. -> (B, N, p*Cout) patch vectors."""
        if self.cfg.text_pool:
            raise ValueError("DiTConfig.text_pool pools one caption per row: packed rows hold several clips")
        hid, e = self.embed_tokens(tok, t, positions, start_tokens, segment_ids, text_segment_ids)
        return self.head_tokens(self.run(hid, e, context, text_kv), e)

    def run(self, hid, e, context, text_kv=None):
        """The blocks on the tokens of embed() -> (B, N, D)."""
        if text_kv is None:
            dt = jnp.dtype(self.cfg.dtype)
            ctx = self.text_embedder_1(context.astype(dt))
            ctx = self.text_embedder_2(jax.nn.gelu(ctx, approximate=True))  # (B, L, D)
        else:
            ctx, text_kv = None, tuple(text_kv[:2])  # (k, v); a third entry is the pooled caption
        mod = e["mod"] if e.get("level") is None else (e["mod"], e["level"])
        return run_blocks(list(self.blocks), hid, ctx, mod, e["cos"], e["sin"], self.cfg, text_kv,
                          e["segments"])

    def probe(self, hid, e):
        """The first block's timestep-modulated normalized input (B, N, D) f32: how much it
        changes between denoising steps tells a step cache whether the blocks' output will
        (TeaCache's indicator)."""
        m = self.blocks[0].scale_shift_table[...].astype(F32)[None] + e["mod"]  # (B, S, 6, D)
        shift, scale = at_tokens(m[:, :, 0], e.get("level")), at_tokens(m[:, :, 1], e.get("level"))
        return layer_norm(hid, self.cfg.eps).astype(F32) * (1 + scale) + shift

    def head_tokens(self, hid, e):
        """The output side on tokens: final modulated norm and projection -> (B, N, p*Cout)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        m = self.scale_shift_table[...].astype(F32)[None] + e["temb"][:, :, None, :]  # (B, S, 2, D)
        shift, scale = at_tokens(m[:, :, 0], e.get("level")), at_tokens(m[:, :, 1], e.get("level"))
        hid = (layer_norm(hid, cfg.eps) * (1 + scale) + shift).astype(dt)
        return self.proj_out(hid)  # (B, N, pt*ph*pw*Cout)

    def head(self, hid, e):
        """The output side: head_tokens, unpatchified -> (B, F, H, W, Cout)."""
        return unpatchify(self.head_tokens(hid, e), e["shape"], self.cfg.patch_size)


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------
VARIANTS = {
    "wan2.1-1.3b": lambda **kw: DiTConfig(**{**dict(
        num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
        in_channels=16, out_channels=16, text_dim=4096), **kw}),
    "wan2.1-14b": lambda **kw: DiTConfig(**{**dict(
        num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
        in_channels=16, out_channels=16, text_dim=4096), **kw}),
    "toy": lambda **kw: DiTConfig(**{**dict(  # CPU training
        num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4,
        in_channels=8, out_channels=8, text_dim=128, freq_dim=256, start_embedding=True), **kw}),
    "tiny": lambda **kw: DiTConfig(**{**dict(  # = tests/fixtures/wan_dit_tiny
        num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=16), **kw}),
}
