"""Build the tiny Wan 2.1 VAE parity fixtures from the PyTorch reference (diffusers).

Run from the repository root with the PyTorch reference environment (not the project's .venv):

    /work/torchvenv/bin/python scripts/make_vae_fixtures.py [--out tests/fixtures/wan_vae_tiny]

Writes OUT/config.json + OUT/diffusion_pytorch_model.safetensors (a seeded random
AutoencoderKLWan, saved with save_pretrained) and OUT/io.npz holding, in PyTorch's NCTHW layout:
  x9, x5                 pixel clips in [-1, 1], 9 and 5 frames, 16x24
  mean9, logvar9, ...    reference encode posterior (latent_dist.mean / latent_dist.logvar)
  z1, z2, z3             latents with 1, 2 and 3 frames
  dec1, dec2, dec3       reference decode(z).sample
  num_params             the torch model's parameter count
tests/test_vae.py checks sorajax.models.vae against these.
"""
import argparse
import os

import numpy as np
import torch
from diffusers import AutoencoderKLWan

# Keep in sync with VARIANTS["tiny"] in sorajax/models/vae.py.
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/wan_vae_tiny")
    args = ap.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    mean = (torch.randn(TINY["z_dim"], generator=gen) * 0.5).tolist()
    std = (torch.rand(TINY["z_dim"], generator=gen) * 1.5 + 0.5).tolist()
    model = AutoencoderKLWan(**TINY, latents_mean=mean, latents_std=std).eval()
    # Default init has tiny gammas/biases that hide bugs: randomise every parameter a little.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)

    io = {"num_params": np.array(sum(p.numel() for p in model.parameters()))}
    with torch.no_grad():
        for t in (9, 5):
            x = torch.rand(1, 3, t, 16, 24, generator=gen) * 2 - 1
            dist = model.encode(x).latent_dist
            io[f"x{t}"] = x.numpy()
            io[f"mean{t}"] = dist.mean.numpy()
            io[f"logvar{t}"] = dist.logvar.numpy()
        for t in (1, 2, 3):
            z = torch.randn(1, TINY["z_dim"], t, 2, 3, generator=gen)
            io[f"z{t}"] = z.numpy()
            io[f"dec{t}"] = model.decode(z).sample.numpy()
    np.savez_compressed(os.path.join(args.out, "io.npz"), **io)
    print("wrote", args.out, "params", int(io["num_params"]))
    for k, v in io.items():
        print(f"  {k} {v.shape} absmax {np.abs(v).max():.3g}")


if __name__ == "__main__":
    main()
