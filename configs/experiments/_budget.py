"""The shared budget of the toy ablations: the toy config (configs/toy.py), its DiT trained for
700 steps instead of the demo's 1,500, no end-of-run samples; ~3 min per DiT run on 2 CPU
cores, so that an experiment of 2 training arms x 3 seeds (the VAE, 6 DiT runs, 6 benchmark
passes) runs alone in under 30 minutes. Arms that share it and their training settings share
runs (sorajax/experiments.py)."""

BASE = "configs/toy.py"
OVERRIDES = ("--config.dit_train.steps=700", "--config.dit_train.ckpt_every=350",
             "--config.dit_train.sample_at_end=False")
# :runlocal -- the same path at smoke-test size (tests/test_experiments.py).
RUNLOCAL_BASE = "configs/toy.py:runlocal"
RUNLOCAL_OVERRIDES = ("--config.dit_train.sample_at_end=False", "--config.sample.steps=2")
RUNLOCAL_PROMPTS = 4


def budget(arg: str):
    """(base, overrides, num_prompts) for get_experiment(arg)."""
    if arg == "runlocal":
        return RUNLOCAL_BASE, RUNLOCAL_OVERRIDES, RUNLOCAL_PROMPTS
    if arg:
        raise ValueError(f"unknown argument {arg!r} (known: runlocal)")
    return BASE, OVERRIDES, None
