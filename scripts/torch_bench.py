"""diffusers side of scripts/benchmark.py: times WanTransformer3DModel and AutoencoderKLWan on CPU.

Run with the PyTorch reference environment (not the project venv), as the fixture scripts are:

    /tmp/torchvenv/bin/python scripts/torch_bench.py --spec SPEC.json --out OUT.json

(python3.11 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 diffusers
transformers). scripts/benchmark.py --torch-python PATH writes SPEC.json (the same tiny-Wan
configs, shapes, dtype, thread count and repeats that sorajax runs in that benchmark) and reads
OUT.json; run by hand only to debug it. What is timed (medians of `repeats` runs after warm-up):

  dit_train_s    one step: noised latents -> forward -> MSE to the velocity target -> backward ->
                 clip_grad_norm_(1.0) -> AdamW -> EMA lerp of the weights: what sorajax's
                 Trainer step does (train_state.py: clip, AdamW, EMA, non-finite guard).
  dit_forward_s  one forward under torch.inference_mode().
  vae_decode_s   AutoencoderKLWan.decode of the spec's latents under inference_mode.
  matmul_gflops_start / _end   torch.mm of two 2048 x 2048 f32 matrices, before and after: the
                 machine's state while torch ran (compare benchmark.py's jax ceiling).
Weights are diffusers' random init (timings do not depend on values). Eager PyTorch, as
diffusers runs by default (no torch.compile).
"""
import argparse
import json
import os
import statistics
import time


def _median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _matmul_gflops(torch, spec):
    """torch's f32 GEMM at n = 2048 (as the jax ceiling): tells how busy the shared machine was
    while torch ran, next to the jax ceiling measured by benchmark.py."""
    n = int(spec.get("matmul_size", 2048))
    a, b = torch.randn(n, n), torch.randn(n, n)
    med, _ = _median_time(lambda: torch.mm(a, b), spec["repeats"])
    return 2.0 * n ** 3 / med / 1e9


def _dit(spec, torch, out):
    from diffusers import WanTransformer3DModel

    d = spec["dit"]
    torch.manual_seed(0)
    model = WanTransformer3DModel(**d["config"]).to(torch.float32)
    out["dit_params"] = sum(p.numel() for p in model.parameters())
    B, (F, H, W), C, L = d["batch"], d["latent"], d["config"]["in_channels"], d["text_len"]
    x0 = torch.randn(B, C, F, H, W)
    ctx = torch.randn(B, L, d["config"]["text_dim"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01, foreach=True)
    ema = [p.detach().clone() for p in params]

    def train_step():
        sigma = torch.sigmoid(torch.randn(B))  # logit-normal noise levels, as sorajax.flow
        noise = torch.randn_like(x0)
        s = sigma.view(B, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        v = model(xt, sigma * 1000.0, ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.999)
        return float(loss)

    model.train()
    out["dit_train_s"], out["dit_train_all_s"] = _median_time(train_step, spec["repeats"], spec["warmup"])
    model.eval()
    t = torch.full((B,), 500.0)

    def forward():
        with torch.inference_mode():
            return model(x0, t, ctx, return_dict=False)[0]

    out["dit_forward_s"], out["dit_forward_all_s"] = _median_time(forward, spec["repeats"], spec["warmup"])


def _vae(spec, torch, out):
    from diffusers import AutoencoderKLWan

    v = spec["vae"]
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**v["config"]).to(torch.float32).eval()
    out["vae_params"] = sum(p.numel() for p in vae.parameters())
    t, h, w, z = v["latent"]
    lat = torch.randn(1, z, t, h, w)

    def decode():
        with torch.inference_mode():
            return vae.decode(lat, return_dict=False)[0]

    out["vae_decode_s"], out["vae_decode_all_s"] = _median_time(decode, spec["repeats"], spec["warmup"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON written by scripts/benchmark.py")
    ap.add_argument("--out", required=True, help="where to write the timings (JSON)")
    a = ap.parse_args()
    with open(a.spec) as f:
        spec = json.load(f)
    import diffusers
    import torch

    torch.set_num_threads(int(spec["threads"]))
    out = {"torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
           "threads": torch.get_num_threads(), "errors": {}}
    out["matmul_gflops_start"] = _matmul_gflops(torch, spec)
    for name, fn in (("dit", _dit), ("vae", _vae)):
        try:
            fn(spec, torch, out)
        except Exception as e:  # one failing part must not lose the other's timings
            out["errors"][name] = f"{type(e).__name__}: {e}"
    out["matmul_gflops_end"] = _matmul_gflops(torch, spec)
    tmp = a.out + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
