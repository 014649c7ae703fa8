"""Wan 2.1 causal video VAE: parity with diffusers' AutoencoderKLWan, shapes, causality.

Fixtures: tests/fixtures/wan_vae_tiny, made by scripts/make_vae_fixtures.py (PyTorch NCTHW).
"""
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import sorajax  # noqa: F401
from sorajax.errors import WeightsMismatch
from sorajax.models import vae as V

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "wan_vae_tiny"


def _cl(a):  # torch (B, C, T, H, W) -> ours (B, T, H, W, C)
    return np.moveaxis(np.asarray(a), 1, -1)


def _abstract(cfg):
    # Abstract construction: random init is not needed (and slow to compile on CPU).
    return nnx.eval_shape(lambda: V.WanVAE(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def tiny():
    d = FIXTURE
    cfg = V.config_from_diffusers(json.loads((d / "config.json").read_text()))
    model = _abstract(cfg)
    V.load_diffusers(model, load_file(str(d / "diffusion_pytorch_model.safetensors")))
    io = dict(np.load(d / "io.npz"))
    graphdef, state = nnx.split(model)
    enc = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x))
    dec = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z))
    return dict(cfg=cfg, model=model, io=io, state=state,
                enc=lambda x: enc(state, jnp.asarray(x)), dec=lambda z: dec(state, jnp.asarray(z)))


# ----------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------
def test_config_and_param_count(tiny):
    cfg = tiny["cfg"]
    assert cfg == V.VARIANTS["tiny"](latents_mean=cfg.latents_mean, latents_std=cfg.latents_std)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(tiny["model"], nnx.Param)))
    assert n == int(tiny["io"]["num_params"])


# Max abs errors vs diffusers measured in f32 on CPU: encode 3.0e-7, decode 2.5e-6
# (docs/PARITY.md: 3.9e-7 and 3.3e-6).
ENCODE_ATOL, DECODE_ATOL = 4e-6, 3e-5


def _err(a, b):
    return f"{np.abs(np.asarray(a) - np.asarray(b)).max():.2e}"


@pytest.mark.parametrize("frames", [9, 5])
def test_encode_parity(tiny, frames):
    io = tiny["io"]
    mean, logvar = tiny["enc"](_cl(io[f"x{frames}"]))
    ref = (_cl(io[f"mean{frames}"]), _cl(io[f"logvar{frames}"]))
    chex.assert_shape([mean, logvar], (1, 1 + (frames - 1) // 4, 2, 3, 4))
    chex.assert_type([mean, logvar], jnp.float32)
    print(f"vae encode {frames} frames: max abs err mean {_err(mean, ref[0])} logvar {_err(logvar, ref[1])}")
    chex.assert_trees_all_close((mean, logvar), ref, atol=ENCODE_ATOL, rtol=0)


@pytest.mark.parametrize("t", [1, 2, 3])
def test_decode_parity(tiny, t):
    io = tiny["io"]
    x = tiny["dec"](_cl(io[f"z{t}"]))
    chex.assert_shape(x, (1, 1 + 4 * (t - 1), 16, 24, 3))
    chex.assert_type(x, jnp.float32)
    print(f"vae decode {t} latent frames: max abs err {_err(x, _cl(io[f'dec{t}']))}")
    chex.assert_trees_all_close(x, _cl(io[f"dec{t}"]), atol=DECODE_ATOL, rtol=0)


def test_load_mismatch_lists_everything(tiny):
    sd = load_file(str(FIXTURE / "diffusion_pytorch_model.safetensors"))
    sd.pop("decoder.conv_out.bias")
    sd["encoder.extra.weight"] = np.zeros(3, np.float32)
    sd["quant_conv.weight"] = sd["quant_conv.weight"][:4]
    with pytest.raises(WeightsMismatch) as e:
        V.load_diffusers(_abstract(tiny["cfg"]), sd)
    assert e.value.missing == ["decoder.conv_out.bias"]
    assert e.value.unexpected == ["encoder.extra.weight"]
    assert len(e.value.shape_mismatch) == 1 and "quant_conv.weight" in e.value.shape_mismatch[0]


# ----------------------------------------------------------------------------------------------
# Causality: output frames for time t depend only on inputs at times <= t.
# ----------------------------------------------------------------------------------------------
def test_encode_causal(tiny):
    x = _cl(tiny["io"]["x9"])
    m0, l0 = tiny["enc"](x)
    x2 = x.copy()
    x2[:, 5:] = -x2[:, 5:]  # frames 5..8 feed only latent frame 2
    m1, l1 = tiny["enc"](x2)
    np.testing.assert_allclose(m1[:, :2], m0[:, :2], atol=1e-6, rtol=0)
    np.testing.assert_allclose(l1[:, :2], l0[:, :2], atol=1e-6, rtol=0)
    assert np.abs(m1[:, 2] - m0[:, 2]).max() > 1e-3


def test_decode_causal(tiny):
    z = _cl(tiny["io"]["z3"])
    y0 = tiny["dec"](z)
    z2 = z.copy()
    z2[:, 2] += 1.0  # latent frame 2 decodes to pixel frames 5..8
    y1 = tiny["dec"](z2)
    np.testing.assert_allclose(y1[:, :5], y0[:, :5], atol=1e-6, rtol=0)
    assert np.abs(y1[:, 5:] - y0[:, 5:]).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Latent statistics, sampling
# ----------------------------------------------------------------------------------------------
def test_normalize_roundtrip(tiny):
    model, cfg = tiny["model"], tiny["cfg"]
    z = jax.random.normal(jax.random.key(0), (2, 3, 2, 3, 4))
    n = model.normalize(z)
    np.testing.assert_allclose(n, (z - np.array(cfg.latents_mean)) / np.array(cfg.latents_std), rtol=1e-5)
    np.testing.assert_allclose(model.denormalize(n), z, atol=1e-5)
    toy = _abstract(V.VARIANTS["toy"]())
    assert toy.normalize(z) is z and toy.denormalize(z) is z
    s = V.WanVAE.sample_latent(z, jnp.full_like(z, -60.0), jax.random.key(1))
    np.testing.assert_allclose(s, z, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Shapes (abstract: no compile), differentiability
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames,height,width", [(1, 16, 16), (9, 16, 24), (13, 8, 32)])
def test_toy_shapes(frames, height, width):
    cfg = V.VARIANTS["toy"]()
    assert (cfg.temporal_stride, cfg.spatial_stride, cfg.z_dim) == (4, 4, 8)
    model = _abstract(cfg)
    assert (model.temporal_stride, model.spatial_stride, model.z_dim) == (4, 4, 8)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, frames, height, width, 3), jnp.float32)
    mean, logvar = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state, x)
    want = (2, *V.latent_shape(cfg, frames, height, width))
    assert mean.shape == logvar.shape == want
    out = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, mean)
    assert out.shape == x.shape


def test_wan21_shapes():
    cfg = V.VARIANTS["wan2.1"]()
    assert V.latent_shape(cfg, 81, 480, 832) == (21, 60, 104, 16)
    assert V.latent_shape(cfg, 1, 64, 64) == (1, 8, 8, 16)
    for bad in [(4, 64, 64), (5, 60, 64)]:
        with pytest.raises(ValueError):
            V.latent_shape(cfg, *bad)


@pytest.mark.parametrize("stack_below", [0, 1024])  # the per-tap sum / the stacked taps
@pytest.mark.parametrize("stride,padding", [((1, 1, 1), [(2, 0), (1, 1), (1, 1)]),
                                            ((2, 2, 2), [(0, 0), (0, 1), (0, 1)])])
def test_conv3d_as_2d_equals_conv3d(stack_below, stride, padding, monkeypatch):
    """Both ways _conv3d_as_2d computes a 3-D convolution (time taps stacked into channels, or one
    2-D convolution per tap summed) equal XLA's 3-D convolution, with time/space strides and
    causal padding."""
    monkeypatch.setattr(V, "STACK_TAPS_BELOW", stack_below)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 6, 5)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 5, 4)).astype(np.float32))
    want = jax.lax.conv_general_dilated(x, k, stride, padding, dimension_numbers=V._CONV_DN[3],
                                        precision="highest")
    got = V._conv3d_as_2d(x, k, stride, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_gradients_trace():
    """encode -> sample -> decode is differentiable w.r.t. parameters (traced, not compiled)."""
    cfg = V.VARIANTS["toy"](remat=True)
    graphdef, state = nnx.split(_abstract(cfg))

    def loss(s, x, key):
        m = nnx.merge(graphdef, s)
        mean, logvar = m.encode(x)
        return jnp.mean((m.decode(m.sample_latent(mean, logvar, key)) - x) ** 2)

    x = jax.ShapeDtypeStruct((1, 5, 8, 8, 3), jnp.float32)
    grads = jax.eval_shape(jax.grad(loss), state, x, jax.random.key(0))
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: p.shape, state)


def test_wan21_param_count():
    # diffusers AutoencoderKLWan() default: 126,892,531 parameters.
    model = _abstract(V.VARIANTS["wan2.1"]())
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 126_892_531


@pytest.mark.parametrize("frames", [5, 41])
def test_chunks_trace_once(frames, monkeypatch):
    """Short clips unroll their few chunks; long ones scan: either way 5 frames (first chunk +
    one) and 41 frames (first chunk + a scan over 10) trace the per-chunk networks twice."""
    calls = {"enc": 0, "dec": 0}
    chex.clear_trace_counter()  # the limit below is per test, not per session
    for cls, k in [(V.Encoder3d, "enc"), (V.Decoder3d, "dec")]:
        limited = chex.assert_max_traces(cls.__call__, n=2)  # raises on a third trace

        def counted(self, x, cache, _f=limited, _k=k):
            calls[_k] += 1
            return _f(self, x, cache)

        monkeypatch.setattr(cls, "__call__", counted)
    graphdef, state = nnx.split(_abstract(V.VARIANTS["toy"]()))
    x = jax.ShapeDtypeStruct((1, frames, 8, 8, 3), jnp.float32)
    jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).decode(nnx.merge(graphdef, s).encode(x)[0]),
                   state, x)
    assert calls == {"enc": 2, "dec": 2}
