"""Toy text-to-video model on the synthetic world, trained end to end on one CPU machine.

Launch (what `make demo` runs):
    python -m sorajax.train --config configs/toy.py --workdir runs/toy
Tiny smoke variant (seconds; used by tests):
    python -m sorajax.train --config configs/toy.py:runlocal --workdir /tmp/toy_smoke

Two stages in one run: the causal VAE (spacetime compression 4x4x4) trains first into
WORKDIR/vae, then the DiT and the small T5-style text encoder train on the frozen VAE's latents
into WORKDIR. 9-frame 32x32 clips -> 3x8x8x8 latents -> 48 tokens with (1, 2, 2) patches.
The declared defaults (sorajax/config_base.py) are this model; this file adds the tiny variant.
"""
from sorajax import config_base


def get_config(arg: str = ""):
    c = config_base.get_config()
    if arg == "runlocal":
        c.data.num_train = 64
        c.data.num_eval = 8
        c.vae_train.update(steps=6, batch_size=8, log_every=2, ckpt_every=3)
        c.dit_train.update(steps=6, batch_size=8, log_every=2, ckpt_every=3)
        c.sample.steps = 3
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    return c
