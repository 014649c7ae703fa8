"""One input file of a video folder -> fixed-size uint8 clips (the per-file step of
`python -m sorajax.data.prepare`, docs/DATA.md).

    file ─ decode (imageio-ffmpeg; Pillow for GIFs and images) ─ resample to the target fps
         ─ scale the short side + centre crop to H x W (area resize) ─ clips of N frames every
         `stride` frames ─ WORK/KEY.clips (raw uint8, (clips, N, H, W, 3)) + WORK/KEY.json

This module is JAX-free on purpose: `prepare --workers N` runs it as `python -P decode.py` in
worker processes, and importing anything under `sorajax` would import the package, hence Flax and
JAX (seconds of start-up and an accelerator probe per worker for nothing). So it uses only the
standard library, NumPy, Pillow and imageio, and writes atomically itself (temporary name, then
rename) instead of through `sorajax.fileio`. The parent (sorajax/data/prepare.py) owns captions,
duplicates, splits and the dataset; this file owns pixels.

Results: KEY.json is written last and marks the file done (a rerun after a kill skips it):
    {"file", "kind": "video"|"image", "status": "used"|"skipped", "reason", "detail", "sha256",
     "width", "height", "fps", "duration_s", "source_frames", "clips"}
Worker protocol: one JSON task per stdin line -> one JSON result per stdout line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageOps, ImageSequence

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
_EPS = 1e-6  # seconds: frame times are sums of floats


class Skip(Exception):
    """This file gives no clips: `reason` is one of the report's reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ==============================================================================================
# Decoding: (start_s, end_s, frame uint8 (h, w, 3)) in display order.
# ==============================================================================================
def _gif_frames(path):
    """GIF frames with their display times (per-frame durations; 0 or missing = 100 ms, as
    browsers show them). A one-frame GIF is a still image."""
    im = Image.open(path)
    t = 0.0
    for frame in ImageSequence.Iterator(im):
        dur = frame.info.get("duration") or 100
        yield t, t + dur / 1000.0, np.asarray(frame.convert("RGB"))
        t += dur / 1000.0


def _ffmpeg_frames(reader):
    fps = float(reader.get_meta_data().get("fps") or 0)
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"no frame rate in the stream metadata ({fps})")
    for i, frame in enumerate(reader):
        yield i / fps, (i + 1) / fps, np.asarray(frame)[..., :3]


def _image_frame(path) -> np.ndarray:
    im = Image.open(path)
    im.load()
    return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))  # (h, w, 3) upright


# ==============================================================================================
# Pixels: resize + crop, fps resampling, clips.
# ==============================================================================================
def resize_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3) -> (height, width, 3): scales the short side to cover the target, then keeps
    the centre. Area (box) filter: every source pixel counts once, no ringing. Never upscales:
    the caller skips sources smaller than the target ("too small")."""
    h, w = frame.shape[:2]
    s = max(height / h, width / w)  # <= 1
    ch, cw = height / s, width / s  # the crop, in source pixels
    top, left = (h - ch) / 2, (w - cw) / 2
    out = Image.fromarray(frame).resize((width, height), Image.Resampling.BOX,
                                        box=(left, top, left + cw, top + ch))
    return np.asarray(out)


def resample(frames, fps: float):
    """Source frames (start_s, end_s, frame) -> the frame shown at each target time k / fps,
    k = 0, 1, ... while k / fps is before the end: a source frame is repeated (target fps above
    the source's) or dropped (below). Yields (source index, frame) so repeats resize once."""
    k = 0
    for i, (_, end, frame) in enumerate(frames):
        while k / fps < end - _EPS:
            yield i, frame
            k += 1


def cut_clips(frames, n: int, stride: int, max_clips: int = 0):
    """Frames -> clips of n consecutive frames starting every `stride` frames (stride n: no
    overlap; the tail shorter than n is dropped). Streams: holds at most max(n, stride) frames."""
    buf, skip, made = [], 0, 0
    for f in frames:
        if skip:
            skip -= 1
            continue
        buf.append(f)
        if len(buf) == n:
            yield np.stack(buf)  # (n, H, W, 3)
            made += 1
            if max_clips and made >= max_clips:
                return
            drop = min(stride, n)
            buf = buf[drop:]
            skip = stride - drop


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ==============================================================================================
# One file.
# ==============================================================================================
def _replace_atomic(write, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)
    _replace_atomic(write, path)


def _clips(task, kind, info):
    """The clips of one file, written to `clips_out` as they are made; returns how many."""
    n, h, w = task["frames"], task["height"], task["width"]
    stride, max_clips, fps = task["stride"], task["max_clips"], task["fps"]
    path = task["path"]

    def check_size(frame):
        fh, fw = frame.shape[:2]
        info.setdefault("width", int(fw))
        info.setdefault("height", int(fh))
        if fh < h or fw < w:
            raise Skip("too small", f"{fw}x{fh} (width x height) is smaller than the target "
                       f"{w}x{h}; upscaling would only blur it")

    if kind == "image":
        frame = _image_frame(path)
        check_size(frame)
        info.update(source_frames=1, fps=None, duration_s=None)
        return iter([np.repeat(resize_crop(frame, h, w)[None], n, axis=0)])  # a still clip

    reader = None
    if path.lower().endswith(".gif"):
        if getattr(Image.open(path), "n_frames", 1) == 1:  # a still GIF is an image
            frame = _image_frame(path)
            check_size(frame)
            info.update(source_frames=1, fps=None, duration_s=None, kind="image")
            return iter([np.repeat(resize_crop(frame, h, w)[None], n, axis=0)])
        frames = _gif_frames(path)
    else:
        import imageio.v2 as iio  # imageio-ffmpeg's reader: streams frames through a pipe

        reader = iio.get_reader(path, "ffmpeg")
        frames = _ffmpeg_frames(reader)
    counted = {"n": 0, "end": 0.0}

    def counting(it):
        for i, (t0, t1, frame) in enumerate(it):
            if i == 0:
                check_size(frame)
            counted["n"], counted["end"] = i + 1, t1
            yield t0, t1, frame

    def resized(it):
        last_i, last = -1, None
        for i, frame in it:
            if i != last_i:
                last_i, last = i, resize_crop(frame, h, w)
            yield last

    def clips():
        try:
            yield from cut_clips(resized(resample(counting(frames), fps)), n, stride, max_clips)
        finally:
            if reader is not None:
                reader.close()
            dur = counted["end"]
            info.update(source_frames=counted["n"], duration_s=round(dur, 3),
                        fps=round(counted["n"] / dur, 3) if dur > 0 else None)

    return clips()


def process(task: dict) -> dict:
    """Decodes task["path"] into task["out"] + ".clips" / ".json" (see the module docstring);
    returns the result dict (also written to .json, last). Never raises for a bad file: a file
    that cannot be decoded is skipped as "unreadable" with the decoder's message."""
    out, rel = task["out"], task["file"]
    kind = "image" if os.path.splitext(rel)[1].lower() in IMAGE_EXTS else "video"
    info = {"file": rel, "kind": kind, "status": "used", "reason": None, "detail": None}
    n, h, w = task["frames"], task["height"], task["width"]
    clips_path = out + ".clips"
    count = 0
    try:
        info["sha256"] = file_sha256(task["path"])

        def write(tmp):
            nonlocal count
            with open(tmp, "wb") as f:
                for clip in _clips(task, kind, info):
                    assert clip.shape == (n, h, w, 3) and clip.dtype == np.uint8, clip.shape
                    f.write(np.ascontiguousarray(clip).tobytes())
                    count += 1
            if count == 0:
                fr, dur = info.get("source_frames", 0), info.get("duration_s") or 0
                raise Skip("too short", f"{dur:g} s ({fr} frames) gives fewer than {n} frames "
                           f"at {task['fps']:g} fps")

        _replace_atomic(write, clips_path)
    except Skip as e:
        info.update(status="skipped", reason=e.reason, detail=e.detail)
    except Exception as e:  # noqa: BLE001 - any decoder failure means this file is unreadable
        msg = " ".join(str(e).split())[:300]
        info.update(status="skipped", reason="unreadable", detail=f"{type(e).__name__}: {msg}")
    info["clips"] = count if info["status"] == "used" else 0
    if info["status"] != "used" and os.path.exists(clips_path):
        os.remove(clips_path)
    _write_json(out + ".json", info)
    return info


def _worker() -> None:
    """`python -P decode.py`: one JSON task per stdin line -> one JSON result per stdout line."""
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(process(json.loads(line))), flush=True)
    # The point of running this file by path: the worker never loads JAX.
    assert "jax" not in sys.modules, "decode worker imported jax"


if __name__ == "__main__":
    _worker()
