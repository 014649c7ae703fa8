"""Causal 3D video VAE: the Wan 2.1 architecture (diffusers `AutoencoderKLWan`) in Flax NNX.

Layout is channels-last: pixels (B, T, H, W, 3) in [-1, 1], latents (B, t, h, w, z) with
T = 1 + r*(t-1), r = `temporal_stride`, h = H / `spatial_stride`. Frame 0 is coded alone (so an
image is a 1-frame video); every later latent frame codes r pixel frames.

Encode and decode run chunk by chunk exactly like diffusers: the first chunk (one pixel / one
latent frame) alone, then `jax.lax.scan` over equal chunks (r pixel frames / one latent frame)
carrying a *feature cache* — for every temporal convolution the last input frames it needs from
the previous chunk. The cache is a flat list of fixed-shape arrays, so long clips compile once and
never hold the whole clip's activations. Zero front padding of a causal conv is expressed as a
zero cache, which makes the first chunk's cache shapes equal to the later ones.

Under `sharding.activation_rules` every (B, T, H, W, C) activation, the feature cache included,
is constrained to ("batch", "time", "height", "width", channels unsharded): with the default rules
rows are split over the "context" mesh axis, so XLA partitions each 3x3 convolution spatially and
exchanges one-row halos between neighbours (collective-permute) instead of gathering frames. Only the
mid-block's per-frame attention gathers its keys/values (queries stay row-sharded). Where rows
do not divide, columns are split instead; a level where neither divides raises ValueError rather
than silently running unsharded. Outside activation_rules every constraint is a no-op.

The parameter tree mirrors diffusers' module names, so `load_diffusers` maps names one to one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import sharding
from sorajax.errors import WeightsMismatch
from sorajax.models.attention import describe_axes, unsplit_axes
from sorajax.models.layers import Array, L2ChannelNorm, assign


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    in_channels: int = 3
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # jax.checkpoint each chunk: training memory ~ one chunk's activations

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


def latent_shape(cfg: VAEConfig, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(t, h, w, z) of the latents of a (frames, height, width) clip; raises on invalid sizes."""
    r, s = cfg.temporal_stride, cfg.spatial_stride
    if frames < 1 or (frames - 1) % r:
        raise ValueError(f"frames must be 1 + {r}*k, got {frames}")
    if height % s or width % s:
        raise ValueError(f"height and width must be divisible by {s}, got {height}x{width}")
    return (1 + (frames - 1) // r, height // s, width // s, cfg.z_dim)


# ----------------------------------------------------------------------------------------------
# Activation sharding (logical names only; the active rules map them to mesh axes)
# ----------------------------------------------------------------------------------------------
_ROWS = ("batch", "time", "height", "width", None)  # (B, T, H, W, C): sequence-sharded over space
_FRAMES = ("batch", "time", None, None, None)  # whole frames on every device (attention keys)


def _shard(x: Array) -> Array:
    """Keeps a (B, T, H, W, C) activation sharded over batch and rows (no-op outside
    sharding.activation_rules). Applied at every conv / block boundary so the SPMD partitioner
    never picks a replicated layout for a convolution and exchanges halos instead.

    Rows that the context axis does not divide fall back to columns (the default rules map both
    to "context"; a mesh axis is used once per array). When neither divides, the sequence split
    would silently switch off for this level (replicated, computed on every device): ValueError."""
    wanted, dropped = unsplit_axes(_ROWS, x.shape, (2, 3))
    if dropped:
        what, c = describe_axes(wanted)
        raise ValueError(
            f"the sequence-sharded VAE cannot split a {x.shape[2]}x{x.shape[3]} (rows x columns) "
            f"activation over {what} devices: at every VAE resolution (height and width divided "
            f"by 1, 2, 4, ...) the rows or the columns must be a multiple of {c}; change "
            f"height/width or " + " or ".join(f"mesh.{a}" for a in wanted))
    return sharding.constrain(x, _ROWS)


# ----------------------------------------------------------------------------------------------
# Feature cache (functional version of diffusers' feat_cache / feat_idx)
# ----------------------------------------------------------------------------------------------
class _Cache:
    """Reads the previous chunk's entries in call order (`prev is None`: first chunk) and
    collects this chunk's entries in the same order."""

    def __init__(self, prev: Optional[list] = None):
        self.prev, self.new = prev, []

    @property
    def first(self) -> bool:
        return self.prev is None

    def take(self) -> Optional[Array]:
        """What the previous chunk stored at this call's slot (None for the first chunk)."""
        return None if self.prev is None else self.prev[len(self.new)]

    def put(self, value: Array) -> None:
        """Stores this call's slot for the next chunk (call after `take`)."""
        self.new.append(value)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
# LeCun-uniform conv init (variance 1/fan_in). torch's default (1/3 of that) trains far slower from
# scratch here: the RMS norms then see residual branches too small to carry the input through.
_INIT_SCALE = 1.0
_CONV_DN = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


class Conv(nnx.Module):
    """N-d convolution, channels-last, kernel (*k, Cin, Cout); the caller pads."""

    def __init__(self, cin, cout, kernel, *, stride=1, cfg: VAEConfig, rngs: nnx.Rngs):
        kernel = tuple(kernel)
        nd = len(kernel)
        self.stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
        self.dtype = cfg.dtype
        # torch's default Conv init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))).
        init = nnx.initializers.variance_scaling(_INIT_SCALE, "fan_in", "uniform")
        names = (None,) * nd + ("conv_in", "conv_out")
        self.kernel = nnx.Param(init(rngs.params(), (*kernel, cin, cout), cfg.param_dtype),
                                out_sharding=names)
        # torch's default bias init U(+-1/sqrt(fan_in)); zero biases would make the first RMS norm
        # erase brightness (W c and W 2c normalize to the same vector), which stalls training.
        bound = 1.0 / math.sqrt(cin * math.prod(kernel))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (cout,), cfg.param_dtype, -bound, bound),
                              out_sharding=("conv_out",))

    def __call__(self, x: Array, padding=None) -> Array:
        k = self.kernel[...].astype(self.dtype)
        nd = k.ndim - 2
        if padding is None:
            padding = [(0, 0)] * nd
        x = x.astype(self.dtype)
        if nd == 3:
            y = _conv3d_as_2d(x, k, self.stride, padding)
        else:
            y = jax.lax.conv_general_dilated(x, k, self.stride, padding, dimension_numbers=_CONV_DN[nd])
        return y + self.bias[...].astype(self.dtype)


# Below this many input channels a 3-D convolution's time taps are stacked into the channels of
# one 2-D convolution; at or above it, each tap is its own 2-D convolution and the outputs are
# summed. Measured on a 2-core CPU (docs/PERFORMANCE.md): the demo VAE (16-32 channels) takes
# 0.56 s instead of 0.77 s a train step stacked and compiles ~12% faster; at Wan 2.1's widths
# (96-384 channels) stacking made decoding 8-15% slower, so those keep the per-tap sum.
STACK_TAPS_BELOW = 64


def _conv3d_as_2d(x: Array, k: Array, stride, padding) -> Array:
    """A 3-D convolution as 2-D convolutions with frames folded into the batch: one convolution
    over the time taps stacked along the channels (few channels), or a sum over the taps of one
    convolution each. Same result (f32 rounding aside) as one conv3d; XLA:CPU runs it ~5x faster
    forward and backward, and GPUs/TPUs lose nothing (the 2-D convs fuse into the same matmuls)."""
    (pt0, pt1), sp = padding[0], list(padding[1:])
    if pt0 or pt1:
        x = jnp.pad(x, ((0, 0), (pt0, pt1), (0, 0), (0, 0), (0, 0)))
    B, T, H, W, C = x.shape  # (B, T, H, W, C)
    kt, kh, kw, _, cout = k.shape
    st = stride[0]
    t_out = (T - kt) // st + 1
    taps = [x[:, i:i + st * (t_out - 1) + 1:st] for i in range(kt)]  # kt x (B, t', H, W, C)
    if kt > 1 and C < STACK_TAPS_BELOW:
        xs = jnp.concatenate(taps, axis=-1).reshape(B * t_out, H, W, kt * C)  # tap-major channels
        ks = jnp.transpose(k, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * C, cout)  # (kh, kw, kt*C, Cout)
        y = jax.lax.conv_general_dilated(xs, ks, stride[1:], sp, dimension_numbers=_CONV_DN[2])
    else:
        y = None
        for i in range(kt):
            yi = jax.lax.conv_general_dilated(taps[i].reshape(B * t_out, H, W, C), k[i], stride[1:], sp,
                                              dimension_numbers=_CONV_DN[2])
            y = yi if y is None else y + yi
    return y.reshape(B, t_out, *y.shape[1:])  # (B, t', H', W', Cout)


class CausalConv3d(Conv):
    """Causal in time (zeros / the previous chunk's cached frames in front), symmetric in space."""

    def __call__(self, x: Array, cache: Optional[_Cache] = None) -> Array:  # (B, T, H, W, C)
        kt, kh, kw = self.kernel.shape[:3]
        x = _shard(x)
        if kt > 1:
            prev = cache.take() if cache is not None else None
            if prev is None:  # zero front padding == an all-zero cache
                prev = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype)
            x = _shard(jnp.concatenate([_shard(prev.astype(x.dtype)), x], axis=1))
            if cache is not None:
                cache.put(_shard(x[:, -(kt - 1):]))  # last kt-1 input frames for the next chunk
        return _shard(super().__call__(x, [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)]))


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
        self.norm1 = L2ChannelNorm(cin, cfg=cfg)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), cfg=cfg, rngs=rngs)
        self.norm2 = L2ChannelNorm(cout, cfg=cfg)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), cfg=cfg, rngs=rngs)
        self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1), cfg=cfg, rngs=rngs) if cin != cout else None

    def __call__(self, x: Array, cache: _Cache) -> Array:  # (B, T, H, W, Cin) -> (..., Cout)
        x = _shard(x)
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
        x = self.conv2(jax.nn.silu(self.norm2(x)), cache)  # dropout: Wan uses 0 (checked in WanVAE)
        return _shard(x + h)


class AttentionBlock(nnx.Module):
    """Single-head self-attention within each frame (2D), as diffusers' WanAttentionBlock."""

    def __init__(self, dim: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
        self.norm = L2ChannelNorm(dim, cfg=cfg)
        self.to_qkv = Conv(dim, 3 * dim, (1, 1), cfg=cfg, rngs=rngs)
        self.proj = Conv(dim, dim, (1, 1), cfg=cfg, rngs=rngs)

    def __call__(self, x: Array, cache: Optional[_Cache] = None) -> Array:  # (B, T, H, W, C)
        B, T, H, W, C = x.shape
        x = _shard(x)
        h = self.norm(x).reshape(B * T, H, W, C)
        qkv = self.to_qkv(h).reshape(B, T, H, W, 3 * C)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # (B, T, H, W, C)
        # Each frame attends over all its pixels: sequence-sharded, the queries keep their rows
        # and only keys/values are gathered to whole frames (logits stay (rows / n) x HW).
        q = _shard(q).reshape(B * T, H * W, C)  # (BT, HW, C)
        k = sharding.constrain(k, _FRAMES).reshape(B * T, H * W, C)
        v = sharding.constrain(v, _FRAMES).reshape(B * T, H * W, C)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(C)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        o = _shard(jnp.einsum("bqk,bkc->bqc", probs, v).reshape(B, T, H, W, C))
        return _shard(x + self.proj(o.reshape(B * T, H, W, C)).reshape(B, T, H, W, C))


class Resample(nnx.Module):
    """Spatial x2 down/up sampling per frame, plus a temporal x2 conv for the *3d modes."""

    def __init__(self, dim: int, mode: str, *, out_dim: Optional[int] = None, cfg: VAEConfig,
                 rngs: nnx.Rngs):
        self.mode = mode
        if mode.startswith("upsample"):
            # nn.Sequential(Upsample, Conv2d): keep index 1 so names match diffusers.
            self.resample = nnx.List([None, Conv(dim, out_dim or dim // 2, (3, 3), cfg=cfg, rngs=rngs)])
        else:
            self.resample = nnx.List([None, Conv(dim, dim, (3, 3), stride=2, cfg=cfg, rngs=rngs)])
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), cfg=cfg, rngs=rngs)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), cfg=cfg, rngs=rngs)
        else:
            self.time_conv = None

    def __call__(self, x: Array, cache: _Cache) -> Array:  # (B, T, H, W, C)
        x = _shard(x)
        if self.mode == "upsample3d":
            # diffusers' "Rep": the first chunk is not doubled in time; later chunks run a causal
            # conv over frames 1.. only (zero padded), so the first chunk leaves a zero cache.
            if cache.first:
                cache.take()
                cache.put(_shard(jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)))
            else:
                B, T, H, W, C = x.shape
                y = self.time_conv(x, cache).reshape(B, T, H, W, 2, C)  # channel = k*C + c
                x = _shard(y.transpose(0, 1, 4, 2, 3, 5).reshape(B, 2 * T, H, W, C))  # frame 2t + k
        B, T, H, W, C = x.shape
        x = x.reshape(B * T, H, W, C)
        conv = self.resample[1]
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest(-exact) x2
            x = conv(x, [(1, 1), (1, 1)])
        else:
            x = conv(x, [(0, 1), (0, 1)])  # ZeroPad2d((0, 1, 0, 1)) then stride-2 conv
        x = _shard(x.reshape(B, T, *x.shape[1:]))
        if self.mode == "downsample3d":
            # First chunk passes through; later ones: stride-2 valid conv over [last frame of the
            # previous chunk, this chunk].
            prev = cache.take()
            cache.put(_shard(x[:, -1:]))
            if prev is not None:
                x = _shard(jnp.concatenate([prev.astype(x.dtype), x], axis=1))
                x = Conv.__call__(self.time_conv, x)
        return _shard(x)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, cfg: VAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, cfg=cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, cfg=cfg, rngs=rngs)])

    def __call__(self, x: Array, cache: _Cache) -> Array:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, mode: Optional[str], *, cfg: VAEConfig, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, cfg=cfg, rngs=rngs)
                                 for i in range(cfg.num_res_blocks + 1)])
        self.upsamplers = nnx.List([Resample(cout, mode, cfg=cfg, rngs=rngs)]) if mode else None

    def __call__(self, x: Array, cache: _Cache) -> Array:
        for r in self.resnets:
            x = r(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


# ----------------------------------------------------------------------------------------------
# Encoder / decoder (one chunk at a time)
# ----------------------------------------------------------------------------------------------
class Encoder3d(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], (3, 3, 3), cfg=cfg, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, cfg=cfg, rngs=rngs))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, cfg=cfg, rngs=rngs))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], cfg=cfg, rngs=rngs)
        self.norm_out = L2ChannelNorm(dims[-1], cfg=cfg)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3), cfg=cfg, rngs=rngs)

    def __call__(self, x: Array, cache: _Cache) -> Array:  # (B, 1 or r, H, W, 3) -> (B, 1, h, w, 2z)
        x = self.conv_in(_shard(x), cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class Decoder3d(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        n = len(cfg.dim_mult)
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        t_up = tuple(cfg.temporal_downsample)[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3), cfg=cfg, rngs=rngs)
        self.mid_block = MidBlock(dims[0], cfg=cfg, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            cin = cin // 2 if i > 0 else cin  # the previous upsampler halves the channels
            mode = None if i == n - 1 else ("upsample3d" if t_up[i] else "upsample2d")
            blocks.append(UpBlock(cin, cout, mode, cfg=cfg, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = L2ChannelNorm(dims[-1], cfg=cfg)
        self.conv_out = CausalConv3d(dims[-1], 3, (3, 3, 3), cfg=cfg, rngs=rngs)

    def __call__(self, z: Array, cache: _Cache) -> Array:  # (B, 1, h, w, z) -> (B, 1 or r, H, W, 3)
        x = self.conv_in(_shard(z), cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


_UNROLL_CHUNKS = 4  # chunks after the first up to which encode/decode unroll instead of scan


def _chunked(module: nnx.Module, first: Array, rest: Array, remat: bool) -> Array:
    """Runs `module(chunk, cache)` on `first`, then scans it over `rest` (N, B, t, ...) carrying
    the feature cache; returns all outputs concatenated along time."""
    cache = _Cache()
    y0 = _shard(module(_shard(first), cache))  # (B, t0, ...)
    if rest.shape[0] == 0:
        return y0
    rest = sharding.constrain(rest, (None, *_ROWS))  # (N, B, t, H, W, C): chunks keep their rows
    if rest.shape[0] <= _UNROLL_CHUNKS:
        # Few chunks (training clips): a Python loop. XLA:CPU differentiates a scan over conv
        # chunks ~30x slower than the same chunks unrolled; long clips still scan (compile once).
        ys, prev = [y0], cache.new
        for i in range(rest.shape[0]):
            c = _Cache(prev)
            ys.append(_shard(module(rest[i], c).astype(y0.dtype)))
            prev = c.new
        return _shard(jnp.concatenate(ys, axis=1))
    graphdef, state = nnx.split(module)

    def body(carry, chunk):
        c = _Cache(carry)  # cache entries are row-sharded like the activations (CausalConv3d)
        y = _shard(nnx.merge(graphdef, state)(_shard(chunk), c))
        return c.new, y

    if remat:
        body = jax.checkpoint(body)
    _, ys = jax.lax.scan(body, cache.new, rest)  # (N, B, t1, ...)
    ys = jnp.swapaxes(sharding.constrain(ys, (None, *_ROWS)), 0, 1)
    ys = _shard(ys.reshape(ys.shape[0], -1, *ys.shape[3:]))  # (B, N*t1, ...)
    return _shard(jnp.concatenate([y0, ys.astype(y0.dtype)], axis=1))


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------
class WanVAE(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        if cfg.attn_scales:
            raise ValueError("attn_scales is not supported (diffusers' Wan VAE cannot run it either)")
        if cfg.dropout:
            raise ValueError("dropout > 0 is not supported by WanVAE")
        if len(cfg.temporal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError("temporal_downsample needs len(dim_mult) - 1 entries")
        self.cfg = cfg
        self.encoder = Encoder3d(cfg, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), cfg=cfg, rngs=rngs)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), cfg=cfg, rngs=rngs)
        self.decoder = Decoder3d(cfg, rngs=rngs)

    temporal_stride = property(lambda self: self.cfg.temporal_stride)
    spatial_stride = property(lambda self: self.cfg.spatial_stride)
    z_dim = property(lambda self: self.cfg.z_dim)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """(B, T, H, W, C) pixels in [-1, 1] -> posterior (mean, logvar), each (B, t, h, w, z)."""
        B, T, H, W, C = x.shape
        latent_shape(self.cfg, T, H, W)
        r = self.temporal_stride
        x = _shard(x.astype(self.cfg.dtype))
        rest = jnp.swapaxes(x[:, 1:].reshape(B, (T - 1) // r, r, H, W, C), 0, 1)  # (N, B, r, H, W, C)
        h = self.quant_conv(_chunked(self.encoder, x[:, :1], rest, self.cfg.remat))  # (B, t, h, w, 2z)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return _shard(mean), _shard(jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z: Array, clip: bool = True) -> Array:
        """(B, t, h, w, z) latents -> (B, 1 + r*(t-1), H, W, 3) pixels clipped to [-1, 1].

        Training passes clip=False: a clipped output has zero gradient wherever it saturates,
        which can leave a young decoder stuck outputting -1 everywhere."""
        z = self.post_quant_conv(_shard(z.astype(self.cfg.dtype)))  # (B, t, h, w, z)
        rest = jnp.swapaxes(z[:, 1:, None], 0, 1)  # (t-1, B, 1, h, w, z)
        x = _chunked(self.decoder, z[:, :1], rest, self.cfg.remat)
        return _shard(jnp.clip(x, -1.0, 1.0) if clip else x)

    @staticmethod
    def sample_latent(mean: Array, logvar: Array, key: Array) -> Array:
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

    def _stats(self, dtype):
        c = self.cfg
        if c.latents_mean is None or c.latents_std is None:
            return None
        return jnp.asarray(c.latents_mean, dtype), jnp.asarray(c.latents_std, dtype)

    def normalize(self, z: Array) -> Array:
        """VAE latents -> diffusion latents, as WanPipeline: (z - mean) * (1 / std)."""
        s = self._stats(z.dtype)
        return z if s is None else (z - s[0]) * (1.0 / s[1])

    def denormalize(self, z: Array) -> Array:
        """Diffusion latents -> VAE latents, as WanPipeline: z / (1 / std) + mean."""
        s = self._stats(z.dtype)
        return z if s is None else z / (1.0 / s[1]) + s[0]


# ----------------------------------------------------------------------------------------------
# diffusers interop
# ----------------------------------------------------------------------------------------------
def config_from_diffusers(config_json: dict, **overrides) -> VAEConfig:
    c = config_json
    if c.get("is_residual") or c.get("patch_size") or c.get("decoder_base_dim") not in (None, c.get("base_dim", 96)):
        raise ValueError("only the Wan 2.1 VAE (is_residual=False, no patch_size/decoder_base_dim) is supported")
    if c.get("out_channels", 3) != 3:
        raise ValueError("out_channels must be 3")
    opt = lambda v: None if v is None else tuple(float(a) for a in v)  # noqa: E731
    return VAEConfig(
        base_dim=c.get("base_dim", 96), z_dim=c.get("z_dim", 16),
        dim_mult=tuple(c.get("dim_mult", (1, 2, 4, 4))), num_res_blocks=c.get("num_res_blocks", 2),
        attn_scales=tuple(c.get("attn_scales", ())),
        temporal_downsample=tuple(bool(t) for t in c.get("temperal_downsample", (False, True, True))),
        dropout=c.get("dropout", 0.0),
        latents_mean=opt(c.get("latents_mean", VARIANTS["wan2.1"]().latents_mean)),
        latents_std=opt(c.get("latents_std", VARIANTS["wan2.1"]().latents_std)),
        in_channels=c.get("in_channels", 3), **overrides)


def _torch_names(model: WanVAE) -> dict[str, tuple[nnx.Param, Callable]]:
    """diffusers state-dict name -> (our Param, torch array -> our layout)."""
    out = {}
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        name = ".".join(str(p) for p in path)
        leaf = path[-1]
        if leaf == "kernel":
            # torch (Cout, Cin, *k) -> (*k, Cin, Cout)
            out[name[: -len("kernel")] + "weight"] = (var, lambda a: np.transpose(a, (*range(2, a.ndim), 1, 0)))
        elif leaf == "gamma":
            out[name] = (var, lambda a: a.reshape(-1))  # torch (C, 1, 1[, 1])
        else:
            out[name] = (var, lambda a: a)
    return out


def load_diffusers(model: WanVAE, reader) -> None:
    """Sets every parameter from a diffusers AutoencoderKLWan state dict (lazy mapping-like)."""
    table = _torch_names(model)
    keys = set(reader.keys())
    missing = sorted(set(table) - keys)
    unexpected = sorted(keys - set(table))
    bad, values = [], {}
    for name in sorted(set(table) & keys):
        var, conv = table[name]
        a = conv(np.asarray(reader[name]))
        if a.shape != var.shape:
            bad.append(f"{name}: checkpoint {a.shape} (converted) vs model {var.shape}")
            continue
        values[name] = a
    if missing or unexpected or bad:
        raise WeightsMismatch("Wan VAE weights", missing, unexpected, bad)
    for name, a in values.items():
        assign(table[name][0], a)  # keeps a sharded model sharded


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------
_WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

VARIANTS: dict[str, Callable[..., VAEConfig]] = {
    # Wan 2.1: 4x8x8 compression, 16 latent channels (~127M parameters).
    "wan2.1": lambda **kw: VAEConfig(latents_mean=_WAN21_MEAN, latents_std=_WAN21_STD, **kw),
    # CPU toy: 4x4x4 compression, 8 latent channels.
    "toy": lambda **kw: VAEConfig(base_dim=8, z_dim=8, dim_mult=(1, 2, 2), num_res_blocks=1,
                                  temporal_downsample=(True, True), **kw),
    # tests/fixtures/wan_vae_tiny (scripts/make_vae_fixtures.py): 4x8x8, 4 latent channels.
    "tiny": lambda **kw: VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                                   temporal_downsample=(False, True, True), **kw),
}
