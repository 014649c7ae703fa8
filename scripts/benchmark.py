"""CPU benchmark of sorajax: matmul ceiling, DiT train/forward MFU, sampler, VAE, vs diffusers.

    python scripts/benchmark.py --suite cpu --out R.json [--torch-python PATH] [--quick]

Everything runs in ONE process, one section after the other, so the ratios are fair on a
shared, noisy machine: MFU divides by the f32 matmul ceiling measured by the same command, and
the speed-ups against diffusers come from scripts/torch_bench.py run (as a subprocess of this
command, with the same thread count) on identical tiny-Wan configs, dtypes and shapes. Every
time is the median of >= 5 timed runs (--quick: 2) after a warm-up run, each ending in
block_until_ready. Prints a table and writes R.json atomically (sorajax.fileio).
docs/PERFORMANCE.md says what each figure means, and the targets.

Sections (a failing section is reported under "errors" and the others still run):
  matmul   f32 matmul ceiling: the best GFLOP/s of large square jitted matmuls.
  dit      DiT-S-like WanDiT (hidden 384, 12 layers, 6 heads, 1024 tokens, f32, batch 1):
           train step through the real Trainer (train_state.py: AdamW, clip, EMA, guard) and
           a jitted forward; MFU = analytic FLOPs (sorajax.flops) / time / ceiling.
  toy      the demo's DiT-stage step (configs/toy.py: batch 32, 48 tokens, toy text encoder
           trained) through the same Trainer.
  sampler  the toy model's jitted sampling loop (sampler.sample, euler, CFG, config steps)
           against one model call of the same batch.
  vae      WanVAE encode / decode per frame (Wan 2.1 VAE layout at a third of its width).
  torch    (--torch-python) diffusers' WanTransformer3DModel / AutoencoderKLWan at the same
           configs: dit_train/forward_speedup_vs_torch, vae_decode_speedup_vs_torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# DiT-S-like: hidden 384 = 6 heads x 64, MLP 4x, 12 layers; latents (4, 32, 32) -> 1024 tokens.
FULL = dict(
    repeats=5, matmul_sizes=(2048, 3072),
    dit=dict(heads=6, head_dim=64, layers=12, ffn=1536, text_dim=384, channels=16,
             latent=(4, 32, 32), text_len=64, batch=1, unrolled_variant=True),
    # None: the config's dit_train.batch_size / layers (what `make demo` trains).
    toy=dict(batch=None, layers=None),
    sampler=dict(batch=4, steps=None, layers=None, step_cache=0.2),  # steps None: the config's sample.steps
    # The DiT-S loop with the text K/V once per sample vs per step: Wan's 512-token prompts.
    text_kv=dict(text_len=512, steps=10, latent=(4, 16, 32)),
    # Wan 2.1's VAE (4x8x8, z 16, 2 res blocks, 4 levels) at base_dim 32 instead of 96.
    vae=dict(base_dim=32, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
             temporal_downsample=(False, True, True), frames=5, height=64, width=64),
)
QUICK = dict(
    repeats=2, matmul_sizes=(256,),
    dit=dict(heads=2, head_dim=16, layers=1, ffn=64, text_dim=32, channels=4,
             latent=(2, 8, 8), text_len=8, batch=1, unrolled_variant=False),
    toy=dict(batch=2, layers=1),
    sampler=dict(batch=1, steps=2, layers=1, step_cache=0.2),
    text_kv=dict(text_len=16, steps=2, latent=(2, 8, 8)),
    vae=dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
             temporal_downsample=(False, True, True), frames=5, height=16, width=16),
)
# key -> () -> median seconds: the jax timings the diffusers comparison uses, timed again right
# after torch_bench.py so that each ratio brackets the torch run in time (load drifts).
RETIME: dict = {}
STEP_CACHE_NOTE = ("the same loop with the step cache at sample.step_cache = step_cache_threshold "
                   "on the benchmark's random-weight toy model: the speed-up follows the share of "
                   "model calls that ran the blocks (step_cache_block_run_fraction); its cost on "
                   "the world metrics of a trained model is in docs/PERFORMANCE.md")


# ==============================================================================================
# Timing helpers
# ==============================================================================================
def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of fn() over `repeats` runs after `warmup` runs; fn must block
    (block_until_ready) before returning."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def timed(fn):
    """(result, seconds) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def measure_cpu_matmul_ceiling(sizes=(2048, 3072), repeats: int = 5) -> tuple[float, dict]:
    """The f32 matmul ceiling of this machine: the best GFLOP/s (2n^3 FLOPs / median time) of
    jitted n x n @ n x n f32 matmuls over `sizes`, with the default matmul precision (full f32
    on CPU). Returns (ceiling, {n: GFLOP/s}). Square sizes from 2048 up saturate XLA:CPU's
    Eigen/oneDNN GEMM on these machines; smaller ones fall short of it."""
    import jax
    import jax.numpy as jnp

    mm = jax.jit(lambda a, b: a @ b)
    by_size = {}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.float32)
        b = jax.random.normal(kb, (n, n), jnp.float32)
        med, _ = median_time(lambda: mm(a, b).block_until_ready(), repeats)
        by_size[int(n)] = 2.0 * n ** 3 / med / 1e9
    return max(by_size.values()), by_size


# ==============================================================================================
# Sections
# ==============================================================================================
def _dit_cfg(spec):
    from sorajax.models import dit as dit_lib

    return dit_lib.VARIANTS["wan2.1-1.3b"](
        num_attention_heads=spec["heads"], attention_head_dim=spec["head_dim"], ffn_dim=spec["ffn"],
        num_layers=spec["layers"], in_channels=spec["channels"], out_channels=spec["channels"],
        text_dim=spec["text_dim"])


def _diffusers_dit_config(cfg) -> dict:
    """The WanTransformer3DModel kwargs of a DiTConfig (convert.py's mapping, reversed)."""
    return dict(patch_size=list(cfg.patch_size), num_attention_heads=cfg.num_attention_heads,
                attention_head_dim=cfg.attention_head_dim, in_channels=cfg.in_channels,
                out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=cfg.rope_max_seq_len)


def _dit_only_stage():
    """A Stage training a bare WanDiT on given latents and text embeddings with the DiT stage's
    rectified-flow loss, so the benchmark runs the real Trainer step (no VAE, no text encoder)."""
    import jax
    from flax import nnx

    from sorajax import flow, stages
    from sorajax.models import dit as dit_lib

    class DiTOnlyStage(stages.Stage):
        name = "dit"

        def __init__(self, config, dit_cfg):
            super().__init__(config, "/nonexistent")
            self.dit_cfg = dit_cfg

        @property
        def workdir(self):
            return self.run_dir

        def build(self, rngs):
            return dit_lib.WanDiT(self.dit_cfg, rngs=rngs)

        def trainable(self):
            return nnx.Param

        def source(self, mesh):
            raise NotImplementedError("the benchmark feeds synthetic batches")

        def loss(self, model, batch, key):
            x0, ctx = batch["latents"], batch["context"]  # (B, F, H, W, C), (B, L, text_dim)
            k_sigma, k_noise = jax.random.split(key)
            f = self.config.flow
            sigma = flow.sample_sigmas(k_sigma, (x0.shape[0],), logit_mean=f.logit_mean,
                                       logit_std=f.logit_std, shift=f.shift)
            noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
            v = model(flow.add_noise(x0, noise, sigma), sigma * 1000.0, ctx)
            return flow.flow_loss(v, flow.velocity_target(x0, noise)), {}

    return DiTOnlyStage


def synthetic_state(trainer, seed: int = 0):
    """A train state with the Trainer's structure, dtypes and shardings, filled on the host
    (weights ~ N(0, 0.02^2), optimizer moments and counters 0, as after init) instead of running
    Trainer.init: timings do not depend on the values, and compiling the init program of every
    model part (frozen VAE included) costs more than the whole --quick benchmark."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        dt = np.dtype(leaf.dtype)
        top = str(getattr(path[0], "key", ""))
        if top in ("params", "frozen", "ema") and np.issubdtype(dt, np.floating):
            return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(dt)
        return np.zeros(leaf.shape, dt)

    host = jax.tree_util.tree_map_with_path(fill, trainer.abstract)
    return jax.block_until_ready(jax.device_put(host, trainer.shardings))


def random_model(build, seed: int = 0):
    """(graphdef, state) of the module `build()` makes, built abstractly (nnx.eval_shape) and
    filled on the host like synthetic_state: eager random init dispatches and compiles one small
    program per parameter shape, seconds of start-up that measure nothing."""
    import jax
    import numpy as np
    from flax import nnx

    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(nnx.eval_shape(build))

    def fill(leaf):
        dt = np.dtype(leaf.dtype)
        if np.issubdtype(dt, np.floating):
            return jax.numpy.asarray((0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(dt))
        return jax.numpy.zeros(leaf.shape, dt)

    return graphdef, jax.tree.map(fill, abstract)


def _train_loop(trainer, batch, repeats):
    """Compiles the Trainer's step, then times it (the state is donated and threaded through).
    Returns (state, median s, all times, compile s, state set-up s, XLA flops)."""
    import jax

    state, t_init = timed(lambda: synthetic_state(trainer))
    compiled, t_compile = timed(lambda: trainer.step_fn().lower(state, batch).compile())
    box = [state]

    def step():
        box[0], metrics = compiled(box[0], batch)
        jax.block_until_ready((box[0], metrics))

    med, times = median_time(step, repeats)
    retime = lambda: median_time(step, repeats, 0)[0]  # noqa: E731
    return box[0], med, times, t_compile, t_init, xla_flops(compiled), retime


def bench_dit(spec, repeats, ceiling, out):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import config_base, flops, sharding
    from sorajax.train_state import Trainer

    cfg = _dit_cfg(spec)
    config = config_base.get_config()
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer = Trainer(_dit_only_stage()(config, cfg), config, mesh)
    B, (F, H, W), L = spec["batch"], spec["latent"], spec["text_len"]
    kx, kc = jax.random.split(jax.random.key(0))
    batch = {"latents": jax.random.normal(kx, (B, F, H, W, cfg.in_channels), jnp.float32),
             "context": jax.random.normal(kc, (B, L, cfg.text_dim), jnp.float32)}
    n = flops.dit_tokens(cfg, (F, H, W))
    fwd_flops = B * flops.dit_forward_flops(cfg, n, L)
    train_flops = flops.dit_train_step_flops(cfg, None, B, (F, H, W), L, text_trainable=False)
    state, med, times, t_comp, t_init, xla, RETIME["dit_train_step_s"] = _train_loop(trainer, batch, repeats)
    out.update(dit_config=dict(spec, tokens=n, dtype=str(cfg.dtype), remat=str(cfg.remat),
                               scan_layers=cfg.scan_layers, attention=cfg.attention,
                               params=int(sum(x.size for x in jax.tree.leaves(state["params"])))),
               dit_train_step_s=med, dit_train_step_all_s=times, dit_train_compile_s=t_comp,
               dit_train_state_setup_s=t_init, dit_train_flops=train_flops, dit_train_xla_flops=xla,
               dit_train_tokens_per_s=B * n / med, dit_train_gflops=train_flops / med / 1e9,
               dit_train_mfu=train_flops / med / (ceiling * 1e9))

    if spec.get("unrolled_variant"):
        # The same model with its blocks unrolled (DiTConfig.scan_layers=False; the default scans
        # them): XLA:CPU compiles and runs the unrolled 12-block backward far slower
        # (docs/PERFORMANCE.md), which is why the default changed.
        scfg = dataclasses.replace(cfg, scan_layers=False)
        strainer = Trainer(_dit_only_stage()(config, scfg), config, mesh)
        _, smed, stimes, st_comp, _, _, RETIME["dit_train_unrolled_step_s"] = _train_loop(
            strainer, batch, repeats)
        out.update(dit_train_unrolled_step_s=smed, dit_train_unrolled_step_all_s=stimes,
                   dit_train_unrolled_compile_s=st_comp, dit_train_unrolled_mfu=train_flops / smed / (ceiling * 1e9))

    graphdef = trainer.graphdef
    fwd = jax.jit(lambda p, f, x, t, c: nnx.merge(graphdef, p, f)(x, t, c))
    t = jnp.full((B,), 500.0, jnp.float32)
    # Copies: the train state is donated again when its step is re-timed (RETIME).
    params, frozen = jax.tree.map(jnp.copy, (state["params"], state["frozen"]))
    args = (params, frozen, batch["latents"], t, batch["context"])
    compiled, t_comp = timed(lambda: fwd.lower(*args).compile())
    med, times = median_time(lambda: compiled(*args).block_until_ready(), repeats)
    RETIME["dit_forward_s"] = lambda: median_time(lambda: compiled(*args).block_until_ready(), repeats)[0]
    out.update(dit_forward_s=med, dit_forward_all_s=times, dit_forward_compile_s=t_comp,
               dit_forward_flops=fwd_flops, dit_forward_xla_flops=xla_flops(compiled),
               dit_forward_tokens_per_s=B * n / med, dit_forward_gflops=fwd_flops / med / 1e9,
               dit_forward_mfu=fwd_flops / med / (ceiling * 1e9))
    return cfg


class _StubTokenizer:
    """What DiTStage needs of a tokenizer (vocab size, encode) without training one: the step's
    cost does not depend on the ids."""

    def __init__(self, vocab_size):
        self.vocab_size = int(vocab_size)

    def encode(self, texts, max_length):
        import numpy as np

        ids = np.zeros((len(texts), max_length), np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        ids[:, 0], mask[:, 0] = 1, 1
        return ids, mask, [False] * len(texts)


def _toy_config(layers: int | None = None):
    """configs/toy.py as `make demo` trains it; `layers` (--quick only) shrinks the DiT and the
    text encoder to that many layers so that the test compiles in seconds."""
    from sorajax import config_lib

    config = config_lib.load_config(os.path.join(ROOT, "configs", "toy.py"))
    if layers:
        with config.unlocked():
            config.dit.overrides = dict(config.dit.overrides, num_layers=layers)
            config.text.overrides = dict(config.text.overrides, num_layers=layers)
    return config


def bench_toy(spec, repeats, ceiling, out):
    """The demo's DiT-stage step: configs/toy.py, its batch and shapes, the real DiTStage and
    Trainer (DiT + trained toy text encoder + frozen toy VAE; AdamW, clip, EMA)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sorajax import flops, sharding, stages
    from sorajax.models import vae as vae_lib
    from sorajax.models import video
    from sorajax.train_state import Trainer

    config = _toy_config(spec["layers"])
    B = int(spec["batch"] or config.dit_train.batch_size)
    L = int(config.text.max_length)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    stage = stages.DiTStage(config, "/nonexistent", _StubTokenizer(config.text.vocab_size))
    vae_cfg, dit_cfg, text_cfg = stage.cfgs
    # The DiT's window (dit_train.clip_frames), as the step sees it after cropping the clip.
    lat = vae_lib.latent_shape(vae_cfg, video.window_frames(config), config.data.height, config.data.width)
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.standard_normal((B, *lat)), jnp.float32),
             "ids": jnp.asarray(rng.integers(2, text_cfg.vocab_size, (B, L)), jnp.int32),
             "mask": jnp.ones((B, L), jnp.int32)}
    trainer = Trainer(stage, config, mesh)
    _, med, times, t_comp, _, xla, _ = _train_loop(trainer, batch, repeats)
    fl = flops.dit_train_step_flops(dit_cfg, text_cfg, B, lat[:3], L,
                                    text_trainable=bool(config.text.trainable))
    out.update(toy_config=dict(batch=B, latent=list(lat), tokens=flops.dit_tokens(dit_cfg, lat[:3]),
                               text_len=L, text_trainable=bool(config.text.trainable),
                               dit_layers=dit_cfg.num_layers, text_layers=text_cfg.num_layers),
               toy_train_step_s=med, toy_train_step_all_s=times, toy_train_compile_s=t_comp,
               toy_train_flops=fl, toy_train_xla_flops=xla, toy_train_gflops=fl / med / 1e9,
               toy_train_mfu=fl / med / (ceiling * 1e9))


def bench_sampler(spec, repeats, out):
    """sampler.sample's jitted loop (no decode) on the toy model vs one CFG model call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import sampler
    from sorajax.models import vae as vae_lib
    from sorajax.models import video

    config = _toy_config(spec["layers"])
    s = config.sample
    steps, B, L = int(spec["steps"] or s.steps), int(spec["batch"]), int(config.text.max_length)
    cfgs = video.model_configs(config, vocab_size=config.text.vocab_size)
    graphdef, state = random_model(lambda: video.VideoModel(*cfgs, rngs=nnx.Rngs(0)))
    lat = vae_lib.latent_shape(cfgs[0], video.window_frames(config), config.data.height, config.data.width)
    noise = jax.random.normal(jax.random.key(1), (B, *lat), jnp.float32)
    ids = jax.random.randint(jax.random.key(2), (B, L), 2, cfgs[2].vocab_size, jnp.int32)
    mask = jnp.ones((B, L), jnp.int32)
    nids, nmask = jnp.ones((B, L), jnp.int32), jnp.zeros((B, L), jnp.int32).at[:, 0].set(1)
    kw = dict(steps=steps, shift=float(s.shift), guidance=float(s.guidance), solver=str(s.solver),
              decode=False)

    def loop():
        return jax.block_until_ready(sampler.sample(graphdef, state, noise, ids, mask, nids, nmask, **kw)[0])

    _, t_first = timed(loop)
    t_loop, loop_all = median_time(loop, repeats, warmup=0)

    use_cfg = float(s.guidance) != 1.0
    def encode_fn(st, a, b, c, d):  # once per generation: the prompts and their cross-attention K/V
        model = nnx.merge(graphdef, st)
        ctx = model.encode_text(a, b)
        if use_cfg:
            ctx = jnp.concatenate([ctx, model.encode_text(c, d)])
        return model.text_kv(ctx)

    encode = jax.jit(encode_fn)
    kv = encode(state, ids, mask, nids, nmask)
    t_text, _ = median_time(lambda: jax.block_until_ready(encode(state, ids, mask, nids, nmask)), 3 * repeats)
    call = jax.jit(lambda st, x, sig, kv, g: sampler._cfg_velocity(  # the loop body's model call
        nnx.merge(graphdef, st), x, sig, kv, g, use_cfg))
    args = (state, noise, jnp.float32(0.5), kv, jnp.float32(s.guidance))
    t_call, call_all = median_time(lambda: call(*args).block_until_ready(), 4 * repeats)
    out.update(sampler_config=dict(batch=B, steps=steps, solver=str(s.solver), guidance=float(s.guidance),
                                   latent=list(lat), cfg_batch=2 * B if use_cfg else B),
               sampler_loop_s=t_loop, sampler_loop_all_s=loop_all, sampler_step_s=t_loop / steps,
               sampler_model_call_s=t_call, sampler_text_encode_s=t_text,
               sampler_compile_s=max(t_first - t_loop, 0.0),
               # The loop minus the once-per-generation prompt encoding, against steps model calls.
               sampler_loop_overhead=(t_loop - t_text) / (steps * t_call) - 1.0,
               sampler_loop_overhead_incl_text=t_loop / (steps * t_call) - 1.0)

    thr = float(spec["step_cache"])
    full = sampler.sample(graphdef, state, noise, ids, mask, nids, nmask, **kw)[0]
    cached = lambda: sampler.sample(graphdef, state, noise, ids, mask, nids, nmask, step_cache=thr, stats=True, **kw)
    lat_c, _, st = cached()
    t_cache, _ = median_time(lambda: jax.block_until_ready(cached()[0]), repeats)
    out.update(step_cache_threshold=thr, step_cache_loop_s=t_cache, step_cache_speedup=t_loop / t_cache,
               step_cache_block_run_fraction=st["block_runs"] / st["model_calls"],
               step_cache_max_abs_diff=float(jnp.abs(lat_c - full).max()), step_cache_note=STEP_CACHE_NOTE)


class DiTVelocity:
    """A bare WanDiT as the model sampler._cfg_velocity calls (velocity(x, sigma, ctx, text_kv)),
    for the sampler timings of a DiT without a VAE or text encoder (also scripts/gpu_bench.py)."""

    def __init__(self, dit):
        self.dit = dit

    def velocity(self, x, sigma, ctx, text_kv=None, start=None):
        return self.dit(x, sigma * 1000.0, ctx, text_kv=text_kv, start=start)


def bench_text_kv(dit_spec, spec, repeats, out):
    """The denoising loop (Euler, CFG batch 2) of the DiT of the dit section with every block's
    text cross-attention keys/values computed once per sample (what sorajax.sampler does) vs
    recomputed in every step: the speed-up, and the two loops' largest output difference."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import flow, sampler
    from sorajax.models import dit as dit_lib

    cfg = _dit_cfg(dit_spec)
    graphdef, state = random_model(lambda: dit_lib.WanDiT(cfg, rngs=nnx.Rngs(0)))
    steps, L = int(spec["steps"]), int(spec["text_len"])
    x = jax.random.normal(jax.random.key(0), (1, *spec["latent"], cfg.in_channels), jnp.float32)
    ctx = jax.random.normal(jax.random.key(1), (2, L, cfg.text_dim), jnp.float32)  # prompt, negative
    sig = jnp.asarray(flow.flow_match_sigmas(steps, 1.0))

    def per_step(st, x, ctx, sig):
        m = DiTVelocity(nnx.merge(graphdef, st))

        def vel(x, s):
            v = m.velocity(jnp.concatenate([x, x]), jnp.full((2,), s), ctx)
            return v[1:] + 5.0 * (v[:1] - v[1:])
        return sampler._euler(vel, x, sig)

    def once(st, x, ctx, sig):
        m = DiTVelocity(nnx.merge(graphdef, st))
        kv = m.dit.text_kv(ctx)
        return sampler._euler(lambda x, s: sampler._cfg_velocity(m, x, s, kv, 5.0, True), x, sig)

    a, b = jax.jit(per_step), jax.jit(once)
    diff = float(jnp.abs(a(state, x, ctx, sig) - b(state, x, ctx, sig)).max())
    t_a, _ = median_time(lambda: a(state, x, ctx, sig).block_until_ready(), repeats)
    t_b, _ = median_time(lambda: b(state, x, ctx, sig).block_until_ready(), repeats)
    out.update(text_kv_config=dict(tokens=dit_lib.num_tokens(cfg, x.shape), text_len=L, steps=steps),
               sampler_text_kv_per_step_s=t_a, sampler_text_kv_once_s=t_b,
               sampler_text_kv_speedup=t_a / t_b, sampler_text_kv_max_abs_diff=diff)


def _vae_cfg(spec):
    from sorajax.models import vae as vae_lib

    return vae_lib.VAEConfig(base_dim=spec["base_dim"], z_dim=spec["z_dim"], dim_mult=tuple(spec["dim_mult"]),
                             num_res_blocks=spec["num_res_blocks"],
                             temporal_downsample=tuple(spec["temporal_downsample"]))


def bench_vae(spec, repeats, ceiling, out):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import flops
    from sorajax.models import vae as vae_lib

    cfg = _vae_cfg(spec)
    T, H, W = spec["frames"], spec["height"], spec["width"]
    graphdef, state = random_model(lambda: vae_lib.WanVAE(cfg, rngs=nnx.Rngs(0)))
    lat = vae_lib.latent_shape(cfg, T, H, W)
    x = jax.random.uniform(jax.random.key(1), (1, T, H, W, 3), jnp.float32, -1.0, 1.0)
    z = jax.random.normal(jax.random.key(2), (1, *lat), jnp.float32)
    enc = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x)[0])
    dec = jax.jit(lambda st, z: nnx.merge(graphdef, st).decode(z))
    enc_c, t_enc_c = timed(lambda: enc.lower(state, x).compile())
    dec_c, t_dec_c = timed(lambda: dec.lower(state, z).compile())
    t_enc, _ = median_time(lambda: enc_c(state, x).block_until_ready(), repeats)
    t_dec, dec_all = median_time(lambda: dec_c(state, z).block_until_ready(), repeats)
    RETIME["vae_decode_s"] = lambda: median_time(lambda: dec_c(state, z).block_until_ready(), repeats)[0]
    dec_fl = flops.vae_decode_flops(cfg, T, H, W)
    params = int(sum(a.size for a in jax.tree.leaves(state)))
    out.update(vae_config=dict(spec, latent=list(lat), params=params),
               vae_encode_s=t_enc, vae_decode_s=t_dec, vae_decode_all_s=dec_all,
               vae_encode_per_frame_s=t_enc / T, vae_decode_per_frame_s=t_dec / T,
               vae_encode_compile_s=t_enc_c, vae_decode_compile_s=t_dec_c,
               vae_decode_flops=dec_fl, vae_decode_mfu=dec_fl / t_dec / (ceiling * 1e9),
               vae_encode_mfu=flops.vae_encode_flops(cfg, T, H, W) / t_enc / (ceiling * 1e9))


def bench_torch(torch_python, dit_spec, dit_cfg, vae_spec, repeats, threads, matmul_size, out):
    """Runs scripts/torch_bench.py under `torch_python` on the same configs and shapes."""
    vae_cfg = _vae_cfg(vae_spec)
    lat = out.get("vae_config", {}).get("latent")
    spec = dict(
        repeats=repeats, warmup=1, threads=threads, matmul_size=int(matmul_size),
        dit=dict(config=_diffusers_dit_config(dit_cfg), batch=dit_spec["batch"],
                 latent=list(dit_spec["latent"]), text_len=dit_spec["text_len"]),
        vae=dict(config=dict(base_dim=vae_cfg.base_dim, z_dim=vae_cfg.z_dim, dim_mult=list(vae_cfg.dim_mult),
                             num_res_blocks=vae_cfg.num_res_blocks, attn_scales=[],
                             temperal_downsample=list(vae_cfg.temporal_downsample), dropout=0.0),
                 latent=lat))
    with tempfile.TemporaryDirectory() as d:
        spec_path, res_path = os.path.join(d, "spec.json"), os.path.join(d, "torch.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([torch_python, os.path.join(ROOT, "scripts", "torch_bench.py"),
                               "--spec", spec_path, "--out", res_path],
                              env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not os.path.exists(res_path):
            raise RuntimeError(f"torch_bench.py exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        with open(res_path) as f:
            res = json.load(f)
    out["torch"] = res
    got = [res.get(k) for k in ("matmul_gflops_start", "matmul_gflops_end") if res.get(k)]
    out["torch_matmul_gflops"] = statistics.median(got) if got else None
    for name in res.get("errors", {}):
        out["errors"][f"torch.{name}"] = res["errors"][name]
    if res.get("dit_params") is not None and out.get("dit_config"):
        out["torch_same_dit_params"] = res["dit_params"] == out["dit_config"]["params"]
    if res.get("vae_params") is not None and out.get("vae_config"):
        out["torch_same_vae_params"] = res["vae_params"] == out["vae_config"]["params"]
    # Each jax time again, now: the ratio uses the geometric mean of the runs before and after
    # torch (which ran in between), so that a load change during the torch run hits both sides.
    for key, fn in RETIME.items():
        if out.get(key):
            out[f"{key}_after_torch"] = after = fn()
            out[f"{key}_bracketing_torch"] = math.sqrt(out[key] * after)
    for key, ours, theirs in (("dit_train", "dit_train_step_s", "dit_train_s"),
                              ("dit_train_unrolled", "dit_train_unrolled_step_s", "dit_train_s"),
                              ("dit_forward", "dit_forward_s", "dit_forward_s"),
                              ("vae_decode", "vae_decode_s", "vae_decode_s")):
        t_ours, t_theirs = out.get(f"{ours}_bracketing_torch"), res.get(theirs)
        out[f"{key}_speedup_vs_torch"] = t_theirs / t_ours if t_theirs and t_ours else None


# ==============================================================================================
# Report
# ==============================================================================================
ROWS = (  # (key, label, format)
    ("matmul_ceiling_gflops", "f32 matmul ceiling (GFLOP/s)", "{:.1f}"),
    ("dit_train_step_s", "DiT-S train step (s)", "{:.3f}"),
    ("dit_train_tokens_per_s", "DiT-S train tokens/s", "{:.0f}"),
    ("dit_train_mfu", "DiT-S train MFU (of ceiling)", "{:.3f}"),
    ("dit_train_unrolled_step_s", "  same, scan_layers=False (s)", "{:.3f}"),
    ("dit_train_unrolled_mfu", "  same, scan_layers=False MFU", "{:.3f}"),
    ("dit_train_unrolled_compile_s", "  same, scan_layers=False compile (s)", "{:.1f}"),
    ("dit_forward_s", "DiT-S forward (s)", "{:.3f}"),
    ("dit_forward_mfu", "DiT-S forward MFU (of ceiling)", "{:.3f}"),
    ("dit_train_compile_s", "DiT-S train step compile (s)", "{:.1f}"),
    ("dit_forward_compile_s", "DiT-S forward compile (s)", "{:.1f}"),
    ("toy_train_step_s", "toy DiT-stage step (s)", "{:.4f}"),
    ("toy_train_mfu", "toy DiT-stage MFU (of ceiling)", "{:.3f}"),
    ("toy_train_compile_s", "toy step compile (s)", "{:.1f}"),
    ("sampler_step_s", "sampler time per step (s)", "{:.4f}"),
    ("sampler_loop_s", "sampler whole loop (s)", "{:.3f}"),
    ("sampler_model_call_s", "one CFG model call (s)", "{:.4f}"),
    ("sampler_loop_overhead", "sampler loop overhead", "{:+.3f}"),
    ("sampler_compile_s", "sampler compile (s)", "{:.1f}"),
    ("sampler_text_kv_speedup", "text K/V once vs per step (x)", "{:.3f}"),
    ("vae_encode_per_frame_s", "VAE encode per frame (s)", "{:.4f}"),
    ("vae_decode_per_frame_s", "VAE decode per frame (s)", "{:.4f}"),
    ("vae_decode_mfu", "VAE decode MFU (of ceiling)", "{:.3f}"),
    ("vae_decode_compile_s", "VAE decode compile (s)", "{:.1f}"),
    ("dit_train_speedup_vs_torch", "DiT train speed-up vs diffusers", "{:.2f}x"),
    ("dit_train_unrolled_speedup_vs_torch", "  same, scan_layers=False", "{:.2f}x"),
    ("dit_forward_speedup_vs_torch", "DiT forward speed-up vs diffusers", "{:.2f}x"),
    ("vae_decode_speedup_vs_torch", "VAE decode speed-up vs diffusers", "{:.2f}x"),
    ("step_cache_speedup", "step cache speed-up", "{:.2f}x"),
    ("matmul_ceiling_end_gflops", "f32 matmul ceiling at the end", "{:.1f}"),
    ("torch_matmul_gflops", "torch f32 matmul 2048 (GFLOP/s)", "{:.1f}"),
    ("peak_rss_mib", "peak memory (RSS, MiB)", "{:.0f}"),
    ("total_s", "benchmark wall time (s)", "{:.0f}"),
)


def table(res) -> str:
    lines = [f"{'figure':<36} value", "-" * 50]
    for key, label, fmt in ROWS:
        v = res.get(key)
        lines.append(f"{label:<36} {fmt.format(v) if isinstance(v, (int, float)) else 'n/a'}")
    return "\n".join(lines)


def _versions() -> dict:
    import flax
    import jax
    import jaxlib

    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                    if ln.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                flax=flax.__version__, cpu=cpu, cores=len(os.sched_getaffinity(0)),
                backend=jax.default_backend(), devices=jax.device_count(),
                matmul_precision=str(jax.config.jax_default_matmul_precision),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                compilation_cache=os.environ.get("JAX_COMPILATION_CACHE_DIR", ""))


def run(suite: str, quick: bool, torch_python: str | None, repeats: int | None = None) -> dict:
    if suite != "cpu":
        raise SystemExit(f"error: unknown suite {suite!r} (known: cpu; GPU: scripts/gpu_bench.sh)")
    import sorajax  # noqa: F401  (flax eager sharding off)

    sizes = QUICK if quick else FULL
    reps = int(repeats or sizes["repeats"])
    t0 = time.perf_counter()
    res = dict(suite=suite, quick=quick, repeats=reps, errors={},
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               versions=_versions(), dit_train_speedup_vs_torch=None, dit_forward_speedup_vs_torch=None,
               vae_decode_speedup_vs_torch=None)
    threads = res["versions"]["cores"]
    res["matmul_ceiling_gflops"], res["matmul_gflops_by_size"] = measure_cpu_matmul_ceiling(
        sizes["matmul_sizes"], reps)
    print(f"[benchmark] matmul ceiling {res['matmul_ceiling_gflops']:.1f} GFLOP/s", flush=True)
    dit_cfg = None
    sections = (
        ("dit", lambda c: bench_dit(sizes["dit"], reps, c, res)),
        ("toy", lambda c: bench_toy(sizes["toy"], reps, c, res)),
        ("sampler", lambda c: bench_sampler(sizes["sampler"], reps, res)),
        ("text_kv", lambda c: bench_text_kv(sizes["dit"], sizes["text_kv"], reps, res)),
        ("vae", lambda c: bench_vae(sizes["vae"], reps, c, res)),
    )
    res["matmul_ceiling_by_section"] = {}
    for name, fn in sections:
        try:
            # Each section's MFU divides by the ceiling measured just before it (at the first
            # size; the best of all sizes at the start): a shared machine's load drifts.
            c, _ = measure_cpu_matmul_ceiling(sizes["matmul_sizes"][:1], reps)
            ceiling = res["matmul_ceiling_by_section"][name] = max(c, 1e-9)
            got, secs = timed(lambda: fn(ceiling))
            if name == "dit":
                dit_cfg = got
            print(f"[benchmark] {name} done in {secs:.0f} s", flush=True)
        except Exception as e:  # report and go on: one failure must not lose the rest
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"[benchmark] {name} FAILED: {res['errors'][name]}", flush=True)
        res[f"peak_rss_after_{name}_mib"] = peak_rss_mib()
    # The ceiling again: the machine's load drifts over a long run (shared machines).
    res["matmul_ceiling_end_gflops"], _ = measure_cpu_matmul_ceiling(sizes["matmul_sizes"][:1], reps)
    if torch_python:
        try:
            bench_torch(torch_python, sizes["dit"], dit_cfg or _dit_cfg(sizes["dit"]), sizes["vae"], reps,
                        threads, sizes["matmul_sizes"][0], res)
            print("[benchmark] torch done", flush=True)
        except Exception as e:
            res["errors"]["torch"] = f"{type(e).__name__}: {e}"
            print(f"[benchmark] torch FAILED: {res['errors']['torch']}", flush=True)
    res["peak_rss_mib"] = peak_rss_mib()
    res["total_s"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="cpu", choices=["cpu"],
                    help="what to measure (GPU: scripts/gpu_bench.sh)")
    ap.add_argument("--out", required=True, help="JSON file to write (atomically)")
    ap.add_argument("--torch-python", default=None,
                    help="a Python with torch (CPU) and diffusers: also time diffusers at the same configs")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (seconds; for tests)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5, quick 2)")
    a = ap.parse_args(argv)
    from sorajax import fileio

    res = run(a.suite, a.quick, a.torch_python, a.repeats)
    print(table(res))
    if res["errors"]:
        print("errors: " + json.dumps(res["errors"], indent=1))
    fileio.write_json(a.out, res)
    print(f"wrote {a.out}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
