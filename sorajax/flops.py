"""Analytic model FLOPs of sorajax's networks: the one home of these formulas.

Pure Python on the model configs (DiTConfig, TextConfig, VAEConfig or anything with the same
fields); nothing here imports JAX. Conventions:

* A matmul of (m, k) by (k, n) is 2·m·k·n FLOPs (one multiply and one add per term); a
  convolution is 2·k_t·k_h·k_w·Cin·Cout per output position, counting every kernel tap, those
  over zero padding (spatial halos, a causal conv's zero front cache) included: that is what the
  hardware computes.
* Matmuls and attention cores only: norms, activations, softmax, RoPE, modulation and the
  optimizer are elementwise and left out (XLA's own count includes them; tests/test_flops.py
  checks these formulas against it within 10% at sizes where matmuls dominate).
* Counts are per sample (one video / one prompt) unless a function takes a batch.
* Training is model FLOPs as MFU defines them: 3 × forward (the backward pass is twice the
  forward), rematerialisation's recompute NOT included, whatever the remat policy.

Notation: N video tokens, L text tokens, d = DiT hidden, f = DiT MLP hidden, P = prod(patch).
"""
from __future__ import annotations

import math


# ----------------------------------------------------------------------------------------------
# DiT (sorajax/models/dit.py, WanDiT)
# ----------------------------------------------------------------------------------------------
def dit_tokens(dit_cfg, latent_shape) -> int:
    """Tokens per sample for a latent of shape (F, H, W) or (B, F, H, W, C): (F/pt)(H/ph)(W/pw),
    as models.dit.num_tokens (batch and channels ignored)."""
    shape = tuple(latent_shape)
    f, h, w = shape[1:4] if len(shape) == 5 else shape
    pt, ph, pw = dit_cfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def dit_forward_breakdown(dit_cfg, tokens: int, text_len: int, *,
                          per_token_timesteps: bool = False) -> dict[str, float]:
    """Forward FLOPs of WanDiT for one sample, by part (sum: dit_forward_flops).

    With N = tokens, L = text_len, d = dim, f = ffn_dim, P = prod(patch_size), S = 1 timestep
    embedding per sample (N with per-token timesteps, the Wan 2.2 TI2V path):
      patch_embedding    2·N·(P·Cin)·d              (Conv3d kernel = stride = patch, as a dense)
      timestep           2·S·(freq·d + d·d + d·6d)  (time_embedder_1/2, time_proj)
      text_embedding     2·L·(text_dim·d + d·d)     (text_embedder_1/2)
      per block (× num_layers):
        self_attn_proj   8·N·d²                     (q, k, v, out)
        self_attention   4·N²·d                     (QKᵀ and AV, bidirectional: not halved)
        cross_attn_proj  4·N·d² + 4·L·d²            (q, out on the video; k, v on the embedded
                                                     text of width d, recomputed in every block)
        cross_attention  4·N·L·d                    (QKᵀ and AV over the L text keys)
        mlp              4·N·f·d                    (GELU MLP: in and out)
      proj_out           2·N·d·(P·Cout)
    adaLN modulation is elementwise (per sample or per token): not counted.
    """
    n, m, d, f = int(tokens), int(text_len), dit_cfg.dim, dit_cfg.ffn_dim
    p = math.prod(dit_cfg.patch_size)
    s = n if per_token_timesteps else 1
    layers = dit_cfg.num_layers
    return {
        "patch_embedding": 2.0 * n * p * dit_cfg.in_channels * d,
        "timestep": 2.0 * s * (dit_cfg.freq_dim * d + d * d + d * 6 * d),
        "text_embedding": 2.0 * m * (dit_cfg.text_dim * d + d * d),
        "self_attn_proj": layers * 8.0 * n * d * d,
        "self_attention": layers * 4.0 * n * n * d,
        "cross_attn_proj": layers * (4.0 * n * d * d + 4.0 * m * d * d),
        "cross_attention": layers * 4.0 * n * m * d,
        "mlp": layers * 4.0 * n * f * d,
        "proj_out": 2.0 * n * d * p * dit_cfg.out_channels,
    }


def dit_forward_flops(dit_cfg, tokens: int, text_len: int, *, per_token_timesteps: bool = False) -> float:
    """Forward FLOPs of the DiT for one sample of `tokens` video tokens and `text_len` text
    tokens: the sum of dit_forward_breakdown (whose docstring has the formula). Per block that
    is REFERENCE.md's 8Nd² + 4N²d + 4Nd² + 4Ld² + 4NLd + 4Nfd; the embeddings and the output
    projection are added once."""
    return float(sum(dit_forward_breakdown(dit_cfg, tokens, text_len,
                                           per_token_timesteps=per_token_timesteps).values()))


# ----------------------------------------------------------------------------------------------
# Text encoder (sorajax/models/text.py, UMT5Encoder)
# ----------------------------------------------------------------------------------------------
def text_forward_flops(text_cfg, text_len: int) -> float:
    """Encoder forward FLOPs for one prompt of L = text_len tokens (padding included: the
    encoder runs on all L positions). With d = d_model, i = num_heads·d_kv, F = d_ff, per layer:
      projections  2·L·4·d·i       (q, k, v, o)
      attention    4·L²·i          (QKᵀ and AV)
      FFN          2·L·3·d·F gated (wi_0, wi_1, wo), 2·L·2·d·F otherwise (wi, wo)
    The token embedding is a gather and the relative position bias a table lookup: no FLOPs."""
    length = int(text_len)
    d, inner, ff = text_cfg.d_model, text_cfg.num_heads * text_cfg.d_kv, text_cfg.d_ff
    ffn_mats = 3 if str(text_cfg.feed_forward_proj).startswith("gated-") else 2
    per_layer = 2.0 * length * (4 * d * inner + ffn_mats * d * ff) + 4.0 * length * length * inner
    return float(text_cfg.num_layers * per_layer)


# ----------------------------------------------------------------------------------------------
# Causal video VAE (sorajax/models/vae.py, WanVAE)
# ----------------------------------------------------------------------------------------------
def _conv(positions: int, taps: int, cin: int, cout: int) -> float:
    """2·taps·Cin·Cout per output position."""
    return 2.0 * positions * taps * cin * cout


def _resblock(positions: int, cin: int, cout: int) -> float:
    """ResidualBlock: two 3×3×3 causal convs, plus a 1×1×1 shortcut when Cin != Cout."""
    fl = _conv(positions, 27, cin, cout) + _conv(positions, 27, cout, cout)
    return fl + (_conv(positions, 1, cin, cout) if cin != cout else 0.0)


def _frame_attention(t: int, h: int, w: int, c: int) -> float:
    """AttentionBlock, single head within each of t frames of n = h·w pixels:
    1×1 qkv (2·n·c·3c) and proj (2·n·c·c) convs = 8·n·c², plus QKᵀ and AV 4·n²·c."""
    n = h * w
    return t * (8.0 * n * c * c + 4.0 * n * n * c)


def _mid_block(t: int, h: int, w: int, c: int, attention: bool) -> float:
    fl = 2 * _resblock(t * h * w, c, c)
    return fl + (_frame_attention(t, h, w, c) if attention else 0.0)


def _encoder_chunk(cfg, t: int, h: int, w: int, first: bool, attention: bool):
    """Encoder3d on one chunk of t frames: (FLOPs, (t, h, w) of its output)."""
    dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
    fl = _conv(t * h * w, 27, cfg.in_channels, dims[0])  # conv_in
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            fl += _resblock(t * h * w, cin, cout)
            cin = cout
        if i != len(cfg.dim_mult) - 1:
            # ZeroPad2d((0, 1, 0, 1)) then a stride-2 3×3 conv per frame.
            h, w = (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1
            fl += _conv(t * h * w, 9, cout, cout)
            if cfg.temporal_downsample[i] and not first:
                # [last frame of the previous chunk, this chunk] -> stride-2 valid (3, 1, 1) conv.
                t = (t + 1 - 3) // 2 + 1
                fl += _conv(t * h * w, 3, cout, cout)
    fl += _mid_block(t, h, w, dims[-1], attention)
    fl += _conv(t * h * w, 27, dims[-1], 2 * cfg.z_dim)  # conv_out
    return fl, (t, h, w)


def _decoder_chunk(cfg, t: int, h: int, w: int, first: bool, attention: bool):
    """Decoder3d on one chunk of t latent frames: (FLOPs, (t, h, w) of its output)."""
    n = len(cfg.dim_mult)
    dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    t_up = tuple(cfg.temporal_downsample)[::-1]
    fl = _conv(t * h * w, 27, cfg.z_dim, dims[0])  # conv_in
    fl += _mid_block(t, h, w, dims[0], attention)
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if i > 0 else cin  # the previous upsampler halved the channels
        for j in range(cfg.num_res_blocks + 1):
            fl += _resblock(t * h * w, cin if j == 0 else cout, cout)
        if i == n - 1:
            continue
        if t_up[i] and not first:  # upsample3d: (3, 1, 1) causal conv C -> 2C, frames doubled
            fl += _conv(t * h * w, 3, cout, 2 * cout)
            t *= 2
        h, w = 2 * h, 2 * w  # nearest x2, then a 3×3 conv C -> C/2
        fl += _conv(t * h * w, 9, cout, cout // 2)
    fl += _conv(t * h * w, 27, dims[-1], 3)  # conv_out
    return fl, (t, h, w)


def _latent_thw(vae_cfg, frames: int, height: int, width: int):
    r, s = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    if frames < 1 or (frames - 1) % r or height % s or width % s:
        raise ValueError(f"({frames}, {height}, {width}) is not a valid clip for stride ({r}, {s}, {s})")
    return 1 + (frames - 1) // r, height // s, width // s


def vae_encode_flops(vae_cfg, frames: int, height: int, width: int, *, attention: bool = True) -> float:
    """WanVAE.encode FLOPs for one (frames, height, width) clip, following its chunking: the
    first frame alone, then (frames-1)/r chunks of r frames, each through Encoder3d
      conv_in 3×3×3 -> per level: num_res_blocks ResidualBlocks (two 3×3×3 convs + a 1×1×1
      shortcut when the width changes), then (not the last level) a stride-2 3×3 conv per frame
      and, for temporal levels after the first chunk, a stride-2 (3, 1, 1) conv -> mid block
      (ResidualBlock, per-frame attention, ResidualBlock) -> conv_out 3×3×3 to 2z
    then quant_conv (1×1×1, 2z -> 2z) on the latents. Each conv: 2·k_t·k_h·k_w·Cin·Cout per
    output position. The mid-block attention (8·n·C² + 4·n²·C per frame of n latent-resolution
    pixels) is included unless attention=False; it is a few percent at most (n is small at the
    latent resolution) — check with vae_encode_flops(..., attention=False).

    XLA's own count is a few percent lower (toy VAE, 9 frames: 4-5%): its cost model skips the
    taps over spatial zero padding, and it merges identical convolutions of an all-zero causal
    cache (the first chunks' zero front padding). A clip of more than 1 + 4·r frames scans its
    chunks, and XLA counts a loop body once."""
    t_lat, h_lat, w_lat = _latent_thw(vae_cfg, frames, height, width)
    fl, _ = _encoder_chunk(vae_cfg, 1, height, width, True, attention)
    rest, _ = _encoder_chunk(vae_cfg, vae_cfg.temporal_stride, height, width, False, attention)
    fl += (t_lat - 1) * rest
    fl += _conv(t_lat * h_lat * w_lat, 1, 2 * vae_cfg.z_dim, 2 * vae_cfg.z_dim)  # quant_conv
    return float(fl)


def vae_decode_flops(vae_cfg, frames: int, height: int, width: int, *, attention: bool = True) -> float:
    """WanVAE.decode FLOPs producing one (frames, height, width) clip (its latents:
    1 + (frames-1)/r frames at height/s × width/s): post_quant_conv (1×1×1, z -> z), then one
    latent frame per chunk through Decoder3d
      conv_in 3×3×3 -> mid block (ResidualBlock, per-frame attention, ResidualBlock) -> per
      level: num_res_blocks + 1 ResidualBlocks, then (not the last level) for temporal levels
      after the first chunk a (3, 1, 1) conv C -> 2C that doubles the frames, and a nearest ×2
      upsample with a 3×3 conv C -> C/2 -> conv_out 3×3×3 to RGB.
    Conv and attention costs as in vae_encode_flops (attention=False: convs only)."""
    t_lat, h_lat, w_lat = _latent_thw(vae_cfg, frames, height, width)
    fl = _conv(t_lat * h_lat * w_lat, 1, vae_cfg.z_dim, vae_cfg.z_dim)  # post_quant_conv
    first, _ = _decoder_chunk(vae_cfg, 1, h_lat, w_lat, True, attention)
    rest, _ = _decoder_chunk(vae_cfg, 1, h_lat, w_lat, False, attention)
    return float(fl + first + (t_lat - 1) * rest)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
def dit_train_step_flops(dit_cfg, text_cfg, batch: int, latent_shape, text_len: int,
                         text_trainable: bool) -> float:
    """Model FLOPs of one DiT-stage train step (sorajax.stages.DiTStage on precomputed latents)
    for a global batch of `batch` samples with latents of `latent_shape` ((F, H, W) or
    (B, F, H, W, C); tokens by dit_tokens) and `text_len` prompt tokens:

      batch · (3 · dit_forward + (3 if text_trainable else 1) · text_forward)

    3× = forward + backward (twice the forward). A frozen text encoder only runs forward.
    Rematerialisation's recompute is NOT included (model FLOPs, as MFU is defined: XLA's own
    count of a remat step is higher), nor is the optimizer/EMA update (elementwise), nor the
    VAE (latents precomputed; add batch · vae_encode_flops when encoding on the fly). Gradient
    accumulation does not change the total."""
    tokens = dit_tokens(dit_cfg, latent_shape)
    text = text_forward_flops(text_cfg, text_len) if text_cfg is not None else 0.0
    per_sample = 3.0 * dit_forward_flops(dit_cfg, tokens, text_len) + (3.0 if text_trainable else 1.0) * text
    return float(batch * per_sample)


def sampler_step_flops(dit_cfg, batch: int, latent_shape, text_len: int, *, guidance: bool = True,
                       evals: int = 1) -> float:
    """FLOPs of one denoising step for `batch` videos: batch · evals · (2 if guidance else 1) ·
    dit_forward. Classifier-free guidance runs the conditional and unconditional branches as
    one 2B batch (sorajax.sampler, guidance != 1); evals = model evaluations per step (1 for
    Euler/UniPC, 2 for Heun). Prompts are encoded once per generation, not per step
    (text_forward_flops, ×2 with guidance); the VAE decode also runs once (vae_decode_flops)."""
    tokens = dit_tokens(dit_cfg, latent_shape)
    return float(batch * evals * (2 if guidance else 1) * dit_forward_flops(dit_cfg, tokens, text_len))


# ----------------------------------------------------------------------------------------------
# Peak FLOP/s per chip (for MFU)
# ----------------------------------------------------------------------------------------------
# Dense bf16 peak FLOP/s per chip (shared/REFERENCE.md "Hardware"), keyed by JAX's
# `device.device_kind`, matched case-insensitively, first match wins (so the more specific names
# come first). JAX names v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite". H100 PCIe / NVL and
# H200 NVL have lower clocks and power limits than the SXM parts the table lists: they are
# matched to None (unknown) rather than credited with the SXM peak.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float | None], ...] = (
    (("tpu v5 lite", "tpu v5e"), 197e12),
    (("tpu v5p", "tpu v5"), 459e12),
    (("tpu v6 lite", "tpu v6e", "tpu v6"), 918e12),
    (("tpu v4",), 275e12),
    (("h100 pcie", "h100 nvl", "h200 nvl"), None),
    (("h100",), 989e12),
    (("h200",), 989e12),
)


def peak_flops_for_kind(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip named `device_kind` (as JAX spells it), or None when
    the chip is not in PEAK_BF16_FLOPS."""
    kind = " ".join(str(device_kind).lower().split())
    for names, peak in PEAK_BF16_FLOPS:
        if any(kind.startswith(n) or f" {n}" in f" {kind}" for n in names):
            return peak
    return None


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of a JAX device (anything with `.platform` and `.device_kind`), for
    MFU = model FLOPs per second / peak. None on CPU (no fixed peak: measure the f32 matmul
    ceiling instead, scripts/benchmark.py) and for chips not in PEAK_BF16_FLOPS. A step that runs
    in f32 on a GPU or TPU is still divided by the bf16 peak: MFU is against the chip's best."""
    if getattr(device, "platform", "cpu") == "cpu":
        return None
    return peak_flops_for_kind(getattr(device, "device_kind", ""))

