"""Native clip shapes: the size a clip of a given aspect ratio and duration is trained at.

Sora-style training keeps each clip's aspect ratio and length instead of cropping every clip to
one square shape. A clip's size is the one nearest its aspect ratio among sizes of about the
configured pixel budget (data.height x data.width) whose sides are multiples of
data.size_multiple (the VAE's spatial stride times the DiT's patch, so the latents patchify);
its duration is one of data.durations (1 + 4k frames), or 1 frame for images. The world
generator draws each clip's aspect ratio, duration and image-ness from its seed
(`world_clip_shape`), so every clip's shape is known without rendering it.
"""
from __future__ import annotations

import math

import numpy as np


def native_size(aspect: float, pixels: int, multiple: int) -> tuple[int, int]:
    """(height, width): multiples of `multiple`, at most `pixels` pixels (at least one multiple
    per side), whose width/height is nearest `aspect` in log ratio; ties go to the larger area."""
    if aspect <= 0 or pixels <= 0 or multiple <= 0:
        raise ValueError(f"bad native size request: aspect {aspect}, pixels {pixels}, multiple {multiple}")
    best, best_key = (multiple, multiple), None
    top = max(1, pixels // (multiple * multiple))
    for hm in range(1, top + 1):
        for wm in range(1, top // hm + 1):
            h, w = hm * multiple, wm * multiple
            key = (round(abs(math.log(w / h) - math.log(aspect)), 9), -h * w)
            if best_key is None or key < best_key:
                best, best_key = (h, w), key
    return best


def native_settings(data_cfg) -> dict | None:
    """The native-shape settings of a config's `data` section (JSON-able), or None when every
    clip is data.frames x height x width."""
    d = data_cfg
    if not tuple(d.aspect_ratios):
        return None
    return {"aspect_ratios": [float(a) for a in d.aspect_ratios],
            "durations": [int(f) for f in (tuple(d.durations) or (d.frames,))],
            "image_share": float(d.image_share), "size_multiple": int(d.size_multiple)}


def world_clip_shape(seed: int, native: dict, height: int, width: int) -> tuple[int, int, int]:
    """(frames, height, width) of the world clip with this seed under `native` settings: its
    aspect ratio, duration and whether it is an image are drawn from the seed."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7]))
    aspect = native["aspect_ratios"][int(rng.integers(len(native["aspect_ratios"])))]
    frames = native["durations"][int(rng.integers(len(native["durations"])))]
    if rng.random() < native["image_share"]:
        frames = 1
    h, w = native_size(aspect, int(height) * int(width), native["size_multiple"])
    return int(frames), h, w


def all_sizes(native: dict, height: int, width: int) -> list[tuple[int, int]]:
    """Every (height, width) the settings produce, in aspect-ratio order."""
    return [native_size(a, int(height) * int(width), native["size_multiple"]) for a in native["aspect_ratios"]]
