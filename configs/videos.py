"""The toy text-to-video model trained on your own videos (docs/DATA.md).

Launch (prepare the folder once, then train both stages on its clips):
    python -m sorajax.data.prepare --src VIDEOS_DIR --out data/videos --config configs/videos.py
    python -m sorajax.train --config configs/videos.py --workdir runs/videos \\
        --config.data.dir=data/videos
Tiny smoke variant (the same path, seconds; used by tests/test_prepare.py):
    python -m sorajax.data.prepare --src VIDEOS_DIR --out /tmp/vids --config configs/videos.py:runlocal
    python -m sorajax.train --config configs/videos.py:runlocal --workdir /tmp/videos_smoke \\
        --config.data.dir=/tmp/vids

Same two stages as configs/toy.py (the causal VAE, then the DiT and the toy text encoder on the
frozen VAE's latents, a sentencepiece vocabulary trained on the folder's captions), reading the
prepared clips (data.source='folder') instead of the synthetic world. 17-frame 64x64 clips
(about 2 s at prepare's default 8 fps) -> 5x16x16 latents -> 320 tokens. The clip shape of the
prepared folder must be data.frames x height x width (checked before anything is built); users'
captions are longer than the world's, hence the larger vocabulary and prompt length.
"""
from sorajax import config_base


def get_config(arg: str = ""):
    c = config_base.get_config()
    c.data.source = "folder"
    c.data.update(frames=17, height=64, width=64)
    c.text.vocab_size = 1024
    c.text.max_length = 64
    c.vae_train.update(steps=2000, batch_size=8, ckpt_every=500)
    c.dit_train.update(steps=4000, batch_size=16, ckpt_every=500)
    if arg == "runlocal":
        c.data.update(frames=9, height=32, width=32)
        c.text.vocab_size = 192
        c.text.max_length = 24
        # the VAE on 5-frame crops: its first chunk and one cached chunk, as 9 frames (compiles faster)
        c.vae_train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2, clip_frames=5)
        c.dit_train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2)
        c.sample.steps = 2
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    return c
