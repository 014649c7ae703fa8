"""The shared budget of the toy ablations: the toy config (configs/toy.py), its DiT trained for
1,000 steps instead of the demo's 1,500, no end-of-run samples; ~4.5 min per DiT run on 2 CPU
cores. Arms that share it and their training settings share runs (sorajax/experiments.py)."""

BASE = "configs/toy.py"
OVERRIDES = ("--config.dit_train.steps=1000", "--config.dit_train.ckpt_every=500",
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
