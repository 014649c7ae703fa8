"""Building blocks shared by the model files (dit.py, text.py, vae.py), in Flax NNX.

Everything here is channels-last and normalises over the last axis. A `cfg` argument is any
model config with `dtype` (compute) and `param_dtype` fields (DiTConfig, TextConfig, VAEConfig).
Statistics of every norm are computed in f32 whatever the dtypes, as the PyTorch references do.

The three RMS-type norms differ in more than their parameter names, and each matches one
reference module exactly:
  TorchRMSNorm   torch.nn.RMSNorm (the DiT's QK norm):  x * rsqrt(mean(x^2) + eps) * scale
  T5LayerNorm    transformers' T5LayerNorm:             x * rsqrt(mean(x^2) + eps) * weight,
                                                        returned in the compute dtype
  L2ChannelNorm  diffusers' WanRMS_norm (the VAE):      x / max(|x|_2, eps) * sqrt(C) * gamma
Parameter attribute names (`scale`, `weight`, `gamma`, ...) are part of the checkpoint format and
of the weight loaders' name maps: do not rename them.
"""
from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import sharding

F32 = jnp.float32
Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------
def param(rngs: nnx.Rngs, init, shape, names, cfg) -> nnx.Param:
    """A parameter `init(key, shape, param_dtype)` annotated with logical axis `names`."""
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), out_sharding=names)


class Dense(nnx.Linear):
    """nnx.Linear (same `kernel`/`bias` parameters, same maths) whose kernel, cast to the compute
    dtype, passes through `sharding.weight`: under FSDP its gradient is reduced onto the
    parameter's shards (docs/SCALING.md)."""

    def __init__(self, din, dout, *, names, **kw):
        super().__init__(din, dout, **kw)
        self.names = tuple(names)

    def __call__(self, inputs: Array) -> Array:
        dt = jnp.dtype(self.dtype)
        kernel = sharding.weight(self.kernel[...], self.names, dt)  # (din, dout)
        y = jax.lax.dot_general(inputs.astype(dt), kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                                precision=self.precision)
        return y + self.bias[...].astype(dt)


def dense(din: int, dout: int, names, cfg, rngs: nnx.Rngs, *, dtype=None) -> Dense:
    """A `Dense` (din -> dout, with bias) computing in `dtype` (default cfg.dtype). Kernel
    (din, dout) lecun-normal with logical axes `names`, bias zeros with axis `names[1]`."""
    return Dense(
        din, dout, names=names, dtype=jnp.dtype(dtype or cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)),
        rngs=rngs)


def pooled_text(context):
    """Mean over a caption's non-padded tokens (encode_text zeroes the padded ones) of a context
    (B, L, D) -> (B, D) f32; an all-padding row pools to zeros."""
    c = context.astype(F32)
    keep = jnp.any(c != 0, axis=-1, keepdims=True).astype(F32)  # (B, L, 1)
    return jnp.sum(c * keep, axis=1) / jnp.maximum(jnp.sum(keep, axis=1), 1.0)


def count_params(model) -> int:
    """Number of parameters; works on abstract models from nnx.eval_shape (no allocation)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------
def layer_norm(x: Array, eps: float, scale=None, bias=None) -> Array:
    """LayerNorm over the last axis in f32 (diffusers FP32LayerNorm); returns f32."""
    x = x.astype(F32)
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    y = (x - mu) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(F32) + bias.astype(F32)
    return y


def rms_norm(x: Array, eps: float, scale: Array) -> Array:
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in f32; returns f32."""
    x32 = x.astype(F32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)  # (..., 1)
    return x32 * jax.lax.rsqrt(var + eps) * scale.astype(F32)


class AffineLayerNorm(nnx.Module):
    """LayerNorm with learned `scale` and `bias`, computed in f32; returns f32."""

    def __init__(self, dim: int, eps: float, cfg):
        self.eps = eps
        pd = jnp.dtype(cfg.param_dtype)
        self.scale = nnx.Param(jnp.ones((dim,), pd), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), pd), out_sharding=("norm",))

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.eps, self.scale[...], self.bias[...])


class TorchRMSNorm(nnx.Module):
    """torch.nn.RMSNorm(dim, eps, elementwise_affine=True): learned `scale`, f32 statistics,
    output in the input dtype. The DiT's QK norm over the fused heads * head_dim features."""

    def __init__(self, dim: int, eps: float, cfg):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.eps, self.scale[...]).astype(x.dtype)


class T5LayerNorm(nnx.Module):
    """transformers' T5LayerNorm: scale-only RMS norm (no mean subtraction, no bias), variance in
    f32, learned `weight`; output in the compute dtype cfg.dtype."""

    def __init__(self, dim: int, eps: float, cfg):
        self.eps = eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.weight = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.eps, self.weight[...]).astype(self.dtype)


class L2ChannelNorm(nnx.Module):
    """diffusers' WanRMS_norm (channel_first, no bias) in channels-last form: F.normalize over
    the channels (x / max(|x|_2, eps)) times sqrt(C) and a learned `gamma`; returns x.dtype.
    Equals an RMS norm except that eps bounds the L2 norm instead of being added to mean(x^2)."""

    def __init__(self, dim: int, cfg, eps: float = 1e-12):
        self.gamma = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)), out_sharding=("norm",))
        self.scale = math.sqrt(dim)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(F32)
        ss = jnp.sum(xf * xf, axis=-1, keepdims=True)  # (..., 1) squared L2 norm
        y = xf * jax.lax.rsqrt(jnp.maximum(ss, self.eps * self.eps))
        return (y * self.scale * self.gamma[...].astype(F32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Weight import
# ----------------------------------------------------------------------------------------------
def read_config(config_json) -> dict:
    """A reference config as a dict: the dict itself, a config.json path, or its folder."""
    if isinstance(config_json, dict):
        return config_json
    path = pathlib.Path(config_json)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


def assign(var: nnx.Variable, array) -> None:
    """Sets `var` from a host array in our layout, keeping the variable's dtype and sharding. The
    variable may be abstract (a model from nnx.eval_shape holds ShapeDtypeStructs): the value is
    then placed with the abstract value's sharding when it has one."""
    cur = var.get_value()  # a jax.Array, or a ShapeDtypeStruct for an abstract model
    value = jnp.asarray(np.asarray(array), dtype=cur.dtype)
    sharding = getattr(cur, "sharding", None)
    var.set_value(jax.device_put(value, sharding) if sharding is not None else value)
