"""The sequence-sharded causal VAE (rows over the "context" mesh axis) equals the unsharded one.

8 fake CPU devices (conftest), f32 highest precision, the tiny diffusers fixture VAE (4x8x8).
Encode and decode are jitted with their bodies traced inside `sharding.activation_rules`; the
compiled HLO must show halo exchange (collective-permute) for the convolutions, all-gathers only
for the mid-block attention's keys/values, and no full-height activation at pixel resolution.
Gradients of encode + decode equal the unsharded ones; a level whose rows and columns both do not
divide the context axis raises instead of running unsharded.
"""
import dataclasses
import json
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
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


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
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


# ----------------------------------------------------------------------------------------------
# Gradients: the training path (encode + decode, backward) under the row-sharded rules
# ----------------------------------------------------------------------------------------------
GRAD_SHAPE = (1, 5, 128, 8)  # (B, frames, H, W): 2 latent frames, 16 x 1 latents, 2 rows per device
GRAD_RTOL = 1e-5  # max |g_sharded - g| / max |g| over every parameter


def _recon_loss(graphdef):
    def loss(st, x):
        m = nnx.merge(graphdef, st)
        mean, logvar = m.encode(x)
        y = m.decode(mean, clip=False)  # (B, T, H, W, 3)
        return jnp.mean((y - x) ** 2) + 1e-3 * jnp.mean(logvar ** 2)  # both encoder heads
    return loss


@pytest.mark.parametrize("path", ["scan_remat"])  # "unrolled" too: same conv halos, +40 s
def test_sharded_vae_gradients_match_unsharded(vae, path, monkeypatch):
    """d loss / d params of encode + decode on context=8 (rows sharded) equals the 1-device
    gradient; "scan_remat" runs the long-clip chunk scan with jax.checkpoint (VAEConfig.remat)."""
    cfg, state = vae["cfg"], vae["state"]
    if path == "scan_remat":
        monkeypatch.setattr(V, "_UNROLL_CHUNKS", 0)
        cfg = dataclasses.replace(cfg, remat=True)  # static: same parameter state, new graphdef
    gd, _ = nnx.split(nnx.eval_shape(lambda: V.WanVAE(cfg, rngs=nnx.Rngs(0))))
    b, t, h, w = GRAD_SHAPE
    x = np.asarray(jax.random.uniform(jax.random.key(2), (b, t, h, w, 3), minval=-1.0, maxval=1.0))
    grad = jax.value_and_grad(_recon_loss(gd))
    ref_loss, ref = jax.jit(grad).lower(state, x).compile(FAST)(state, x)

    mesh = sharding.make_mesh(dict(context=8))
    rules = sharding.normalize_rules(None)

    def sharded_grad(st, x):
        with sharding.activation_rules(mesh, rules):
            return grad(st, x)

    st = jax.device_put(state, sharding.state_shardings(state, mesh, rules))
    xs = jax.device_put(x, NamedSharding(mesh, sharding.logical_to_spec(ROWS, rules, mesh, x.shape)))
    compiled = jax.jit(sharded_grad).lower(st, xs).compile(FAST)
    assert "collective-permute" in compiled.as_text()  # really row-sharded: halo exchange
    loss, got = compiled(st, xs)

    chex.assert_trees_all_equal_shapes_and_dtypes(got, ref)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(ref))
    errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale, got, ref)
    worst = max(jax.tree.leaves(errs))
    print(path, f"loss {float(loss):.6f} vs {float(ref_loss):.6f}; max grad err {worst * scale:.1e}"
          f" = {worst:.1e} x max |grad| ({scale:.1e})")
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    bad = {jax.tree_util.keystr(k): f"{e:.1e}" for k, e in jax.tree_util.tree_leaves_with_path(errs)
           if e >= GRAD_RTOL}
    assert worst < GRAD_RTOL, (len(bad), dict(list(bad.items())[:8]))


# ----------------------------------------------------------------------------------------------
# Divisibility: rows, else columns, else an error (never a silent unsharded level)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height,width,ok", [(40, 64, True), (40, 40, False)])
def test_levels_split_rows_else_columns_else_raise(vae, height, width, ok):
    """context=8, tiny VAE (levels H, H/2, H/4, H/8): 40x64 splits rows 40 then columns 32, 16, 8;
    at 40x40 the second level (20x20) divides neither way and encode raises."""
    mesh = sharding.make_mesh(dict(context=8))
    rules = sharding.normalize_rules(None)
    gd = vae["graphdef"]

    def enc(st, x):
        with sharding.activation_rules(mesh, rules):
            return nnx.merge(gd, st).encode(x)

    x = jax.ShapeDtypeStruct((1, 1, height, width, 3), jnp.float32)
    if ok:
        mean, _ = jax.eval_shape(enc, vae["state"], x)
        chex.assert_shape(mean, (1, 1, height // 8, width // 8, vae["cfg"].z_dim))
    else:
        with pytest.raises(ValueError, match=r"cannot split a 20x20 \(rows x columns\) activation over "
                                             r"context=8 devices: .* multiple of 8; change height/width "
                                             r"or mesh\.context"):
            jax.eval_shape(enc, vae["state"], x)
