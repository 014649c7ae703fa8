"""One input file of a video folder -> uint8 clips (the per-file step of
`python -m sorajax.data.prepare`, docs/DATA.md).

    file ─ decode (imageio-ffmpeg; Pillow for GIFs and images) ─ resample to the target fps
         ─ scale the short side + centre crop to H x W (area resize) ─ clips of N frames every
         `stride` frames ─ WORK/KEY.clips (raw uint8, (clips, N, H, W, 3)) + WORK/KEY.json

Native shapes (task["native"], docs/SHAPES.md): H x W is the file's own size, the table's entry
for the configured aspect ratio nearest the file's (`native_hw`), N the longest configured
duration its length allows (`cut_longest`), and an image is one frame. Every clip of one file has
the same shape, recorded in KEY.json as "shape".

This module is JAX-free on purpose: `prepare --workers N` runs it as `python -P decode.py` in
worker processes, and importing anything under `sorajax` would import the package, hence Flax and
JAX (seconds of start-up and an accelerator probe per worker for nothing). So it uses only the
standard library, NumPy, Pillow and imageio, and writes atomically itself (temporary name, then
rename) instead of through `sorajax.fileio`. The parent (sorajax/data/prepare.py) owns captions,
duplicates, splits and the dataset; this file owns pixels.

Results: KEY.json is written last and marks the file done (a rerun after a kill skips it):
    {"file", "kind": "video"|"image", "status": "used"|"skipped", "reason", "detail", "sha256",
     "width", "height", "fps", "duration_s", "source_frames", "clips"[, "shape": [N, H, W] if native]}
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


def cut_longest(frames, durations, stride: int = 0, max_clips: int = 0):
    """Frames -> clips of the longest of `durations` that the frames allow, cut as cut_clips cuts
    them (stride 0 = the duration): the longest when there are at least that many frames, else
    (the frames are then all held, fewer than the longest) the longest duration that fits."""
    longest = max(durations)
    head, made = [], False

    def keep(it):  # the frames before the first clip of the longest duration
        for f in it:
            if not made:
                head.append(f)
            yield f

    for clip in cut_clips(keep(frames), longest, stride or longest, max_clips):
        if not made:
            made = True
            head.clear()
        yield clip
    fits = [d for d in durations if d <= len(head)]
    if not made and fits:
        yield from cut_clips(iter(head), max(fits), stride or max(fits), max_clips)


def native_hw(height: int, width: int, native: dict) -> tuple[int, int]:
    """The (height, width) of a height x width source under native shapes: native["sizes"][i]
    lists the sizes of the configured aspect ratio native["aspects"][i] (prepare computes them
    with shapes.native_size), largest pixel budget first; the source takes the aspect ratio
    nearest its own in log ratio, at the largest size it covers. Skip ("too small") if none."""
    own = math.log(width / height)
    i = min(range(len(native["aspects"])), key=lambda k: abs(own - math.log(native["aspects"][k])))
    for h, w in native["sizes"][i]:
        if h <= height and w <= width:
            return h, w
    h, w = native["sizes"][i][-1]
    raise Skip("too small", f"{width}x{height} (width x height) is smaller than {w}x{h}, the size of "
               f"its aspect ratio {native['aspects'][i]:g}; upscaling would only blur it")


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
    """The clips of one file (an iterator: a video streams)."""
    native = task.get("native")
    n = 1 if native else task["frames"]  # of a still clip: native shapes keep an image 1 frame
    stride, max_clips, fps = task["stride"], task["max_clips"], task["fps"]
    path = task["path"]
    size = [task["height"], task["width"]]  # native shapes: the file's own, from its first frame

    def check_size(frame):
        fh, fw = frame.shape[:2]
        info.setdefault("width", int(fw))
        info.setdefault("height", int(fh))
        if native:
            size[:] = native_hw(fh, fw, native)
        h, w = size
        if fh < h or fw < w:
            raise Skip("too small", f"{fw}x{fh} (width x height) is smaller than the target "
                       f"{w}x{h}; upscaling would only blur it")

    if kind == "image":
        frame = _image_frame(path)
        check_size(frame)
        info.update(source_frames=1, fps=None, duration_s=None)
        return iter([np.repeat(resize_crop(frame, *size)[None], n, axis=0)])  # a still clip

    reader = None
    if path.lower().endswith(".gif"):
        if getattr(Image.open(path), "n_frames", 1) == 1:  # a still GIF is an image
            frame = _image_frame(path)
            check_size(frame)
            info.update(source_frames=1, fps=None, duration_s=None, kind="image")
            return iter([np.repeat(resize_crop(frame, *size)[None], n, axis=0)])
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
                last_i, last = i, resize_crop(frame, *size)
            yield last

    def clips():
        try:
            kept = resized(resample(counting(frames), fps))
            if native:
                yield from cut_longest(kept, native["durations"], stride, max_clips)
            else:
                yield from cut_clips(kept, n, stride, max_clips)
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
    native = task.get("native")
    n = min(native["durations"]) if native else task["frames"]  # the fewest frames a clip takes
    shape = None if native else (n, task["height"], task["width"], 3)  # native: the first clip's
    clips_path = out + ".clips"
    count = 0
    try:
        info["sha256"] = file_sha256(task["path"])

        def write(tmp):
            nonlocal count, shape
            with open(tmp, "wb") as f:
                for clip in _clips(task, kind, info):
                    shape = shape or clip.shape
                    assert clip.shape == shape and clip.dtype == np.uint8, (clip.shape, shape)
                    f.write(np.ascontiguousarray(clip).tobytes())
                    count += 1
            if count == 0:
                fr, dur = info.get("source_frames", 0), info.get("duration_s") or 0
                raise Skip("too short", f"{dur:g} s ({fr} frames) gives fewer than {n} frames "
                           f"at {task['fps']:g} fps")
            if native:
                info["shape"] = [int(v) for v in shape[:3]]

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
