"""sorajax/flops.py against XLA's own FLOP count of the compiled programs (one CPU device).

XLA's count (`compiled.cost_analysis()["flops"]`) also has the elementwise work (norms, softmax,
RoPE, Adam) the analytic model leaves out, and skips convolution taps over spatial padding, so
the sizes below are ones where matmuls / convolutions dominate and the bound is 10%. Nothing is
run: each test only compiles (a few seconds at most)."""
import ast
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sorajax import flops, sharding, stages
from sorajax import tokenizer as tok_lib
from sorajax.models import dit as dit_lib
from sorajax.models import text as text_lib
from sorajax.models import vae as vae_lib
from sorajax.train_state import Trainer
from tests.helpers import FIXTURES, toy_config

TOL = 0.10
# hidden 128 (2 heads of 64), MLP 512, 2 layers: matmuls are ~97% of XLA's count.
# scan_layers=False: XLA's cost analysis counts a while loop's body once, so the counts compare an
# unrolled model.
DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=512, scan_layers=False)


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _close(analytic, xla, what):
    ratio = analytic / xla
    assert abs(ratio - 1.0) < TOL, f"{what}: analytic {analytic:.4g} vs XLA {xla:.4g} (ratio {ratio:.3f})"


# (latent (F, H, W), text length, text_dim, per-token timesteps): self-attention ~35% of the
# FLOPs; text-heavy (text embedding and cross-attention k/v ~50%); per-token timestep MLPs ~20%.
DIT_CASES = {
    "self-attention": ((8, 16, 16), 24, 128, False),
    "text": ((1, 16, 16), 256, 512, False),
    "per-token-t": ((2, 16, 16), 24, 128, True),
}


@pytest.mark.parametrize("case", sorted(DIT_CASES))
def test_dit_forward_matches_xla(case):
    lat, L, text_dim, per_token = DIT_CASES[case]
    cfg = dit_lib.VARIANTS["toy"](**DIT, in_channels=8, out_channels=8, text_dim=text_dim)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0))))
    n, B = dit_lib.num_tokens(cfg, lat), 2
    xla = _xla_flops(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c), state,
                     _sds((B, *lat, cfg.in_channels)), _sds((B, n) if per_token else (B,)),
                     _sds((B, L, cfg.text_dim)))
    analytic = B * flops.dit_forward_flops(cfg, n, L, per_token_timesteps=per_token)
    _close(analytic, xla, f"DiT forward ({case}, N={n}, L={L})")


def test_text_forward_matches_xla():
    cfg = text_lib.VARIANTS["toy"]()  # gated-GELU FFN
    graphdef, state = nnx.split(nnx.eval_shape(lambda: text_lib.UMT5Encoder(cfg, rngs=nnx.Rngs(0))))
    B, L = 2, 64
    xla = _xla_flops(lambda st, i, m: text_lib.encode_prompts(nnx.merge(graphdef, st), i, m), state,
                     _sds((B, L), jnp.int32), _sds((B, L), jnp.int32))
    _close(B * flops.text_forward_flops(cfg, L), xla, "text encoder forward")


def test_vae_encode_decode_match_xla():
    """The toy VAE on 9 frames: the first frame alone, then 2 unrolled chunks of 4 (a clip of
    more than 1 + 4·4 frames scans its chunks, and XLA counts a loop body once)."""
    cfg = vae_lib.VARIANTS["toy"]()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vae_lib.WanVAE(cfg, rngs=nnx.Rngs(0))))
    T, H, W = 9, 32, 32
    enc = _xla_flops(lambda st, x: nnx.merge(graphdef, st).encode(x), state, _sds((1, T, H, W, 3)))
    _close(flops.vae_encode_flops(cfg, T, H, W), enc, "VAE encode")
    lat = vae_lib.latent_shape(cfg, T, H, W)
    dec = _xla_flops(lambda st, z: nnx.merge(graphdef, st).decode(z), state, _sds((1, *lat)))
    _close(flops.vae_decode_flops(cfg, T, H, W), dec, "VAE decode")


def test_dit_train_step_matches_xla():
    """One full Trainer step of the DiT stage (DiT + trained toy text encoder, AdamW, EMA) on
    one device, as tests/test_train.py builds it, against dit_train_step_flops (3x forward)."""
    cfg = toy_config()
    with cfg.unlocked():
        cfg.dit.overrides = dict(DIT)
        cfg.mesh.update(dict(data=1))
        # Whole clips: toy.py trains 9-frame windows (3 of the 4 latent frames), which the
        # analytic count below (all 256 tokens) would overstate by a third.
        cfg.dit_train.clip_frames = 0
    assert cfg.text.trainable
    tok = tok_lib.Tokenizer.load(str(FIXTURES / "umt5_tiny" / "tokenizer"))
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    stage = stages.DiTStage(cfg, "/nonexistent", tok)
    trainer = Trainer(stage, cfg, mesh)
    vae_cfg, dit_cfg, text_cfg = stage.cfgs
    B, lat, L = 2, (4, 16, 16), int(cfg.text.max_length)  # 256 tokens per sample
    batch = {"latents": _sds((B, *lat, vae_cfg.z_dim)),
             "ids": _sds((B, L), jnp.int32), "mask": _sds((B, L), jnp.int32)}
    cost = trainer.step_fn().lower(trainer.abstract_target(), batch).compile().cost_analysis()
    xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    analytic = flops.dit_train_step_flops(dit_cfg, text_cfg, B, lat, L, text_trainable=True)
    _close(analytic, xla, "DiT train step")


def test_attention_term_is_quadratic_in_tokens():
    cfg = dit_lib.VARIANTS["wan2.1-1.3b"]()
    n, L, d = 4096, 512, cfg.dim
    one, two = (flops.dit_forward_breakdown(cfg, k, L) for k in (n, 2 * n))
    assert two["self_attention"] == 4 * one["self_attention"]
    assert two["cross_attention"] == 2 * one["cross_attention"] and two["mlp"] == 2 * one["mlp"]
    # f(2N) - 2 f(N) + f(0) isolates the N^2 part: 2 * layers * 4 N^2 d (QK^T and AV, not halved).
    f = lambda k: flops.dit_forward_flops(cfg, k, L)  # noqa: E731
    assert f(2 * n) - 2 * f(n) + f(0) == 2 * cfg.num_layers * 4 * n * n * d
    # REFERENCE.md: at 75,600 tokens (720p, 81 frames) attention is ~70% of the 14B's FLOPs.
    big = dit_lib.VARIANTS["wan2.1-14b"]()
    parts = flops.dit_forward_breakdown(big, 75600, 512)
    assert 0.65 < parts["self_attention"] / sum(parts.values()) < 0.75


def test_step_counts_compose():
    dit_cfg, text_cfg = dit_lib.VARIANTS["toy"](), text_lib.VARIANTS["toy"]()
    lat, L, B = (3, 8, 8), 24, 4
    n = flops.dit_tokens(dit_cfg, lat)
    assert n == dit_lib.num_tokens(dit_cfg, lat) == flops.dit_tokens(dit_cfg, (B, *lat, 8))
    fwd, txt = flops.dit_forward_flops(dit_cfg, n, L), flops.text_forward_flops(text_cfg, L)

    def step(trains):
        return flops.dit_train_step_flops(dit_cfg, text_cfg, B, lat, L, text_trainable=trains)

    assert step(False) == B * (3 * fwd + txt) and step(True) == B * (3 * fwd + 3 * txt)
    assert flops.sampler_step_flops(dit_cfg, B, lat, L) == 2 * B * fwd
    assert flops.sampler_step_flops(dit_cfg, B, lat, L, guidance=False, evals=2) == 2 * B * fwd


def test_module_imports_no_jax():
    tree = ast.parse(pathlib.Path(flops.__file__).read_text())
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert names <= {"__future__", "math"}, names
