"""Build the tiny Wan 2.1 DiT parity fixture from diffusers' WanTransformer3DModel.

Run with the PyTorch reference environment (not the project venv):

    /work/torchvenv/bin/python scripts/make_dit_fixtures.py [--out tests/fixtures/wan_dit_tiny]

Writes, into the output folder:
  config.json + diffusion_pytorch_model.safetensors   (save_pretrained of a tiny random model)
  io.npz   inputs/outputs in PyTorch layout (B, C, F, H, W):
           x_f{F}, t_f{F}, out_f{F} for F in (1, 2, 3) latent frames (H=4, W=6, batch 2,
           different timesteps per example), ctx (shared text embeddings),
           x_tok, t_tok (B, N), out_tok for Wan 2.2-style per-token timesteps,
           param_count (tiny model), param_count_1_3b / param_count_14b (meta-device counts).
Every parameter is re-randomised, including those diffusers initialises to zeros/ones
(scale_shift_tables, norm affines, biases), so that parity is meaningful.
"""
import argparse
import math
import pathlib

import numpy as np
import torch
from diffusers import WanTransformer3DModel

TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
    out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)


def _count(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _rerandomise(model, gen):
    for name, p in model.named_parameters():
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or ".norm2." in name:
            # norm scales/biases near their identity values but not equal to them.
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
        elif p.ndim >= 2 and "scale_shift_table" not in name:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        else:  # biases and modulation tables
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def main(out):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = WanTransformer3DModel(**TINY).eval()
    _rerandomise(model, gen)
    model.save_pretrained(out, safe_serialization=True)

    B, C, H, W, L = 2, TINY["in_channels"], 4, 6, 7
    arrays = {"param_count": np.int64(_count(model))}
    ctx = torch.randn(B, L, TINY["text_dim"], generator=gen)
    arrays["ctx"] = ctx.numpy()
    with torch.no_grad():
        for F in (1, 2, 3):
            x = torch.randn(B, C, F, H, W, generator=gen)
            t = torch.tensor([937.0, 112.5])
            y = model(x, t, ctx, return_dict=False)[0]
            arrays[f"x_f{F}"], arrays[f"t_f{F}"], arrays[f"out_f{F}"] = x.numpy(), t.numpy(), y.numpy()
        # Per-token timesteps (Wan 2.2 TI2V path): frame 0 clean, later frames noisy.
        F = 3
        n = F * (H // 2) * (W // 2)
        x = torch.randn(B, C, F, H, W, generator=gen)
        t = torch.rand(B, n, generator=gen) * 1000.0
        t[:, : n // F] = 0.0
        y = model(x, t, ctx, return_dict=False)[0]
        arrays["x_tok"], arrays["t_tok"], arrays["out_tok"] = x.numpy(), t.numpy(), y.numpy()

    with torch.device("meta"):
        arrays["param_count_1_3b"] = np.int64(_count(WanTransformer3DModel(**WAN_1_3B)))
        arrays["param_count_14b"] = np.int64(_count(WanTransformer3DModel(**WAN_14B)))
    np.savez_compressed(out / "io.npz", **arrays)
    for f in out.iterdir():  # save_pretrained writes 0600 files; make them readable for git/CI
        f.chmod(0o644)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1024:.1f} KiB); tiny params {int(arrays['param_count'])}, "
          f"1.3B {int(arrays['param_count_1_3b'])}, 14B {int(arrays['param_count_14b'])}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "tests/fixtures/wan_dit_tiny"))
    main(ap.parse_args().out)
