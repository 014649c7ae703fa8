"""Wan 2.1 DiT: parity with diffusers' WanTransformer3DModel, parameter counts, per-token
timesteps, positions, remat, loader errors and sharding annotations.

Fixture: tests/fixtures/wan_dit_tiny (scripts/make_dit_fixtures.py, torch layout NCFHW)."""
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import sorajax  # noqa: F401  (turns eager variable sharding off)
from sorajax.errors import WeightsMismatch
from sorajax.models import dit, dit_diffusers
from sorajax.sharding import LOGICAL_AXES


class SafetensorsReader:
    """Lazy mapping-like reader: keys() and reader[name] -> np.ndarray."""

    def __init__(self, path):
        self._f = safe_open(str(path), framework="np")

    def keys(self):
        return list(self._f.keys())

    def __getitem__(self, name):
        return self._f.get_tensor(name)


class DictReader(dict):
    pass


def _cl(a):  # torch (B, C, F, H, W) -> ours (B, F, H, W, C)
    return np.asarray(a).transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def tiny():
    d = pathlib.Path(__file__).parent / "fixtures" / "wan_dit_tiny"
    cfg = dit_diffusers.config_from_diffusers(d)
    # Abstract model + loader: no random init is computed (and every parameter must get set).
    model = nnx.eval_shape(lambda: dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
    dit_diffusers.load_diffusers(model, SafetensorsReader(d / "diffusion_pytorch_model.safetensors"))
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(model)))
    io = dict(np.load(d / "io.npz"))
    fwd = nnx.jit(lambda m, x, t, c, positions=None: m(x, t, c, positions))
    return d, cfg, model, io, fwd


def test_config_from_diffusers_is_tiny_variant(tiny):
    _, cfg, *_ = tiny
    assert cfg == dit.VARIANTS["tiny"]()
    assert cfg.rope_split == (4, 4, 4)


# Max abs error vs diffusers measured in f32 on CPU: 1.4e-6 .. 1.9e-6 (docs/PARITY.md: 1.9e-6).
PARITY_ATOL = 2e-5


@pytest.mark.parametrize("case", ["f1", "f2", "f3", "tok"])
def test_parity_with_diffusers(tiny, case):
    _, _, model, io, fwd = tiny
    x, t = _cl(io[f"x_{case}"]), io[f"t_{case}"]
    out = fwd(model, x, t, io["ctx"])
    ref = _cl(io[f"out_{case}"])
    chex.assert_shape(out, x.shape)  # in = out = 4 channels
    chex.assert_type(out, jnp.float32)
    print(f"dit {case}: max abs err {np.abs(np.asarray(out) - ref).max():.2e}")
    chex.assert_trees_all_close(out, ref, atol=PARITY_ATOL, rtol=0)


def test_param_counts(tiny):
    _, _, model, io, _ = tiny
    assert dit.param_count(model) == int(io["param_count"])
    for name, key in (("wan2.1-1.3b", "param_count_1_3b"), ("wan2.1-14b", "param_count_14b")):
        abstract = nnx.eval_shape(lambda: dit.WanDiT(dit.VARIANTS[name](), rngs=nnx.Rngs(0)))
        assert dit.param_count(abstract) == int(io[key])
    assert int(io["param_count_1_3b"]) == 1_418_996_800


def test_per_token_timesteps_equal_broadcast(tiny):
    _, cfg, model, io, fwd = tiny
    x, t = _cl(io["x_f2"]), io["t_f2"]
    n = dit.num_tokens(cfg, x.shape)
    a = fwd(model, x, t, io["ctx"])
    b = fwd(model, x, np.broadcast_to(t[:, None], (t.shape[0], n)), io["ctx"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_explicit_positions(tiny):
    _, cfg, model, io, fwd = tiny
    x, t = _cl(io["x_f2"]), io["t_f2"]
    f, h, w = x.shape[1], x.shape[2] // 2, x.shape[3] // 2
    pos = np.broadcast_to(dit.grid_positions(f, h, w)[None], (2, f * h * w, 3))
    a = np.asarray(fwd(model, x, t, io["ctx"]))
    b = np.asarray(fwd(model, x, t, io["ctx"], jnp.asarray(pos)))
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # RoPE is relative inside attention: shifting every token's time position by the same
    # amount leaves the output unchanged (up to f32 rounding of the tables) ...
    c = np.asarray(fwd(model, x, t, io["ctx"], jnp.asarray(pos + np.array([5, 0, 0]))))
    np.testing.assert_allclose(a, c, atol=1e-4, rtol=0)
    # ... while non-uniform positions (here: every token at the origin) do change it.
    z = np.asarray(fwd(model, x, t, io["ctx"], jnp.zeros_like(pos)))
    assert np.abs(a - z).max() > 1e-2


def test_toy_variant_shapes():
    cfg = dit.VARIANTS["toy"]()
    x = jax.ShapeDtypeStruct((2, 3, 8, 8, cfg.in_channels), jnp.float32)
    ctx = jax.ShapeDtypeStruct((2, 5, cfg.text_dim), jnp.float32)
    out = nnx.eval_shape(lambda x, c: dit.WanDiT(cfg, rngs=nnx.Rngs(1))(x, jnp.zeros((2,)), c), x, ctx)
    assert out.shape == (2, 3, 8, 8, cfg.out_channels) and out.dtype == jnp.float32
    assert dit.num_tokens(cfg, x.shape) == 3 * 4 * 4
    model = nnx.eval_shape(lambda: dit.WanDiT(cfg, rngs=nnx.Rngs(1)))
    assert dit.param_count(model) == 1_251_616  # incl. the 128-wide start embedding
    bf16 = dit.VARIANTS["toy"](dtype="bfloat16")
    out = nnx.eval_shape(lambda x, c: dit.WanDiT(bf16, rngs=nnx.Rngs(1))(x, jnp.zeros((2, 48)), c), x, ctx)
    assert out.shape == (2, 3, 8, 8, cfg.out_channels) and out.dtype == jnp.bfloat16


def test_zero_init_starts_at_zero_velocity_and_still_learns():
    """zero_init: time_proj and proj_out start at zero (adaLN-Zero), so the first velocity is 0
    whatever the input; the gradient still reaches proj_out (training can start), and without
    the flag the same model's first velocity is not 0."""
    kw = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, text_dim=16,
              in_channels=4, out_channels=4, freq_dim=16)
    x = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 16))
    t = jnp.asarray([300.0, 800.0])
    model = dit.WanDiT(dit.DiTConfig(**kw, zero_init=True), rngs=nnx.Rngs(0))
    for layer in (model.time_proj, model.proj_out):
        assert not np.any(np.asarray(layer.kernel[...])) and not np.any(np.asarray(layer.bias[...]))
    assert not np.any(np.asarray(model(x, t, ctx)))
    grads = nnx.grad(lambda m: jnp.sum((m(x, t, ctx) - 1.0) ** 2))(model)
    assert float(jnp.abs(grads.proj_out.kernel[...]).max()) > 0
    plain = dit.WanDiT(dit.DiTConfig(**kw), rngs=nnx.Rngs(0))
    assert float(jnp.abs(plain(x, t, ctx)).max()) > 1e-3


@pytest.mark.parametrize("variant", [dict(remat=True), dict(remat="dots"), dict(scan_layers=False),
                                     dict(scan_layers=False, remat="full"), dict(attention="flash")])
def test_memory_levers_keep_values_and_grads(tiny, variant):
    """remat policies, unrolled layers (the default scans them) and the blockwise attention give
    the default model's loss and gradients (the fixture's 2-layer weights)."""
    d, _, _, io, _ = tiny
    models = []
    for kw in (dict(), variant):
        cfg = dit.VARIANTS["tiny"](**kw)
        models.append(nnx.eval_shape(lambda: dit.WanDiT(cfg, rngs=nnx.Rngs(0))))
        dit_diffusers.load_diffusers(models[-1], SafetensorsReader(d / "diffusion_pytorch_model.safetensors"))
    x, t = _cl(io["x_f1"])[:1], io["t_f1"][:1]
    grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(x, t, io["ctx"][:1]) ** 2)))
    (l0, g0), (l1, g1) = grad(models[0]), grad(models[1])
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_unknown_remat_policy_is_a_user_error():
    from sorajax.errors import UserError

    with pytest.raises(UserError, match="remat"):
        dit.remat_policy("sometimes")


def test_load_diffusers_reports_mismatches(tiny):
    d, cfg, *_ = tiny
    src = SafetensorsReader(d / "diffusion_pytorch_model.safetensors")
    sd = DictReader({k: src[k] for k in src.keys()})
    model = nnx.eval_shape(lambda: dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
    broken = DictReader(sd)
    del broken["proj_out.bias"]
    broken["blocks.0.attn2.add_k_proj.weight"] = np.zeros((24, 24), np.float32)
    broken["blocks.0.attn1.norm_added_q.weight"] = np.zeros((24,), np.float32)  # ignored
    with pytest.raises(WeightsMismatch) as e:
        dit_diffusers.load_diffusers(model, broken)
    assert e.value.missing == ["proj_out.bias"]
    assert e.value.unexpected == ["blocks.0.attn2.add_k_proj.weight"]
    wrong = DictReader(sd)
    wrong["blocks.1.ffn.net.2.weight"] = np.zeros((24, 31), np.float32)
    with pytest.raises(WeightsMismatch) as e:
        dit_diffusers.load_diffusers(model, wrong)
    assert len(e.value.shape_mismatch) == 1 and "blocks.1.ffn.net.2.weight" in e.value.shape_mismatch[0]


def test_params_carry_logical_axis_names():
    model = nnx.eval_shape(lambda: dit.WanDiT(dit.VARIANTS["tiny"](), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert all(n is None or n in LOGICAL_AXES for n in names), (path, names)
    blk = model.blocks[0]
    assert blk.attn1.to_q.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert blk.attn1.to_out.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    assert blk.ffn_in.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert blk.attn1.norm_q.scale.get_metadata()["out_sharding"] == ("norm",)
    assert blk.scale_shift_table.get_metadata()["out_sharding"] == (None, "modulation", "embed")


@pytest.mark.parametrize("scan", [True, False])
def test_text_kv_once_matches_diffusers(tiny, scan):
    """The sampler's path: every block's cross-attention K/V of the prompt computed once
    (WanDiT.text_kv), then the forward without the context, scanned or unrolled blocks: still
    diffusers' output (the f2 and per-token cases)."""
    import dataclasses

    _, cfg, model, io, _ = tiny
    m = nnx.eval_shape(lambda: dit.WanDiT(dataclasses.replace(cfg, scan_layers=scan), rngs=nnx.Rngs(0)))
    nnx.update(m, nnx.state(model))
    kv = nnx.jit(lambda m, c: m.text_kv(c))(m, io["ctx"])
    assert kv[0].shape == (cfg.num_layers, io["ctx"].shape[0], io["ctx"].shape[1],
                           cfg.num_attention_heads, cfg.attention_head_dim)
    fwd = nnx.jit(lambda m, x, t, kv: m(x, t, None, text_kv=kv))
    for case in ("f2", "tok"):
        out = fwd(m, _cl(io[f"x_{case}"]), io[f"t_{case}"], kv)
        chex.assert_trees_all_close(out, _cl(io[f"out_{case}"]), atol=PARITY_ATOL, rtol=0)
