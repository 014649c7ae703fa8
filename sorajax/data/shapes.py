"""Native clip shapes: the size a clip of a given aspect ratio and duration is trained at.

Sora-style training keeps each clip's aspect ratio and length instead of cropping every clip to
one square shape. A clip's size is the one nearest its aspect ratio among sizes of about the
configured pixel budget (data.height x data.width) whose sides are multiples of
data.size_multiple (the VAE's spatial stride times the DiT's patch, so the latents patchify);
its duration is one of data.durations (1 + 4k frames), or 1 frame for images. With
data.resolutions the pixel budget is one of several ((720, 1280) and (480, 832): 720p and 480p
clips in one run). The world
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
    out = {"aspect_ratios": [float(a) for a in d.aspect_ratios],
           "durations": [int(f) for f in (tuple(d.durations) or (d.frames,))],
           "image_share": float(d.image_share), "size_multiple": int(d.size_multiple)}
    if tuple(d.resolutions):  # absent when unset, so the world's fingerprint stays as it was
        out["resolutions"] = [[int(h), int(w)] for h, w in d.resolutions]
    return out


def pixel_budgets(native: dict, height: int, width: int) -> list[int]:
    """The pixel budgets clips are sized within: data.resolutions, or height x width."""
    return [h * w for h, w in native.get("resolutions") or [(int(height), int(width))]]


def world_clip_shape(seed: int, native: dict, height: int, width: int) -> tuple[int, int, int]:
    """(frames, height, width) of the world clip with this seed under `native` settings: its
    aspect ratio, duration and whether it is an image are drawn from the seed."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 7]))
    aspect = native["aspect_ratios"][int(rng.integers(len(native["aspect_ratios"])))]
    frames = native["durations"][int(rng.integers(len(native["durations"])))]
    if rng.random() < native["image_share"]:
        frames = 1
    budgets = pixel_budgets(native, height, width)
    pixels = budgets[int(rng.integers(len(budgets)))] if len(budgets) > 1 else budgets[0]
    h, w = native_size(aspect, pixels, native["size_multiple"])
    return int(frames), h, w


def all_sizes(native: dict, height: int, width: int) -> list[tuple[int, int]]:
    """Every (height, width) the settings produce, by pixel budget, then aspect ratio."""
    out = []
    for pixels in pixel_budgets(native, height, width):
        for a in native["aspect_ratios"]:
            hw = native_size(a, pixels, native["size_multiple"])
            if hw not in out:
                out.append(hw)
    return out


def all_clip_shapes(native: dict, height: int, width: int) -> list[tuple[int, int, int]]:
    """Every (frames, height, width) a clip can have under the settings: each size at each
    duration, and as a 1-frame image when image_share > 0."""
    frames = list(native["durations"]) + ([1] if native["image_share"] > 0 else [])
    return [(int(f), h, w) for h, w in all_sizes(native, height, width) for f in frames]
