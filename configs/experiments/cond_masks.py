"""Conditioning masks: what does training 30% of clips with given frames (so one model also does
i2v, extension, connect and keyframes) cost text-to-video adherence?

    python scripts/reproduce.py configs/experiments/cond_masks.py --seeds 3

Training arms: the toy config's masks (its default; the runs are shared with sample_shift.py)
against all mask rates at 0.
"""
from configs.experiments import _budget
from sorajax.experiments import Arm

NO_MASKS = tuple(f"--config.dit_train.cond_rates.{k}=0.0"
                 for k in ("first", "first_k", "last_k", "first_last", "keyframes"))


def get_experiment(arg: str = ""):
    return _budget.experiment(
        arg, name="cond_masks",
        question="Text-to-video adherence with the toy's conditioning masks (30% of clips) vs none.",
        arms={"masks (toy default)": Arm(), "no masks": Arm(train=NO_MASKS)},
        budget="the world data and VAE (~6 min), one latent cache (0.5-1 min), 6 DiT runs (3.4-4 min "
               "each; 3 shared with sample_shift), scoring in seconds: ~29-32 min alone on 2 CPU cores "
               "(docs/RESULTS.md)")
