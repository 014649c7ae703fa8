"""The sequence-sharded causal VAE (rows over the "context" mesh axis) equals the unsharded one.

8 fake CPU devices (conftest), f32 highest precision, the tiny diffusers fixture VAE (4x8x8).
Encode and decode are jitted with their bodies traced inside `sharding.activation_rules`; the
compiled HLO must show halo exchange (collective-permute) for the convolutions, all-gathers only
for the mid-block attention's keys/values, and no full-height activation at pixel resolution.
"""
import json
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from safetensors.numpy import load_file

import sorajax  # noqa: F401
from sorajax import sharding
from sorajax.models import vae as V

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "wan_vae_tiny"
B, FRAMES, H, W = 2, 9, 128, 32  # tiny VAE: latents (2, 3, 16, 4, 4): >= 2 latent rows per device
ROWS = ("batch", "time", "height", "width", None)
# Cheap LLVM codegen: halves the compile time on 2 CPU cores; XLA's HLO passes (SPMD partitioning
# included) are unaffected.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


@pytest.fixture(scope="module")
def vae():
    cfg = V.config_from_diffusers(json.loads((FIXTURE / "config.json").read_text()))
    model = nnx.eval_shape(lambda: V.WanVAE(cfg, rngs=nnx.Rngs(0)))
    V.load_diffusers(model, load_file(str(FIXTURE / "diffusion_pytorch_model.safetensors")))
    graphdef, state = nnx.split(model)
    x = np.asarray(jax.random.uniform(jax.random.key(0), (B, FRAMES, H, W, 3), minval=-1.0, maxval=1.0))
    z = np.asarray(jax.random.normal(jax.random.key(1), (B, *V.latent_shape(cfg, FRAMES, H, W))))
    # Unsharded reference: no activation rules, one device.
    enc = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x)).lower(state, x).compile(FAST)
    dec = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z)).lower(state, z).compile(FAST)
    ref_mean, ref_logvar = (np.asarray(a) for a in enc(state, x))
    return dict(cfg=cfg, graphdef=graphdef, state=state, x=x, z=z, ref_mean=ref_mean,
                ref_logvar=ref_logvar, ref_dec=np.asarray(dec(state, z)))


def _collectives(hlo: str) -> dict[str, list[str]]:
    """Result shapes of every collective in compiled HLO text, by op name."""
    out = {}
    for op in ("collective-permute", "all-gather", "all-reduce", "all-to-all", "reduce-scatter"):
        pat = re.compile(r"^\s*%\S+ = (.*?) " + op + r"(?:-start)?\(", re.M)
        out[op] = [m.group(1) for m in pat.finditer(hlo)]
    return out


def _check_structure(hlo: str, mesh, cfg, what: str):
    ops = _collectives(hlo)
    counts = {k: len(v) for k, v in ops.items()}
    # Halo exchange: every 3x3 conv on row-sharded activations swaps border rows with neighbours.
    assert counts["collective-permute"] >= 10, (what, counts)
    # Only the mid-block attention gathers (its keys/values, whole frames at the lowest resolution).
    h, w = H // cfg.spatial_stride, W // cfg.spatial_stride
    c = cfg.base_dim * cfg.dim_mult[-1]
    for shape in ops["all-gather"]:
        assert re.search(rf"f32\[\d+,\d+,{h},{w},{c}\]", shape), (what, "unexpected all-gather", shape)
    assert counts["all-to-all"] == 0 and counts["reduce-scatter"] == 0, (what, counts)
    # Pixel-resolution activations (base_dim channels) exist only as row shards, never whole.
    rows, bdev = H // mesh.shape["context"], B // (mesh.shape["data"] * mesh.shape["fsdp"])
    shard = rf"f32\[{bdev},\d+,{rows},{W},{cfg.base_dim}\]"
    assert re.search(shard, hlo), (what, "no row-sharded activation")
    assert not re.search(rf"f32\[(\d+,)*{H},{W},\d+\]", hlo), (what, "a full-height activation")
    return counts


MESHES = {
    "context8": dict(context=8),
    "data2_context4_scan": dict(data=2, context=4),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_vae_matches_unsharded(vae, name, monkeypatch):
    if name.endswith("_scan"):
        # Long-clip path: lax.scan over the chunks carrying the (row-sharded) feature cache.
        monkeypatch.setattr(V, "_UNROLL_CHUNKS", 0)
    mesh = sharding.make_mesh(MESHES[name])
    rules = sharding.normalize_rules(None)  # defaults: height -> context, batch -> (data, fsdp)
    gd, cfg = vae["graphdef"], vae["cfg"]
    state = jax.device_put(vae["state"], sharding.state_shardings(vae["state"], mesh, rules))

    def put(a):
        return jax.device_put(a, NamedSharding(mesh, sharding.logical_to_spec(ROWS, rules, mesh, a.shape)))

    def enc(st, x):
        with sharding.activation_rules(mesh, rules):
            return nnx.merge(gd, st).encode(x)

    def dec(st, z):
        with sharding.activation_rules(mesh, rules):
            return nnx.merge(gd, st).decode(z)

    x, z = put(vae["x"]), put(vae["z"])
    assert x.addressable_shards[0].data.shape[2] == H // mesh.shape["context"]
    enc_l, dec_l = jax.jit(enc).lower(state, x), jax.jit(dec).lower(state, z)
    if name.endswith("_scan"):
        for lowered in (enc_l, dec_l):
            assert "stablehlo.while" in lowered.as_text(), "expected the chunk scan"
    enc_c, dec_c = enc_l.compile(FAST), dec_l.compile(FAST)
    mean, logvar = enc_c(state, x)
    out = dec_c(state, z)

    err = {"mean": float(np.abs(np.asarray(mean) - vae["ref_mean"]).max()),
           "logvar": float(np.abs(np.asarray(logvar) - vae["ref_logvar"]).max()),
           "decode": float(np.abs(np.asarray(out) - vae["ref_dec"]).max())}
    print(name, "max abs err", err)
    assert max(err.values()) < 1e-5, err
    # Outputs stay row-sharded (no gather at the end).
    for a in (mean, out):
        want = NamedSharding(mesh, sharding.logical_to_spec(ROWS, rules, mesh, a.shape))
        assert a.sharding.is_equivalent_to(want, a.ndim), a.sharding

    for what, c in (("encode", enc_c), ("decode", dec_c)):
        hlo = c.as_text()
        counts = _check_structure(hlo, mesh, cfg, f"{name}/{what}")
        if name.endswith("_scan") and what == "decode":
            # The feature cache carried by the scan holds row shards (2 cached frames, rows / n).
            carry = " ".join(re.findall(r"= \(.*?\) while\(", hlo))
            rows, bdev = H // mesh.shape["context"], B // (mesh.shape["data"] * mesh.shape["fsdp"])
            assert f"f32[{bdev},2,{rows},{W},{cfg.base_dim}]" in carry, carry[:2000]
        print(name, what, counts)


def test_constraints_are_noops_without_rules(vae):
    """Outside activation_rules the model traces exactly as before (no sharding constraints)."""
    gd = vae["graphdef"]
    jaxpr = str(jax.make_jaxpr(lambda st, z: nnx.merge(gd, st).decode(z))(vae["state"], vae["z"]))
    assert "sharding_constraint" not in jaxpr
