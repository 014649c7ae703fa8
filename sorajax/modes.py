"""Sora's generation modes on one model: each is the jitted sampler (sorajax/sampler.py) with
given latent frames (a conditioning mask), or, for video-to-video, given start latents.

Every mode works in the DiT's latent space at the model's window (its training clip length,
`--frames`): the given images and videos are encoded by the causal VAE, placed in the window,
and the rest is generated around them; windows are chained in latent space (the next window
starts from the previous one's last latent frames -- never decoded and re-encoded) and the
result is decoded once, as one continuous video.

    t2v, t2i         text to video / image (no given frames)
    i2v              --image is frame 0
    extend_forward   --video, then --seconds of new footage after it
    extend_backward  --seconds of new footage, then --video
    connect          --video, a generated transition, --video2
    loop             a clip whose last frame leads into its first (a clip, then the transition
                     from its end back to its start)
    keyframes        --keyframe FILE@SECONDS (repeatable) at those times of one window
    v2v              --video noised to --strength and denoised under the prompt (SDEdit)
    long             --seconds of video: windows chained on the previous window's last frames

Pixel frames per latent frame: the causal VAE encodes frame 0 alone and then `stride` frames per
latent frame (T = 1 + stride (t - 1)). In training (dit_train.clip_frames) a window's first
latent frame is either a clip's one-frame first latent or, for windows cut mid-clip, a
continuation latent; every later position holds continuation latents. The modes keep to that:
a clip that comes *after* generated footage (extend_backward, the second clip of connect, the
loop's return) is given from its second latent frame on -- the generated latent before it covers
its frame 0 -- and its pixels are its own VAE round trip from frame 1, joined after the
generated frames; a keyframe after 0 s is the continuation latent of the still image
(Runner.static_latent). Nothing is decoded and re-encoded.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import numpy as np

from sorajax import conditioning, video_io
from sorajax.errors import UserError

MODES = ("t2v", "t2i", "i2v", "extend_forward", "extend_backward", "connect", "loop", "keyframes", "v2v", "long")
# Modes whose given frames the model must have learnt to keep (dit_train.cond_rates > 0).
MASKED = ("i2v", "extend_forward", "extend_backward", "connect", "loop", "keyframes", "long")


@dataclasses.dataclass
class Inputs:
    """What a mode takes besides the prompts (the sample CLI's flags of the same names)."""
    image: str | np.ndarray | None = None  # a file, or uint8 (H, W, 3)
    video: str | np.ndarray | None = None  # a file, or uint8 frames (T, H, W, 3) (video_io.read_video)
    video2: str | np.ndarray | None = None
    seconds: float | None = None
    keyframes: tuple = ()  # ("FILE@SECONDS", ...)
    strength: float | None = None
    fps: float = 8.0


def trained_with_masks(config) -> bool:
    return conditioning.enabled(config.dit_train)


class Runner:
    """Runs the modes on a Pipeline (sorajax.inference) with its sampling settings.

    `run(mode, prompts, Inputs)` reads the inputs (the same for every prompt); the methods named
    after the modes take per-prompt inputs already at the model's size -- clips (N, T, H, W, 3)
    and images (N, H, W, 3) in [0, 1] -- as the mode benchmark (sorajax/mode_eval.py) uses them.
    Each returns {"frames": (N, T, H, W, 3) in [0, 1], "given": bool (T,) the frames that come
    from the inputs, "latents": (N, t, h, w, z) where the frames are one decoded latent
    sequence, else None}."""

    def __init__(self, pipe, *, seed=0, frames=None, height=None, width=None, **sample_kw):
        self.pipe, self.seed, self.kw = pipe, int(seed), sample_kw
        d = pipe.defaults
        self.frames = d["frames"] if frames is None else int(frames)
        self.height = d["height"] if height is None else int(height)
        self.width = d["width"] if width is None else int(width)
        self.stride = int(pipe.vae_cfg.temporal_stride)
        self.window = pipe.latent_shape(self.frames, self.height, self.width)  # (t, h, w, z)

    # -- helpers -----------------------------------------------------------------------------
    def pixel_frames(self, t: int) -> int:
        return 1 + self.stride * (t - 1)

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.stride

    def read_clip(self, video, flag: str) -> np.ndarray:
        """A video (a file, or its uint8 frames) -> (T, H, W, 3) in [0, 1] at the model's size,
        T = 1 + stride k frames (the ones past the last whole latent frame dropped)."""
        raw = video_io.read_video(video, flag) if isinstance(video, str) else np.asarray(video)
        v = video_io.fit_video(raw, self.height, self.width)
        if v.shape[0] < 1 + self.stride:
            raise UserError(f"{flag} has {v.shape[0]} frame(s): at least {1 + self.stride} are needed "
                            f"(one latent frame after the first)")
        return v[: self.pixel_frames(self.latent_frames(v.shape[0]))]

    def read_image(self, image, flag: str) -> np.ndarray:
        if isinstance(image, str):
            return video_io.read_image(image, self.height, self.width, flag)
        return video_io.fit_video(np.asarray(image)[None], self.height, self.width)[0]

    def _sample(self, prompts, cond: np.ndarray, mask: np.ndarray, chunk: int, start: bool = True) -> np.ndarray:
        """One window per prompt with latent frames `mask` (t,) bool given by `cond` (N, t, h, w,
        z) -> latents (N, t, h, w, z). `chunk` seeds the noise (window i of a rollout: seed +
        1000003 i); `start`: the window begins at the clip's first latent frame (else it is cut
        mid-clip: DiTConfig.start_embedding)."""
        n = len(prompts)
        kw = {}
        if mask.any():
            kw = dict(cond_latents=cond, cond_mask=np.repeat(mask[None], n, 0))
        return self.pipe.generate(prompts, seed=self.seed + 1000003 * chunk, frames=self.frames,
                                  height=self.height, width=self.width, decode=False, start=start,
                                  **kw, **self.kw)["latents"]

    def _window(self, prompts, given: dict, chunk: int, start: bool = True) -> np.ndarray:
        """_sample with latent frames {index: latents (N, h, w, z)} given."""
        cond = np.zeros((len(prompts),) + self.window, np.float32)
        mask = np.zeros(self.window[0], bool)
        for i, z in given.items():
            cond[:, i], mask[i] = z, True
        return self._sample(prompts, cond, mask, chunk, start)

    def _rollout(self, prompts, seq: np.ndarray, new: int, *, backward: bool = False,
                 chunk0: int = 0) -> np.ndarray:
        """Latents `seq` (N, t0, ...) continued by `new` latent frames, window after window: each
        window's first (backward: last) `keep` latent frames are the sequence's last (first) ones,
        keep = half the window (>= 1). -> (N, t0 + new, ...) in time order."""
        t = self.window[0]
        keep = max(1, t // 2)
        made, chunk = 0, chunk0
        while made < new:
            k = min(keep, seq.shape[1])
            take = min(t - k, new - made)
            cond = np.zeros((len(prompts),) + self.window, np.float32)
            mask = np.zeros(t, bool)
            if backward:
                cond[:, t - k:], mask[t - k:] = seq[:, :k], True
                lat = self._sample(prompts, cond, mask, chunk, start=False)
                seq = np.concatenate([lat[:, t - k - take: t - k], seq], axis=1)
            else:
                cond[:, :k], mask[:k] = seq[:, -k:], True
                lat = self._sample(prompts, cond, mask, chunk, start=False)
                seq = np.concatenate([seq, lat[:, k:k + take]], axis=1)
            made, chunk = made + take, chunk + 1
            _progress(f"window {chunk - chunk0}: {made}/{new} new latent frames")
        return seq

    def _join_before(self, gen: np.ndarray, clips: np.ndarray):
        """Pixels of generated latents `gen` (N, tg, ...) whose windows ended on the clips' latent
        frames from the second on, followed by the clips' (N, T, ...) own VAE round trip from
        their frame 1 on: the generated latent before it covers the time of the clip's frame 0."""
        head = self.pipe.decode(gen)  # (N, 1 + s (tg - 1), ...)
        frames = np.concatenate([head, self.pipe.reconstruct(clips)[:, 1:]], axis=1)
        given = np.zeros(frames.shape[1], bool)
        given[head.shape[1]:] = True
        return frames, given

    def static_latent(self, images):
        """images (N, H, W, 3) -> the continuation latent (N, h, w, z) of `stride` frames of the
        still image (the second latent frame of a still clip): what a window holds at a latent
        frame after the first."""
        clip = np.repeat(images[:, None], 1 + self.stride, axis=1)
        return self.pipe.encode(clip)[:, 1]

    def new_latents(self, seconds, fps: float, flag: str = "--seconds") -> int:
        """Latent frames that hold `seconds` of footage at `fps` (at least 1)."""
        if seconds is None or not seconds > 0 or not math.isfinite(seconds):
            raise UserError(f"{flag} {seconds}: give a number of seconds > 0")
        return max(1, math.ceil(seconds * fps / self.stride))

    # -- the modes on files (the CLI) ---------------------------------------------------------
    def run(self, mode: str, prompts, inp: Inputs) -> dict:
        """A mode with the same inputs for every prompt (files, or arrays)."""
        if mode not in MODES:
            raise UserError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
        prompts = list(prompts)
        n = len(prompts)
        if mode in MASKED and not trained_with_masks(self.pipe.config):
            print(f"warning: --mode {mode}: this model was not trained with conditioning masks "
                  "(dit_train.cond_rates all 0, as imported Wan 2.1 T2V weights): the given frames are "
                  "kept, but what is generated around them may not follow them", file=sys.stderr)
        rep = lambda x: np.repeat(x[None], n, 0)
        need = lambda v, flag: v if v is not None else missing(mode, flag)
        if mode in ("t2v", "t2i", "loop"):
            return getattr(self, mode)(prompts)
        if mode == "i2v":
            return self.i2v(prompts, rep(self.read_image(need(inp.image, "--image"), "--image")))
        if mode in ("extend_forward", "extend_backward"):
            clip = rep(self.read_clip(need(inp.video, "--video"), "--video"))
            return getattr(self, mode)(prompts, clip, self.new_latents(inp.seconds, inp.fps))
        if mode == "connect":
            return self.connect(prompts, rep(self.read_clip(need(inp.video, "--video"), "--video")),
                                rep(self.read_clip(need(inp.video2, "--video2"), "--video2")))
        if mode == "keyframes":
            return self.keyframes(prompts, [(rep(img), i) for img, i in self._keyframe_inputs(inp)])
        if mode == "v2v":
            s = 0.7 if inp.strength is None else float(inp.strength)
            if not 0.0 < s <= 1.0:
                raise UserError(f"--strength {s:g}: must be in (0, 1] (how much of the video is re-generated)")
            return self.v2v(prompts, rep(self.read_clip(need(inp.video, "--video"), "--video")), s)
        return self.long(prompts, self.new_latents(inp.seconds, inp.fps))  # "long"

    def _keyframe_inputs(self, inp):
        """--keyframe FILE@SECONDS -> [(image (H, W, 3), latent index)]: second s is frame
        round(s fps), in latent frame 0 (frame 0) or round(frame / stride) (frames 1 + s (i - 1)
        .. s i)."""
        if not inp.keyframes:
            missing("keyframes", "--keyframe")
        out = []
        for spec in inp.keyframes:
            path, sep, sec = str(spec).rpartition("@")
            try:
                sec = float(sec)
            except ValueError:
                sec = float("nan")
            if not sep or not path or not math.isfinite(sec) or sec < 0:
                raise UserError(f"--keyframe {spec!r}: expected FILE@SECONDS with SECONDS >= 0")
            frame = round(sec * inp.fps)
            if frame > self.frames - 1:
                raise UserError(f"--keyframe {spec!r}: {sec:g} s is frame {frame}, past the last frame "
                                f"({self.frames - 1} at {inp.fps:g} fps)")
            i = 0 if frame == 0 else min(self.window[0] - 1, max(1, round(frame / self.stride)))
            out.append((self.read_image(path, "--keyframe"), i))
        return out

    # -- the modes on per-prompt inputs -------------------------------------------------------
    def _plain(self, prompts, frames):
        out = self.pipe.generate(prompts, seed=self.seed, frames=frames, height=self.height,
                                 width=self.width, **self.kw)
        return dict(frames=out["frames"], latents=out["latents"], given=np.zeros(frames, bool))

    def t2v(self, prompts):
        return self._plain(prompts, self.frames)

    def t2i(self, prompts):
        return self._plain(prompts, 1)

    def i2v(self, prompts, images):
        """images (N, H, W, 3) in [0, 1] are frame 0."""
        z = self.pipe.encode(images[:, None])  # (N, 1, h, w, z)
        lat = self._window(prompts, {0: z[:, 0]}, 0)
        given = np.zeros(self.frames, bool)
        given[0] = True
        return dict(frames=self.pipe.decode(lat), latents=lat, given=given)

    def keyframes(self, prompts, keys):
        """keys: [(images (N, H, W, 3), latent frame index)]: at index 0 the image's latent (the
        clip's first frame), later the still image's continuation latent (static_latent)."""
        given, gmask = {}, np.zeros(self.frames, bool)
        for images, i in keys:
            given[i] = self.pipe.encode(images[:, None])[:, 0] if i == 0 else self.static_latent(images)
            gmask[self.stride * i] = True  # latent i >= 1 spans frames 1 + s (i - 1) .. s i
        if len(given) >= self.window[0]:
            raise UserError(f"--keyframe: {len(given)} keyframes fill all {self.window[0]} latent frames; "
                            "nothing to generate")
        lat = self._window(prompts, given, 0)
        return dict(frames=self.pipe.decode(lat), latents=lat, given=gmask)

    def extend_forward(self, prompts, clips, new: int):
        """clips (N, T, ...) followed by `new` generated latent frames (stride new frames)."""
        lat = self._rollout(prompts, self.pipe.encode(clips), new)  # (N, t_v + new, ...)
        given = np.zeros(self.pixel_frames(lat.shape[1]), bool)
        given[: clips.shape[1]] = True
        return dict(frames=self.pipe.decode(lat), latents=lat, given=given)

    def extend_backward(self, prompts, clips, new: int):
        """`new` generated latent frames (1 + stride (new - 1) frames; the last covers the time
        of the clip's frame 0), then clips (N, T, ...) from their frame 1. The windows end on the
        clips' latent frames after the first: continuation latents, as every window position
        after the first holds in training."""
        gen = self._rollout(prompts, self.pipe.encode(clips)[:, 1:], new, backward=True)[:, :new]
        frames, given = self._join_before(gen, clips)
        return dict(frames=frames, latents=None, given=given)

    def _bridge(self, prompts, z1, z2, chunk):
        """One window from latents z1 (N, t1, ...) to latents z2 (N, t2, ...) that continue
        after it (continuation latents): its first k1 latent frames are z1's last, its last k2
        z2's first -> the generated latent frames between them (N, t - k1 - k2, ...)."""
        t = self._need_window(3, "a transition")
        k1, k2 = self.bridge_given(z1.shape[1], z2.shape[1])
        given = {i: z1[:, z1.shape[1] - k1 + i] for i in range(k1)}
        given.update({t - k2 + i: z2[:, i] for i in range(k2)})
        return self._window(prompts, given, chunk, start=False)[:, k1: t - k2]

    def bridge_given(self, t1: int, t2: int) -> tuple[int, int]:
        """(k1, k2): latent frames of the two sides a transition window is given; it generates
        window - k1 - k2 between them."""
        t = self.window[0]
        k1 = max(1, min(t1, (t - 1) // 2))
        return k1, max(1, min(t2, t - 1 - k1))

    def connect(self, prompts, clips1, clips2):
        """clips1, a generated transition, clips2 from its frame 1 (the transition's last latent
        frame covers the time of clips2's frame 0)."""
        z1 = self.pipe.encode(clips1)
        mid = self._bridge(prompts, z1, self.pipe.encode(clips2)[:, 1:], 0)
        frames, given = self._join_before(np.concatenate([z1, mid], axis=1), clips2)
        given[: clips1.shape[1]] = True
        return dict(frames=frames, latents=None, given=given)

    def loop(self, prompts):
        """A text-to-video clip, then a transition from its last latent frames back to its
        second: played on repeat, one period (the clip from frame 1, then the transition) leads
        into itself."""
        clip = self._window(prompts, {}, 0)  # (N, t, ...)
        mid = self._bridge(prompts, clip, clip[:, 1:], 1)
        lat = np.concatenate([clip, mid], axis=1)
        frames = self.pipe.decode(lat)[:, 1:]  # frame 0 is the time of the transition's last frames
        return dict(frames=frames, latents=None, given=np.zeros(frames.shape[1], bool))

    def v2v(self, prompts, clips, strength: float):
        """clips (N, T, ...) noised to `strength` and denoised under the prompts (SDEdit)."""
        out = self.pipe.generate(prompts, seed=self.seed, frames=clips.shape[1], height=self.height,
                                 width=self.width, init_latents=self.pipe.encode(clips),
                                 strength=strength, **self.kw)
        return dict(frames=out["frames"], latents=out["latents"], given=np.zeros(clips.shape[1], bool))

    def long(self, prompts, total: int):
        """`total` latent frames (1 + stride (total - 1) frames): a window, then windows chained on
        the last latent frames so far. The DiT's memory does not grow with the length."""
        t = self.window[0]
        lat = self._window(prompts, {}, 0)
        if total > t:
            lat = self._rollout(prompts, lat, total - t, chunk0=1)
        lat = lat[:, :total]
        return dict(frames=self.pipe.decode(lat), latents=lat,
                    given=np.zeros(self.pixel_frames(lat.shape[1]), bool))

    def _need_window(self, t_min: int, what: str) -> int:
        t = self.window[0]
        if t < t_min:
            raise UserError(f"--frames {self.frames}: {what} needs a window of at least {t_min} latent "
                            f"frames ({self.pixel_frames(t_min)} frames)")
        return t


# The inputs each mode needs (sample's flags of those names), and what each is.
REQUIRED = {"i2v": ("image",), "extend_forward": ("video", "seconds"), "extend_backward": ("video", "seconds"),
            "connect": ("video", "video2"), "keyframes": ("keyframe",), "v2v": ("video",), "long": ("seconds",)}
_WHAT = {"--image": "png/jpg/webp", "--video": "mp4/gif/webm", "--video2": "mp4/gif/webm",
         "--keyframe": "FILE@SECONDS, repeatable", "--seconds": "a number of seconds"}


def missing(mode, flag):
    raise UserError(f"--mode {mode} needs {flag} ({_WHAT[flag]})")


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)
