"""GPU benchmark of sorajax on one H100/H200 (about 10 minutes): what scripts/gpu_bench.sh runs.

    scripts/gpu_bench.sh [--out gpu_bench.json] [--sections matmul,attention,train,sampler] [--dry-run]

Sections, each in its own try/except (a failure is recorded under "errors" and the rest still
run) and the JSON rewritten atomically after each one, so a run cut short keeps what it measured:
  matmul     bf16 matmul ceiling: best TFLOP/s of square jitted matmuls (8192, 16384).
  attention  sorajax.models.attention.dot_product_attention, backends "xla" and "cudnn", head dim
             128, 12 heads, batch 1, 8k / 16k / 32k tokens, bf16: forward and backward TFLOP/s.
             FLOPs: forward 4·N²·H·D; backward 2.5x forward (dQ, dK, dV, dP and the recomputed
             QKᵀ: FlashAttention's convention); backward time = time(fwd+bwd) - time(fwd).
  train      Trainer step (AdamW, clip, EMA, guard: train_state.py) of a WanDiT at the 1.3B's
             widths (hidden 1536, 12 heads, MLP 8960, 30 layers), 16,384 tokens, 512 text tokens,
             bf16 compute / f32 params, cuDNN attention, scanned blocks, no remat ("dots" if that
             runs out of memory), batch 1: time, tokens/s and MFU against the chip's bf16 peak
             (sorajax.flops.peak_flops).
  sampler    the 1.3B DiT (configs/wan2_1_t2v_1p3b.py, bf16 compute, cuDNN, scanned) at 480p x 81
             frames (32,760 tokens), classifier-free guidance (batch 2): latency of one Euler step
             from the jitted loop (sampler._euler, 3 steps) and of one model call.
Medians of 5 timed runs after a warm-up (train and sampler: 3). --dry-run runs the same code
paths on CPU at tiny sizes in seconds (cudnn then falls back as attention.py documents).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import benchmark as bm  # noqa: E402  (scripts/benchmark.py: timing helpers, the DiT-only stage)

SECTIONS = ("matmul", "attention", "train", "sampler")
FULL = dict(repeats=5, slow_repeats=3, matmul_sizes=(8192, 16384), attn_tokens=(8192, 16384, 32768),
            attn_heads=12, attn_head_dim=128, train_latent=(16, 64, 64), train_layers=30, text_len=512,
            sampler_size=(81, 480, 832), sampler_steps=3, shrink={})
DRY = dict(repeats=2, slow_repeats=1, matmul_sizes=(128,), attn_tokens=(64, 128), attn_heads=2,
           attn_head_dim=128, train_latent=(2, 4, 4), train_layers=1, text_len=8,
           sampler_size=(5, 32, 32), sampler_steps=2,
           # Widths small enough for CPU (the full run keeps the 1.3B's).
           shrink=dict(num_layers=1, num_attention_heads=2, ffn_dim=256, text_dim=64))


# ==============================================================================================
# Sections
# ==============================================================================================
def bench_matmul(sz, dtype, out):
    import jax

    mm = jax.jit(lambda a, b: a @ b)
    best = {}
    for n in sz["matmul_sizes"]:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        med, _ = bm.median_time(lambda: mm(a, b).block_until_ready(), sz["repeats"])
        best[int(n)] = 2.0 * n ** 3 / med / 1e12
    out["matmul_tflops_by_size"] = best
    out["matmul_ceiling_tflops"] = max(best.values())
    if out.get("peak_tflops"):
        out["matmul_fraction_of_peak"] = out["matmul_ceiling_tflops"] / out["peak_tflops"]


def bench_attention(sz, dtype, out):
    import jax
    import jax.numpy as jnp

    from sorajax.models import attention

    H, D = sz["attn_heads"], sz["attn_head_dim"]
    rows = out.setdefault("attention", [])
    for backend in ("xla", "cudnn"):
        for n in sz["attn_tokens"]:
            row = dict(backend=backend, runs=attention._resolve(backend, dtype), tokens=n, heads=H,
                       head_dim=D)
            rows.append(row)
            try:
                ks = jax.random.split(jax.random.key(n), 4)
                q, k, v, do = (jax.random.normal(kk, (1, n, H, D), dtype) for kk in ks)
                fwd = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, backend=backend))

                def loss(q, k, v, do):
                    o = attention.dot_product_attention(q, k, v, backend=backend)
                    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))

                both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                t_f, _ = bm.median_time(lambda: fwd(q, k, v).block_until_ready(), sz["repeats"])
                t_fb, _ = bm.median_time(lambda: jax.block_until_ready(both(q, k, v, do)), sz["repeats"])
                fl = 4.0 * n * n * H * D
                t_b = t_fb - t_f  # <= 0 only when noise swamps a tiny (dry-run) case
                row.update(fwd_s=t_f, fwd_bwd_s=t_fb, fwd_tflops=fl / t_f / 1e12,
                           bwd_tflops=2.5 * fl / t_b / 1e12 if t_b > 0 else None,
                           fwd_bwd_tflops=3.5 * fl / t_fb / 1e12)
            except Exception as e:  # e.g. the xla backend's N x N logits out of memory at 32k
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[gpu_bench] attention {row}", flush=True)


def bench_train(sz, dtype, out, peak):
    import jax
    import jax.numpy as jnp

    from sorajax import config_base, flops, sharding
    from sorajax.models import dit as dit_lib
    from sorajax.train_state import Trainer

    config = config_base.get_config()
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    (F, H, W), L = sz["train_latent"], sz["text_len"]
    oom = []
    # As configs/pods/wan1p3b_8xh100.py: scanned blocks, cuDNN attention, bf16 compute. No remat
    # first (MFU counts model FLOPs only); "dots" remat if that does not fit the card.
    for remat in ("none", "dots"):
        cfg = dit_lib.VARIANTS["wan2.1-1.3b"](**{**dict(
            num_layers=sz["train_layers"], dtype=jnp.dtype(dtype).name, attention="cudnn", scan_layers=True,
            remat=remat), **sz["shrink"]})
        trainer = Trainer(bm._dit_only_stage()(config, cfg), config, mesh)
        batch = {"latents": jax.random.normal(jax.random.key(0), (1, F, H, W, cfg.in_channels), jnp.float32),
                 "context": jax.random.normal(jax.random.key(1), (1, L, cfg.text_dim), jnp.float32)}
        try:
            _, med, times, t_comp, _, xla, _ = bm._train_loop(trainer, batch, sz["slow_repeats"])
            break
        except Exception as e:  # out of memory: retry with remat
            is_oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
            if not is_oom or remat == "dots":
                raise
            oom.append(f"remat={remat}: {str(e)[:200]}")
            del trainer, batch
    out["train_oom"] = oom
    n = flops.dit_tokens(cfg, (F, H, W))
    fl = flops.dit_train_step_flops(cfg, None, 1, (F, H, W), L, text_trainable=False)
    out.update(train_config=dict(dim=cfg.dim, layers=cfg.num_layers, ffn=cfg.ffn_dim, tokens=n, text_len=L,
                                 dtype=str(cfg.dtype), attention=cfg.attention, remat=str(cfg.remat),
                                 scan_layers=cfg.scan_layers),
               train_step_s=med, train_step_all_s=times, train_compile_s=t_comp, train_flops=fl,
               train_xla_flops=xla, train_tokens_per_s=n / med, train_tflops=fl / med / 1e12,
               train_mfu=fl / med / peak if peak else None)


def bench_sampler(sz, dtype, out, peak):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import config_lib, flops, flow, sampler
    from sorajax.models import dit as dit_lib
    from sorajax.models import vae as vae_lib
    from sorajax.models import video

    config = config_lib.load_config(os.path.join(ROOT, "configs", "wan2_1_t2v_1p3b.py"))
    vae_cfg, dit_cfg, text_cfg = video.model_configs(config)
    overrides = dict(dtype=jnp.dtype(dtype).name, attention="cudnn", scan_layers=True)
    overrides.update(sz["shrink"])
    dit_cfg = dit_lib.DiTConfig(**{**dit_cfg.__dict__, **overrides})
    T, Hp, Wp = sz["sampler_size"]
    lat = vae_lib.latent_shape(vae_cfg, T, Hp, Wp)
    L = int(sz["text_len"])
    graphdef, state = bm.random_model(lambda: dit_lib.WanDiT(dit_cfg, rngs=nnx.Rngs(0)))

    g = float(config.sample.guidance)
    noise = jax.random.normal(jax.random.key(0), (1, *lat), jnp.float32)
    ctx = jax.random.normal(jax.random.key(1), (1, L, dit_cfg.text_dim), jnp.float32)
    nctx = jnp.zeros_like(ctx)
    steps = sz["sampler_steps"]
    sig = jnp.asarray(flow.flow_match_sigmas(steps, float(config.sample.shift)))

    def vel_of(st, c, nc):
        model = bm.DiTVelocity(nnx.merge(graphdef, st))
        kv = model.dit.text_kv(jnp.concatenate([c, nc]))  # once per sample, as the sampler does
        return lambda x, s: sampler._cfg_velocity(model, x, s, kv, jnp.float32(g), True)

    loop = jax.jit(lambda st, x, c, nc, sig: sampler._euler(vel_of(st, c, nc), x, sig))
    call = jax.jit(lambda st, x, c, nc: vel_of(st, c, nc)(x, jnp.float32(0.5)))
    loop_c, t_lc = bm.timed(lambda: loop.lower(state, noise, ctx, nctx, sig).compile())
    call_c, t_cc = bm.timed(lambda: call.lower(state, noise, ctx, nctx).compile())
    r = sz["slow_repeats"]
    t_loop, _ = bm.median_time(lambda: loop_c(state, noise, ctx, nctx, sig).block_until_ready(), r)
    t_call, _ = bm.median_time(lambda: call_c(state, noise, ctx, nctx).block_until_ready(), r)
    n = flops.dit_tokens(dit_cfg, lat[:3])
    fl = flops.sampler_step_flops(dit_cfg, 1, lat[:3], L, guidance=True)
    out.update(sampler_config=dict(frames=T, height=Hp, width=Wp, latent=list(lat), tokens=n, text_len=L,
                                   steps=steps, guidance=g, dtype=str(dit_cfg.dtype),
                                   layers=dit_cfg.num_layers,
                                   attention=dit_cfg.attention),
               sampler_step_s=t_loop / steps, sampler_model_call_s=t_call, sampler_loop_s=t_loop,
               sampler_compile_s=t_lc + t_cc, sampler_step_flops=fl,
               sampler_step_tflops=fl / (t_loop / steps) / 1e12,
               sampler_mfu=fl / (t_loop / steps) / peak if peak else None,
               sampler_loop_overhead=t_loop / (steps * t_call) - 1.0)


# ==============================================================================================
# Report
# ==============================================================================================
def table(res) -> str:
    def f(v, fmt):
        return fmt.format(v) if isinstance(v, (int, float)) else "n/a"

    lines = [f"card: {res.get('device_kind')} (peak bf16 {f(res.get('peak_tflops'), '{:.0f}')} TFLOP/s)",
             f"matmul ceiling ({res.get('dtype')}): {f(res.get('matmul_ceiling_tflops'), '{:.1f}')} TFLOP/s",
             f"{'attention':<10} {'runs':<7} {'tokens':>7} {'fwd TF/s':>9} {'bwd TF/s':>9}"]
    for row in res.get("attention", []):
        lines.append(f"{row['backend']:<10} {row['runs']:<7} {row['tokens']:>7} "
                     f"{f(row.get('fwd_tflops'), '{:9.1f}'):>9} {f(row.get('bwd_tflops'), '{:9.1f}'):>9}"
                     + (f"  {row['error'][:60]}" if "error" in row else ""))
    lines += [f"DiT train step: {f(res.get('train_step_s'), '{:.3f}')} s, "
              f"{f(res.get('train_tflops'), '{:.1f}')} TFLOP/s, MFU {f(res.get('train_mfu'), '{:.3f}')}",
              f"sampler step: {f(res.get('sampler_step_s'), '{:.3f}')} s (model call "
              f"{f(res.get('sampler_model_call_s'), '{:.3f}')} s), MFU {f(res.get('sampler_mfu'), '{:.3f}')}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_bench.json", help="JSON file (rewritten after every section)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, seconds (tests)")
    a = ap.parse_args(argv)
    wanted = [s for s in a.sections.split(",") if s]
    bad = sorted(set(wanted) - set(SECTIONS))
    if bad:
        print(f"error: unknown section(s) {bad}; known: {SECTIONS}", file=sys.stderr)
        return 2
    import jax

    import sorajax  # noqa: F401  (flax eager sharding off)
    from sorajax import fileio, flops

    dev = jax.devices()[0]
    sz = DRY if a.dry_run else FULL
    # bf16 on the GPU; the CPU dry run uses f32 (XLA:CPU bf16 dots are slow, and they are not
    # what the dry run checks).
    dtype = "float32" if dev.platform == "cpu" else "bfloat16"
    peak = flops.peak_flops(dev)
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               dry_run=a.dry_run, platform=dev.platform, device_kind=dev.device_kind, dtype=dtype,
               peak_tflops=peak / 1e12 if peak else None, jax=jax.__version__, errors={})
    print(f"[gpu_bench] card: {dev.device_kind} ({dev.platform}), peak bf16 "
          f"{res['peak_tflops'] or 'unknown'} TFLOP/s", flush=True)
    fns = {"matmul": lambda: bench_matmul(sz, dtype, res),
           "attention": lambda: bench_attention(sz, dtype, res),
           "train": lambda: bench_train(sz, dtype, res, peak),
           "sampler": lambda: bench_sampler(sz, dtype, res, peak)}
    t0 = time.perf_counter()
    for name in wanted:
        try:
            _, secs = bm.timed(fns[name])
            print(f"[gpu_bench] {name} done in {secs:.0f} s", flush=True)
        except Exception as e:  # record and go on
            res["errors"][name] = f"{type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc()
        res["total_s"] = time.perf_counter() - t0
        fileio.write_json(a.out, res)
    print(table(res))
    print(f"wrote {a.out}")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
