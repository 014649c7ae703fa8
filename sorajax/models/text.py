"""T5 / UMT5 text encoder in Flax NNX (the encoder half only), matching transformers exactly.

Architecture (transformers' UMT5EncoderModel / T5EncoderModel):
  token embedding -> N x [RMS-norm -> self-attention (+ relative position bias) -> residual,
  RMS-norm -> (gated-)GELU FFN -> residual] -> final RMS-norm.
T5 quirks kept on purpose: the norm has no mean subtraction and no bias; attention logits are
*not* scaled by 1/sqrt(d_kv) (the scale is folded into the init of q); no biases anywhere.
UMT5 gives every layer its own relative-position bias table; T5 has one, in layer 0, shared by
all layers (``TextConfig.per_layer_position_bias``).

``encode_prompts`` then does what diffusers' WanPipeline does with the encoder output: keep the
first ``seq_len = mask.sum()`` embeddings of each prompt and zero the rest, so the DiT's
cross-attention sees zeros (not a mask) for padding.

Weights load from transformers' state-dict names (``load_transformers``); the parameter layout is
channels-last: kernels are (in, out), i.e. torch's ``weight.T``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import sharding
from sorajax.errors import WeightsMismatch
from sorajax.models.layers import Array, T5LayerNorm, assign, count_params, param, read_config


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "gated-gelu" | "gated-<act>" | "relu" | "gelu" | ...
    per_layer_position_bias: bool = True  # UMT5: every layer has a bias table; T5: layer 0 only
    dtype: Any = "float32"  # compute dtype (bf16 on accelerators)
    param_dtype: Any = "float32"

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # transformers maps "gated-gelu" to the tanh approximation ("gelu_new").
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh form, = transformers' NewGELU
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' "gelu" is exact erf
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


# Activation shardings: prompts split over the batch axes, never over "length" (T5 attention is
# not context-parallel); the weights are gathered for each matmul (sharding.weight), so under
# FSDP the encoder runs on each chip's own prompts instead of all-reducing every activation.
ACT = ("batch", None, None)  # (B, L, D)
QKV = ("embed", "heads")
FF_IN = ("embed", "mlp")


def _normal(std):
    return nnx.initializers.normal(stddev=std)


# ----------------------------------------------------------------------------------------------
# Layers (the norm, T5LayerNorm, and `param` live in sorajax/models/layers.py).
# ----------------------------------------------------------------------------------------------
def relative_position_buckets(rel: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucketing of ``rel = key_pos - query_pos`` (host-side, static shapes).

    Half the buckets for each sign; within a half, exact buckets for |rel| < num_buckets/4 and
    log-spaced ones up to max_distance. Done in float32 like transformers so the edges agree.
    """
    rel = np.asarray(rel, np.int64)
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    n = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        log_ratio = np.log(n.astype(np.float32) / np.float32(max_exact))
    log_ratio = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(n < max_exact, 0, log_ratio).astype(np.int64)  # trunc toward 0
    large = np.minimum(large, half - 1)
    return buckets + np.where(n < max_exact, n, large)


class Attention(nnx.Module):
    """T5 self-attention: no biases, no logit scaling, relative position bias added to logits."""

    def __init__(self, cfg: TextConfig, *, has_bias: bool, rngs: nnx.Rngs):
        d, h, dk = cfg.d_model, cfg.num_heads, cfg.d_kv
        self.cfg = cfg
        self.q = param(rngs, _normal((d * dk) ** -0.5), (d, h * dk), ("embed", "heads"), cfg)
        self.k = param(rngs, _normal(d**-0.5), (d, h * dk), ("embed", "heads"), cfg)
        self.v = param(rngs, _normal(d**-0.5), (d, h * dk), ("embed", "heads"), cfg)
        self.o = param(rngs, _normal((h * dk) ** -0.5), (h * dk, d), ("heads", "embed"), cfg)
        self.relative_attention_bias = (
            param(rngs, _normal(d**-0.5), (cfg.relative_attention_num_buckets, h), ("rel_buckets", None), cfg)
            if has_bias else None
        )

    def position_bias(self, length: int) -> Array:
        """(1, H, L, L) additive bias from this layer's bucket table."""
        cfg = self.cfg
        pos = np.arange(length)
        buckets = relative_position_buckets(
            pos[None, :] - pos[:, None], cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )  # (L, L) static
        table = self.relative_attention_bias[...].astype(jnp.float32)  # (NB, H)
        bias = jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0)  # (L, L, H)
        return jnp.transpose(bias, (2, 0, 1))[None]  # (1, H, L, L)

    def __call__(self, x: Array, bias: Array, key_mask: Array) -> Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, length, _ = x.shape
        split = lambda t: t.reshape(b, length, cfg.num_heads, cfg.d_kv)  # noqa: E731
        w = lambda p, names: sharding.weight(p[...], names, dt)  # noqa: E731
        q = split(x @ w(self.q, QKV))  # (B, L, H, Dk)
        k = split(x @ w(self.k, QKV))  # (B, L, H, Dk)
        v = split(x @ w(self.v, QKV))  # (B, L, H, Dk)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # (B, H, L, L)
        logits = logits + bias
        # Padding keys get a large negative logit (every prompt has >= 1 real token: </s>).
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)  # (B, H, L, L)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1)  # (B, L, H*Dk)
        return out @ w(self.o, ("heads", "embed"))  # (B, L, D)


class FeedForward(nnx.Module):
    """T5 FFN: wo(act(wi_0 x) * wi_1 x) when gated, wo(act(wi x)) otherwise."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.cfg = cfg
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported feed_forward_proj {cfg.feed_forward_proj!r}")
        if cfg.is_gated:
            self.wi_0 = param(rngs, _normal(d**-0.5), (d, f), ("embed", "mlp"), cfg)
            self.wi_1 = param(rngs, _normal(d**-0.5), (d, f), ("embed", "mlp"), cfg)
        else:
            self.wi = param(rngs, _normal(d**-0.5), (d, f), ("embed", "mlp"), cfg)
        self.wo = param(rngs, _normal(f**-0.5), (f, d), ("mlp", "embed"), cfg)

    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.cfg.dtype)
        act = _ACTIVATIONS[self.cfg.activation]
        w = lambda p, names: sharding.weight(p[...], names, dt)  # noqa: E731
        if self.cfg.is_gated:
            h = act(x @ w(self.wi_0, FF_IN)) * (x @ w(self.wi_1, FF_IN))  # (B, L, F)
        else:
            h = act(x @ w(self.wi, FF_IN))  # (B, L, F)
        h = sharding.constrain(h, ("batch", None, "mlp"))
        return h @ w(self.wo, ("mlp", "embed"))  # (B, L, D)


class Block(nnx.Module):
    def __init__(self, cfg: TextConfig, *, has_bias: bool, rngs: nnx.Rngs):
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, cfg)
        self.attn = Attention(cfg, has_bias=has_bias, rngs=rngs)
        self.ffn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, cfg)
        self.ffn = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: Array, bias: Array, key_mask: Array) -> Array:
        x = x + self.attn(self.attn_norm(x), bias, key_mask)  # (B, L, D)
        return x + self.ffn(self.ffn_norm(x))  # (B, L, D)


# ----------------------------------------------------------------------------------------------
# Encoder.
# ----------------------------------------------------------------------------------------------
class UMT5Encoder(nnx.Module):
    """(ids (B, L) int, mask (B, L) {0,1}) -> last hidden state (B, L, d_model)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, _normal(1.0), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        self.blocks = nnx.List(
            [Block(cfg, has_bias=cfg.per_layer_position_bias or i == 0, rngs=rngs) for i in range(cfg.num_layers)]
        )
        self.final_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, cfg)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        dt = jnp.dtype(self.cfg.dtype)
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        key_mask = attention_mask > 0  # (B, L)
        x = sharding.constrain(jnp.take(self.embed[...], input_ids, axis=0).astype(dt), ACT)  # (B, L, D)
        shared_bias = None if self.cfg.per_layer_position_bias else self.blocks[0].attn.position_bias(length)
        for block in self.blocks:
            bias = block.attn.position_bias(length) if shared_bias is None else shared_bias  # (1, H, L, L)
            x = sharding.constrain(block(x, bias, key_mask), ACT)
        return self.final_norm(x)  # (B, L, D)


def encode_prompts(model: UMT5Encoder, ids: Array, mask: Array) -> Array:
    """WanPipeline's prompt embeddings: encoder output with positions >= mask.sum() zeroed."""
    hidden = model(ids, mask)  # (B, L, D)
    seq_lens = jnp.sum(mask > 0, axis=-1)  # (B,)
    keep = jnp.arange(ids.shape[1])[None, :] < seq_lens[:, None]  # (B, L)
    return jnp.where(keep[..., None], hidden, jnp.zeros((), hidden.dtype))  # (B, L, D)


def param_count(model_or_cfg) -> int:
    """Parameter count; a config is counted through nnx.eval_shape (nothing allocated)."""
    model = model_or_cfg
    if isinstance(model_or_cfg, TextConfig):
        model = nnx.eval_shape(lambda: UMT5Encoder(model_or_cfg, rngs=nnx.Rngs(0)))
    return count_params(model)


# ----------------------------------------------------------------------------------------------
# transformers interop.
# ----------------------------------------------------------------------------------------------
def config_from_transformers(config_json, **overrides) -> TextConfig:
    """TextConfig from a transformers T5/UMT5 config (dict, config.json path or its folder)."""
    c = read_config(config_json)
    model_type = c.get("model_type", "umt5")
    if model_type not in ("umt5", "t5", "mt5"):
        raise ValueError(f"not a T5-family text encoder config (model_type={model_type!r})")
    kw = dict(
        vocab_size=c["vocab_size"],
        d_model=c["d_model"],
        d_kv=c["d_kv"],
        d_ff=c["d_ff"],
        num_layers=c["num_layers"],
        num_heads=c["num_heads"],
        relative_attention_num_buckets=c.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=c.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=c.get("feed_forward_proj", "relu"),
        per_layer_position_bias=model_type == "umt5",
    )
    kw.update(overrides)
    return TextConfig(**kw)


def _expected(model: UMT5Encoder) -> dict[str, tuple[nnx.Param, bool]]:
    """transformers state-dict name -> (our param, transpose?)."""
    out = {"shared.weight": (model.embed, False), "encoder.final_layer_norm.weight": (model.final_norm.weight, False)}
    for i, blk in enumerate(model.blocks):
        pre = f"encoder.block.{i}.layer"
        out[f"{pre}.0.layer_norm.weight"] = (blk.attn_norm.weight, False)
        for n in ("q", "k", "v", "o"):
            out[f"{pre}.0.SelfAttention.{n}.weight"] = (getattr(blk.attn, n), True)
        if blk.attn.relative_attention_bias is not None:
            out[f"{pre}.0.SelfAttention.relative_attention_bias.weight"] = (blk.attn.relative_attention_bias, False)
        out[f"{pre}.1.layer_norm.weight"] = (blk.ffn_norm.weight, False)
        for n in ("wi_0", "wi_1", "wo") if model.cfg.is_gated else ("wi", "wo"):
            out[f"{pre}.1.DenseReluDense.{n}.weight"] = (getattr(blk.ffn, n), True)
    return out


def load_transformers(model: UMT5Encoder, reader, *, ignore_prefixes=()) -> None:
    """Sets every parameter from a transformers UMT5EncoderModel/T5EncoderModel state dict.

    ``reader``: mapping-like, ``.keys()`` and ``reader[name] -> np.ndarray`` (lazy). The token
    embedding may be stored as ``shared.weight`` and/or ``encoder.embed_tokens.weight`` (tied).
    Pass ``ignore_prefixes=("decoder.", "lm_head.")`` to take the encoder out of a full T5.
    Raises WeightsMismatch listing missing / unexpected / misshapen tensors.
    """
    expected = _expected(model)
    keys = set(reader.keys())
    alias = "encoder.embed_tokens.weight"
    if "shared.weight" not in keys and alias in keys:
        expected[alias] = expected.pop("shared.weight")
    elif alias in keys:
        keys.discard(alias)  # tied copy of shared.weight
    keys = {k for k in keys if not k.startswith(tuple(ignore_prefixes))}
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    if missing or unexpected:
        raise WeightsMismatch("text encoder", missing=missing, unexpected=unexpected)
    bad = []
    for name, (var, transpose) in expected.items():
        arr = np.asarray(reader[name])
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != tuple(var.shape):
            bad.append(f"{name}: checkpoint {tuple(arr.shape)} vs model {tuple(var.shape)}")
            continue
        assign(var, arr)
    if bad:
        raise WeightsMismatch("text encoder", shape_mismatch=bad)


# ----------------------------------------------------------------------------------------------
# Variants.
# ----------------------------------------------------------------------------------------------
def umt5_xxl(**kw) -> TextConfig:
    """google/umt5-xxl encoder, Wan 2.1's text encoder (~5.68B parameters)."""
    base = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    return TextConfig(**{**base, **kw})


def toy(**kw) -> TextConfig:
    """Small T5-style encoder trained from scratch with the toy DiT; set vocab_size from the
    toy tokenizer (Tokenizer.vocab_size)."""
    base = dict(vocab_size=256, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                per_layer_position_bias=False)
    return TextConfig(**{**base, **kw})


def tiny(**kw) -> TextConfig:
    """tests/fixtures/umt5_tiny/text_encoder (UMT5-style, built by scripts/make_text_fixtures.py)."""
    base = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return TextConfig(**{**base, **kw})


VARIANTS = {"umt5-xxl": umt5_xxl, "toy": toy, "tiny": tiny}
