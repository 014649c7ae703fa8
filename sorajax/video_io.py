"""Writing videos: .mp4 (imageio-ffmpeg), .gif (Pillow), .png contact sheets; reading images and
videos (resized to cover the model's size and centre-cropped) for the generation modes.

All writers take frames as float in [0, 1] shaped (N, T, H, W, 3) (N clips side by side) or
(T, H, W, 3), and write to a temporary name first, then rename: no half-written outputs.
"""
from __future__ import annotations

import os

import numpy as np

from sorajax import fileio
from sorajax.errors import UserError

EXTS = (".mp4", ".gif", ".png")


def _to_uint8(frames):
    f = np.asarray(frames, np.float32)
    return (np.clip(f, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _grid(frames, pad: int = 2, scale: int = 1):
    """(N, T, H, W, 3) -> (T, H', W', 3): the N clips tiled in a near-square grid."""
    f = _to_uint8(frames)
    if f.ndim == 4:
        f = f[None]
    n, t, h, w, c = f.shape
    if scale > 1:
        f = f.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((t, rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[:, y:y + h, x:x + w] = f[i]
    return out


def _auto_scale(h: int) -> int:
    return max(1, 128 // max(h, 1))


def contact_sheet(frames, prompts=None, pad: int = 2):
    """(N, T, H, W, 3) -> one uint8 image: a row per clip (its frames left to right), the prompt
    written above each row."""
    from PIL import Image, ImageDraw

    f = _to_uint8(frames)
    if f.ndim == 4:
        f = f[None]
    n, t, h, w, _ = f.shape
    s = _auto_scale(h)
    f = f.repeat(s, axis=2).repeat(s, axis=3)
    h, w = h * s, w * s
    label = 14 if prompts else 0
    out = np.full((n * (h + pad + label) + pad, t * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        y = pad + i * (h + pad + label) + label
        for j in range(t):
            x = pad + j * (w + pad)
            out[y:y + h, x:x + w] = f[i, j]
    if prompts:
        img = Image.fromarray(out)
        draw = ImageDraw.Draw(img)
        for i, p in enumerate(prompts[:n]):
            draw.text((pad, pad + i * (h + pad + label)), str(p)[:120], fill=(0, 0, 0))
        out = np.asarray(img)
    return out


def write(path: str, frames, prompts=None, fps: int = 8) -> str:
    """Writes frames to .mp4/.gif (clips tiled in a grid) or a .png contact sheet, atomically."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTS:
        raise UserError(f"unsupported output extension {ext!r}; use one of {', '.join(EXTS)}")
    with fileio.atomic_path(path) as tmp:
        if ext == ".png":
            from PIL import Image

            Image.fromarray(contact_sheet(frames, prompts)).save(tmp)
        else:
            f = np.asarray(frames)
            grid = _grid(f, scale=_auto_scale(f.shape[-3]))
            if ext == ".gif":
                from PIL import Image

                imgs = [Image.fromarray(g) for g in grid]
                imgs[0].save(tmp, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
            else:
                import imageio.v2 as imageio

                # H.264 wants even sizes: pad the grid by one pixel where needed.
                t, h, w, _ = grid.shape
                grid = np.pad(grid, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
                with imageio.get_writer(tmp, fps=fps, codec="libx264", format="FFMPEG",
                                        macro_block_size=1, quality=8) as wr:
                    for g in grid:
                        wr.append_data(g)
    return path


def _fit(img, height: int, width: int):
    """A PIL image resized to cover (height, width) and centre-cropped to it -> float32 in [0, 1]."""
    from PIL import Image

    w0, h0 = img.size
    scale = max(width / w0, height / h0)
    nw, nh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    img = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), np.float32) / 255.0


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTS = (".mp4", ".gif", ".webm")


def read_image(path: str, height: int, width: int, flag: str = "--image"):
    """A png/jpg/webp image -> float32 (H, W, 3) in [0, 1], resized to cover and centre-cropped.
    UserError (naming `flag`) if it is missing or unreadable."""
    from PIL import Image

    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} does not exist")
    try:
        with Image.open(path) as img:
            return _fit(img, height, width)
    except Exception as e:
        raise UserError(f"{flag} {path!r} cannot be read as an image ({type(e).__name__})") from None


def read_video(path: str, flag: str = "--video") -> np.ndarray:
    """An mp4/gif/webm video -> its frames, uint8 (T, H, W, 3) at the file's own size. UserError
    (naming `flag`) if it is missing, unreadable or has no frames. (Read before JAX starts its
    threads where possible: imageio runs ffmpeg in a subprocess.)"""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r} does not exist")
    try:
        import imageio.v3 as iio

        arr = np.asarray(iio.imread(path, index=None))
        if arr.ndim == 3:  # a single frame
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[0] == 0:
            raise ValueError(f"shape {arr.shape}")
    except Exception as e:
        raise UserError(f"{flag} {path!r} cannot be read as a video ({type(e).__name__})") from None
    if arr.shape[-1] < 3:
        arr = np.repeat(arr[..., :1], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def fit_video(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 frames (T, H, W, 3) -> float32 (T, height, width, 3) in [0, 1], each resized to cover
    and centre-cropped."""
    from PIL import Image

    return np.stack([_fit(Image.fromarray(f), height, width) for f in frames])
