"""Fine-tune an imported Wan 2.1 checkpoint (scripts/convert_diffusers.py output) on the world data.

    python scripts/convert_diffusers.py --src Wan2.1-T2V-1.3B-Diffusers --dst ckpt/wan1p3b
    python -m sorajax.train --config configs/wan2_1_finetune.py:ckpt/wan1p3b --workdir runs/wan_ft \\
        --config.data.frames=17 --config.data.height=240 --config.data.width=416

The model sizes come from the checkpoint's own config.json; the VAE and text encoder stay frozen
(Wan ships its VAE latent statistics), the DiT trains with rectified flow; every weight starts
from the checkpoint. Tiny variant for tests: the same with a converted tiny random pipeline.
"""
import os

from sorajax import config_lib


def get_config(arg: str = ""):
    if not arg:
        raise ValueError("pass the converted checkpoint directory: configs/wan2_1_finetune.py:CKPT_DIR")
    path = os.path.join(arg, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{arg}: no config.json (convert with scripts/convert_diffusers.py first)")
    with open(path) as f:
        c = config_lib.from_json(f.read(), where=path)
    c.init_from = os.path.abspath(arg)
    c.stages = ("dit",)
    c.data.update(frames=9, height=32, width=48, num_train=256, num_eval=16, min_objects=1,
                  max_objects=2, occluder_prob=0.3, two_tone_prob=0.3)
    c.vae.precompute_latents = True
    c.vae.normalize_latents = False  # Wan's VAE ships latents_mean/std
    c.text.trainable = False
    c.dit_train.update(steps=100, batch_size=8, lr=1e-5, warmup_steps=10, weight_decay=0.0, b2=0.999,
                       ema_decay=0.99, log_every=10, ckpt_every=50, sample_at_end=False,
                       keep_checkpoints=2)
    return c
