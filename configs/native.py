"""The toy model on native shapes: square, landscape and portrait clips of two durations and
1-frame images, packed into fixed token budgets (sorajax/packing.py, docs/SHAPES.md).

Launch:
    python -m sorajax.train --config configs/native.py --workdir runs/native
Tiny smoke variant (the same path, smaller; used by tests/test_packing.py):
    python -m sorajax.train --config configs/native.py:runlocal --workdir /tmp/native_smoke

configs/toy.py's models and stages, on world clips whose shape each clip draws: width/height 1,
1.5 or 0.667 at about 32x48 pixels (32x32, 32x48, 48x32), 9 or 13 frames, or (a fifth of them) a
single frame. The VAE trains on 9-frame 32x32 centre crops; the DiT trains on whole clips packed
into rows of 192 tokens (a 13-frame 32x48 clip is 96 tokens, a 32x32 image 16), one compiled
step for every mix. Sampling defaults to data.frames x height x width (9 frames at 32x48); any
native size samples with --frames/--height/--width.
"""
from configs import toy


def get_config(arg: str = ""):
    c = toy.get_config("")
    c.data.update(frames=9, height=32, width=48, aspect_ratios=(1.0, 1.5, 0.667), durations=(9, 13),
                  image_share=0.2)
    c.vae_train.clip_frames = 0  # the VAE's crops are 9 frames (the shortest duration)
    # The toy variant's 8-wide VAE, as docs/SHAPES.md measured this config (the demo's wider VAE
    # would double the VAE stage of this already longer run).
    c.vae.overrides.base_dim = 8
    c.dit_train.update(clip_frames=0, packing="pack", pack_tokens=192, pack_clips=8, batch_size=8)
    if arg == "runlocal":
        c.data.update(num_train=48, num_eval=8, aspect_ratios=(1.0, 1.5), durations=(9,), image_share=0.25)
        # the VAE on the first 5 frames of its crops: the first chunk and one cached chunk, as 9 frames
        c.vae_train.update(steps=4, batch_size=8, log_every=2, ckpt_every=4, clip_frames=5)
        c.dit_train.update(steps=6, batch_size=4, pack_tokens=0, log_every=2, ckpt_every=3)
        c.sample.steps = 3
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    return c
