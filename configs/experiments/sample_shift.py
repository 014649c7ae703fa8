"""Sampling time shift: does spending more of the 25 Euler steps at high noise (shift 3, as
SD3/Wan sample) help the toy model's prompt adherence over the uniform schedule (shift 1)?

    python scripts/reproduce.py configs/experiments/sample_shift.py --seeds 3

Sampling-only arms: each seed's DiT run is trained once and sampled with both schedules.
"""
from configs.experiments import _budget
from sorajax.experiments import Arm


def get_experiment(arg: str = ""):
    return _budget.experiment(
        arg, name="sample_shift",
        question="Sampling time shift 1 (uniform) vs 3 (more steps at high noise), same trained runs.",
        arms={"shift 1": Arm(sample=dict(shift=1.0)), "shift 3": Arm(sample=dict(shift=3.0))},
        budget="the world data and VAE (~6 min), one latent cache (0.5-1 min), 3 DiT runs (3.4-4 min "
               "each), 6 scoring passes: ~17-19 min alone on 2 CPU cores")
