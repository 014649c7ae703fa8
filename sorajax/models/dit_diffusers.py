"""diffusers interop for the Wan DiT: `WanTransformer3DModel` config.json -> DiTConfig, and its
state dict -> the parameters of `sorajax.models.dit.WanDiT` (exact in f32, tests/test_dit.py).

Kept apart from dit.py so the model file holds the model only; sorajax/convert.py and the tests
are its users.
"""
from __future__ import annotations

import numpy as np

from sorajax.errors import UserError, WeightsMismatch
from sorajax.models.dit import DiTConfig, WanDiT
from sorajax.models.layers import assign, read_config


def config_from_diffusers(config_json, **overrides) -> DiTConfig:
    """DiTConfig from a diffusers config (dict, config.json path, or model folder)."""
    c = read_config(config_json)
    name = c.get("_class_name", "WanTransformer3DModel")
    if name != "WanTransformer3DModel":
        raise UserError(f"expected a WanTransformer3DModel config, got {name}")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if c.get(key) is not None:
            raise UserError(f"Wan image-conditioning config ({key}={c[key]}) is not supported")
    if c.get("qk_norm", "rms_norm_across_heads") not in (None, "rms_norm_across_heads"):
        raise UserError(f"unsupported qk_norm {c['qk_norm']!r}")
    # The defaults are diffusers' WanTransformer3DModel defaults (the 14B model's).
    kw = dict(
        patch_size=tuple(c.get("patch_size", (1, 2, 2))),
        num_attention_heads=c.get("num_attention_heads", 40),
        attention_head_dim=c.get("attention_head_dim", 128),
        in_channels=c.get("in_channels", 16),
        out_channels=c.get("out_channels") or c.get("in_channels", 16),
        text_dim=c.get("text_dim", 4096),
        freq_dim=c.get("freq_dim", 256),
        ffn_dim=c.get("ffn_dim", 13824),
        num_layers=c.get("num_layers", 40),
        cross_attn_norm=bool(c.get("cross_attn_norm", True)),
        # diffusers' WanAttention always builds norm_q/norm_k, whatever qk_norm says.
        qk_norm=True,
        eps=c.get("eps", 1e-6),
        rope_max_seq_len=c.get("rope_max_seq_len", 1024),
    )
    kw.update(overrides)
    return DiTConfig(**kw)


def _param_map(model: WanDiT):
    """diffusers name -> (nnx.Param, kind); kind says how the torch tensor maps to ours."""
    m = {}

    def lin(name, layer):
        m[name + ".weight"] = (layer.kernel, "linear")
        m[name + ".bias"] = (layer.bias, "same")

    m["patch_embedding.weight"] = (model.patch_embedding.kernel, "patch")
    m["patch_embedding.bias"] = (model.patch_embedding.bias, "same")
    embedders = (
        ("time_embedder.linear_1", model.time_embedder_1),
        ("time_embedder.linear_2", model.time_embedder_2),
        ("time_proj", model.time_proj),
        ("text_embedder.linear_1", model.text_embedder_1),
        ("text_embedder.linear_2", model.text_embedder_2),
    )
    for name, layer in embedders:
        lin("condition_embedder." + name, layer)
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}."
        for a in ("attn1", "attn2"):
            att = getattr(blk, a)
            for proj in ("to_q", "to_k", "to_v"):
                lin(p + f"{a}.{proj}", getattr(att, proj))
            lin(p + f"{a}.to_out.0", att.to_out)
            if att.norm_q is not None:
                m[p + f"{a}.norm_q.weight"] = (att.norm_q.scale, "same")
                m[p + f"{a}.norm_k.weight"] = (att.norm_k.scale, "same")
        if blk.norm2 is not None:
            m[p + "norm2.weight"] = (blk.norm2.scale, "same")
            m[p + "norm2.bias"] = (blk.norm2.bias, "same")
        lin(p + "ffn.net.0.proj", blk.ffn_in)
        lin(p + "ffn.net.2", blk.ffn_out)
        m[p + "scale_shift_table"] = (blk.scale_shift_table, "same")
    lin("proj_out", model.proj_out)
    m["scale_shift_table"] = (model.scale_shift_table, "same")
    return m


def _torch_shape(var, kind, cfg):
    shape = tuple(var.shape)
    if kind == "linear":
        return shape[::-1]
    if kind == "patch":
        return (cfg.dim, cfg.in_channels, *cfg.patch_size)
    return shape


def _to_ours(arr, kind):
    if kind == "linear":  # torch (out, in) -> (in, out)
        return arr.T
    if kind == "patch":  # torch Conv3d (D, C, pt, ph, pw) -> (pt*ph*pw*C, D)
        return arr.transpose(2, 3, 4, 1, 0).reshape(-1, arr.shape[0])
    return arr


def load_diffusers(model: WanDiT, reader) -> None:
    """Set every parameter of `model` from a diffusers WanTransformer3DModel state dict.

    reader: mapping-like, `.keys()` and `reader[name] -> np.ndarray` (read lazily, one tensor at a
    time). `model` may be abstract (nnx.eval_shape): no random init is then ever computed, and
    each tensor is placed with the abstract value's sharding when it has one.

    Raises WeightsMismatch listing missing / unexpected keys (checked before anything is
    written) and shape mismatches (checked as tensors are read; the model may then be partially
    loaded).
    """
    pmap = _param_map(model)
    keys = set(reader.keys())
    missing = sorted(set(pmap) - keys)
    # diffusers itself ignores stray norm_added_q tensors in some Wan checkpoints.
    unexpected = sorted(k for k in keys - set(pmap) if "norm_added_q" not in k)
    if missing or unexpected:
        raise WeightsMismatch("Wan DiT weights", missing, unexpected)
    bad = []
    for name in sorted(pmap):
        var, kind = pmap[name]
        arr = np.asarray(reader[name])
        want = _torch_shape(var, kind, model.cfg)
        if tuple(arr.shape) != want:
            bad.append(f"{name}: checkpoint {tuple(arr.shape)} vs model {want}")
            continue
        assign(var, _to_ours(arr, kind))
    if bad:
        raise WeightsMismatch("Wan DiT weights", shape_mismatch=bad)
