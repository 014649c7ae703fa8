"""The shared budget of the toy ablations: the toy config (configs/toy.py), its DiT trained for
700 steps instead of the demo's 1,500, no end-of-run samples; 3.4-4 min per DiT run on 2 CPU
cores, plus one latent cache (0.5-1 min) per experiment, shared by its runs, so that an
experiment of 2 training arms x 3 seeds (the VAE, 6 DiT runs, 6 benchmark passes) runs alone in
about 30 minutes (cond_masks: 29.0 min measured with a cache per run; with the shared cache
about 6 + 26.5 min, partly on a loaded machine: docs/RESULTS.md). Arms that share it and their training settings share runs (sorajax/experiments.py)."""

from sorajax.experiments import Experiment

BASE = "configs/toy.py"
# The DiT ablations keep the toy variant's 8-wide VAE (configs/toy.py uses a 16-wide one since
# 2026-12-02): its VAE stage is half as long, which the 30-minute budget needs, every arm of an
# experiment shares it, and docs/RESULTS.md's tables were made with it.
OVERRIDES = ("--config.dit_train.steps=700", "--config.dit_train.ckpt_every=350",
             "--config.dit_train.sample_at_end=False", "--config.vae.overrides.base_dim=8")
# :runlocal -- the same path at smoke-test size (tests/test_experiments.py).
RUNLOCAL_BASE = "configs/toy.py:runlocal"
RUNLOCAL_OVERRIDES = ("--config.dit_train.sample_at_end=False", "--config.sample.steps=2")
RUNLOCAL_PROMPTS = 4


def experiment(arg: str, **fields):
    """The Experiment named by `fields` (name, question, arms, budget) on this shared budget:
    full size, or the :runlocal smoke size when arg == "runlocal"."""
    if arg == "runlocal":
        base, overrides, num_prompts = RUNLOCAL_BASE, RUNLOCAL_OVERRIDES, RUNLOCAL_PROMPTS
    elif arg:
        raise ValueError(f"unknown argument {arg!r} (known: runlocal)")
    else:
        base, overrides, num_prompts = BASE, OVERRIDES, None
    return Experiment(base=base, overrides=overrides, num_prompts=num_prompts, **fields)
