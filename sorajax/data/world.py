"""The synthetic world: procedurally rendered, captioned clips with ground truth.

Every clip is a pure function of (seed, WorldConfig): a few coloured shapes move in straight
lines (bouncing off the frame edges) over a plain or two-tone background, optionally passing
behind a static gray wall. The ground truth (`meta`) records every attribute the caption names
plus the per-frame centre trajectory and visibility of each object, so benchmarks can measure
attribute adherence, motion and object permanence on generated video.

Coordinates: x is the column, y the row, both in pixel units with pixel (row i, col j) centred
at (x=j, y=i). "up" is towards row 0.

Bouncing: objects reflect off the frame edges; the ground truth's `motion` is the *initial*
direction. With `WorldConfig.avoid_bounce` (default) the start position is sampled so that the
whole straight path stays inside the frame whenever it fits, i.e. whenever
(frames - 1) * speed <= extent - 2 * radius - 3 on each moving axis. With the default speed range
(0.03-0.065 of the frame size per frame) and large objects (radius 0.18 of the frame size) this
holds for clips of up to 9 frames at 32 px (10 frames at >= 64 px), so evaluation clips (9 frames)
never bounce and the caption's direction is the direction of the whole clip (tested). Longer training clips bounce; their caption still
names the initial direction.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary of the world
# ----------------------------------------------------------------------------------------------

# Object colours: saturated and far apart in RGB so a nearest-colour classifier is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 230, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 220, 225),
    "orange": (255, 140, 0),
    "white": (245, 245, 245),
}
# Background colours: dark, so that every object colour stands out (distance > 0.45 in [0,1] RGB).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "navy": (15, 20, 75),
    "maroon": (75, 15, 15),
    "dark gray": (45, 45, 45),
}
OCCLUDER_COLOR = (128, 128, 128)  # "a gray wall"
SHAPES = ("circle", "square", "triangle")
# Radius (half-extent) as a fraction of min(height, width). Ratio 2 keeps sizes separable.
SIZES: dict[str, float] = {"small": 0.09, "large": 0.18}
# Unit direction vectors (dx, dy) in image coordinates (y grows downwards).
_D = float(np.sqrt(0.5))
MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_D, -_D),
    "up-right": (_D, -_D),
    "down-left": (-_D, _D),
    "down-right": (_D, _D),
    "still": (0.0, 0.0),
}
# Area of each shape for radius 1 (used by the analyzer to turn pixel areas into radii).
SHAPE_AREA = {"circle": float(np.pi), "square": 4 * 0.9**2, "triangle": 2.0}


# WorldConfig fields that a sorajax config's `data` section sets under the same names (besides
# the clip shape and `holdout`): builders.world_kwargs and validate read exactly these.
CONFIG_FIELDS = ("min_objects", "max_objects", "occluder_prob", "two_tone_prob")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Shape and distribution of world clips. Speeds and sizes scale with min(height, width)."""

    frames: int = 9
    height: int = 32
    width: int = 32
    min_objects: int = 1
    max_objects: int = 3
    occluder_prob: float = 0.3
    two_tone_prob: float = 0.3
    still_prob: float = 0.1  # probability that an object stays still
    speed_range: tuple[float, float] = (0.03, 0.065)  # fraction of min(H, W) per frame
    occluder_width: float = 0.15  # fraction of the width
    avoid_bounce: bool = True  # sample starts so straight paths fit when they can (see module doc)
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    # Held-out compositions: "COLOR SHAPE" pairs that no generated clip contains (the colour
    # comes in its other shapes, the shape in other colours), so a benchmark can score prompts
    # that combine seen words in unseen ways apart from the seen ones.
    holdout: tuple[str, ...] = ()

    def __post_init__(self):
        if self.frames < 1 or self.height < 4 or self.width < 4:
            raise ValueError(f"bad clip shape {self.frames}x{self.height}x{self.width}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got "
                             f"{self.min_objects}, {self.max_objects}")
        for name, table in (("colors", COLORS), ("shapes", SHAPES), ("backgrounds", BACKGROUNDS)):
            bad = [v for v in getattr(self, name) if v not in table]
            if bad:
                raise ValueError(f"unknown {name}: {bad}")
        for pair in self.holdout:
            color, _, shape = str(pair).partition(" ")
            if color not in self.colors or shape not in self.shapes:
                raise ValueError(f"holdout {pair!r}: expected 'COLOR SHAPE' with a colour of "
                                 f"{list(self.colors)} and a shape of {list(self.shapes)}")
        for color in self.colors:
            if all(f"{color} {s}" in self.holdout for s in self.shapes):
                raise ValueError(f"holdout leaves no shape for {color!r}")

    @property
    def scale(self) -> int:
        return min(self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ----------------------------------------------------------------------------------------------
# Specs: what is in a clip (attributes only); rendering adds positions and speeds
# ----------------------------------------------------------------------------------------------

def _normalize_background(bg) -> list[str]:
    if bg is None:
        return ["black"]
    if isinstance(bg, str):
        return [bg]
    if isinstance(bg, dict):
        return list(bg["colors"])
    return list(bg)


def sample_spec(rng: np.random.Generator, cfg: WorldConfig) -> dict[str, Any]:
    """Samples the attributes of a clip: objects (distinct colours when possible), background,
    occluder."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    colors = list(cfg.colors)
    if n <= len(colors):
        picked = [colors[i] for i in rng.permutation(len(colors))[:n]]
    else:
        picked = [colors[i] for i in rng.integers(0, len(colors), n)]
    moving = [m for m in MOTIONS if m != "still"]
    objects = []
    for color in picked:
        motion = "still" if rng.random() < cfg.still_prob else moving[int(rng.integers(len(moving)))]
        # (with no holdout: the same draws as before it existed)
        allowed = [s for s in cfg.shapes if f"{color} {s}" not in cfg.holdout]
        objects.append({
            "shape": allowed[int(rng.integers(len(allowed)))],
            "color": color,
            "size": ("small", "large")[int(rng.integers(2))],
            "motion": motion,
        })
    bgs = list(cfg.backgrounds)
    if rng.random() < cfg.two_tone_prob and len(bgs) >= 2:
        i, j = rng.permutation(len(bgs))[:2]
        background = [bgs[i], bgs[j]]
    else:
        background = [bgs[int(rng.integers(len(bgs)))]]
    return {"objects": objects, "background": background,
            "occluder": bool(rng.random() < cfg.occluder_prob)}


def held_out(spec: dict[str, Any], holdout) -> bool:
    """True when an object of `spec` is a held-out "COLOR SHAPE" composition of `holdout`."""
    return any(f"{o['color']} {o['shape']}" in holdout for o in spec["objects"])


def _fold(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflects positions into [lo, hi] (elastic bounces off both walls)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, (lo + hi) / 2)
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def _start_range(lo: float, hi: float, travel: float) -> tuple[float, float, bool]:
    """Start interval on one axis keeping a straight path of signed length `travel` in [lo, hi]."""
    a, b = lo + max(0.0, -travel), hi - max(0.0, travel)
    return (a, b, True) if a <= b else (lo, hi, False)


def _shape_mask(shape: str, cx: np.ndarray, cy: np.ndarray, r: float, h: int, w: int):
    """(T, H, W) bool masks of a shape centred at per-frame (cx, cy) with radius r."""
    ys = np.arange(h, dtype=np.float32)[None, :, None]
    xs = np.arange(w, dtype=np.float32)[None, None, :]
    dx = xs - np.asarray(cx, np.float32)[:, None, None]  # (T, 1, W)
    dy = ys - np.asarray(cy, np.float32)[:, None, None]  # (T, H, 1)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.9 * r  # a little smaller so that the areas of the shapes are closer
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up, base 2r wide at the bottom, height 2r
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= r * t)
    raise ValueError(f"unknown shape {shape!r}")


def render_from_spec(spec: dict[str, Any], seed: int, cfg: WorldConfig | None = None
                     ) -> dict[str, Any]:
    """Renders a clip for a spec {"objects": [{shape, color, size, motion[, speed, start]}],
    "background": name | [name, name], "occluder": bool | {"x0", "x1"}}.

    Missing per-object `speed` (pixels/frame) and `start` ([x, y] pixels) are sampled from `seed`
    (starts avoid bouncing when the path fits, see module doc). Returns dict(frames uint8
    (T, H, W, 3), caption str, meta dict).
    """
    cfg = cfg or WorldConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 1]))
    T, H, W, S = cfg.frames, cfg.height, cfg.width, cfg.scale
    t = np.arange(T, dtype=np.float64)

    # Background (plain or two halves split vertically or horizontally).
    bg_names = _normalize_background(spec.get("background"))
    frames = np.empty((T, H, W, 3), np.uint8)
    split = None
    frames[:] = BACKGROUNDS[bg_names[0]]
    if len(bg_names) == 2:
        split = str(spec.get("split") or ("vertical" if rng.random() < 0.5 else "horizontal"))
        if split == "vertical":  # left | right
            frames[:, :, W // 2:] = BACKGROUNDS[bg_names[1]]
        else:  # top / bottom
            frames[:, H // 2:, :] = BACKGROUNDS[bg_names[1]]

    # Occluder geometry first: visibility needs it.
    occ = spec.get("occluder")
    occluder = None
    if occ:
        if isinstance(occ, dict) and "x0" in occ:
            x0, x1 = int(occ["x0"]), int(occ["x1"])
        else:
            ow = max(1, int(round(cfg.occluder_width * W)))
            x0 = int(rng.integers(W // 4, max(W // 4 + 1, 3 * W // 4 - ow + 1)))
            x1 = x0 + ow
        occluder = {"color": "gray", "x0": x0, "x1": x1}

    objects = []
    for o in spec["objects"]:
        r = SIZES[o["size"]] * S
        d = np.asarray(MOTIONS[o["motion"]], np.float64)
        if o["motion"] == "still":
            speed = 0.0
        elif o.get("speed") is not None:
            speed = float(o["speed"])
        else:
            speed = float(rng.uniform(*cfg.speed_range)) * S
        v = d * speed
        # Keep a 1 px margin so the whole shape stays inside the frame.
        lo = np.array([r + 1.0, r + 1.0])
        hi = np.array([W - 2.0 - r, H - 2.0 - r])
        if o.get("start") is not None:
            start = np.asarray(o["start"], np.float64)
        else:
            start = np.empty(2)
            for a in range(2):
                s0, s1, fits = _start_range(lo[a], hi[a], v[a] * (T - 1))
                if not cfg.avoid_bounce or not fits:
                    s0, s1 = lo[a], hi[a]
                start[a] = rng.uniform(s0, s1) if s1 > s0 else (s0 + s1) / 2
        cx = _fold(start[0] + v[0] * t, lo[0], hi[0])
        cy = _fold(start[1] + v[1] * t, lo[1], hi[1])
        bounced = bool(np.any(np.abs(cx - (start[0] + v[0] * t)) > 1e-6)
                       or np.any(np.abs(cy - (start[1] + v[1] * t)) > 1e-6))
        mask = _shape_mask(o["shape"], cx, cy, r, H, W)  # (T, H, W)
        frames[mask] = COLORS[o["color"]]
        area = mask.sum(axis=(1, 2))
        if occluder is not None:
            hidden = mask[:, :, occluder["x0"]:occluder["x1"]].sum(axis=(1, 2))
            visible = np.where(area > 0, 1.0 - hidden / np.maximum(area, 1), 0.0)
        else:
            visible = (area > 0).astype(np.float64)
        objects.append({
            "shape": o["shape"], "color": o["color"], "size": o["size"], "motion": o["motion"],
            "radius": round(float(r), 4), "speed": round(speed, 4),
            "velocity": [round(float(v[0]), 4), round(float(v[1]), 4)],
            "trajectory": [[round(float(x), 3), round(float(y), 3)] for x, y in zip(cx, cy)],
            "visible": [round(float(x), 4) for x in visible],
            "bounced": bounced,
        })

    if occluder is not None:  # drawn last: objects pass behind it
        frames[:, :, occluder["x0"]:occluder["x1"]] = OCCLUDER_COLOR

    meta = {
        "seed": int(seed), "frames": T, "height": H, "width": W,
        "objects": objects,
        "background": {"colors": bg_names, "split": split},
        "occluder": occluder,
    }
    return {"frames": frames, "caption": caption_from_meta(meta), "meta": meta}


def generate_clip(seed: int, cfg: WorldConfig | None = None) -> dict[str, Any]:
    """A random world clip, deterministic in (seed, cfg): dict(frames uint8 (T, H, W, 3),
    caption str, meta JSON-serialisable dict)."""
    cfg = cfg or WorldConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0]))
    return render_from_spec(sample_spec(rng, cfg), seed, cfg)


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

def _object_phrase(o: dict[str, Any], image: bool = False) -> str:
    if image:  # a 1-frame clip shows no motion: its caption names none
        return f"a {o['size']} {o['color']} {o['shape']}"
    verb = "stays still" if o["motion"] == "still" else f"moves {o['motion']}"
    return f"a {o['size']} {o['color']} {o['shape']} {verb}"


def caption_from_meta(meta: dict[str, Any]) -> str:
    """The caption grammar, from ground truth (or a spec):
    OBJ [, OBJ]* [and OBJ] [behind a gray wall] on a BG [and BG] background, with
    OBJ = "a SIZE COLOR SHAPE (moves DIR | stays still)" ("a SIZE COLOR SHAPE" in a 1-frame
    image). E.g. "a large red circle moves right behind a gray wall on a black background"."""
    image = meta.get("frames") == 1
    phrases = [_object_phrase(o, image) for o in meta["objects"]]
    if len(phrases) == 1:
        text = phrases[0]
    else:
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if meta.get("occluder"):
        text += " behind a gray wall"
    bg = _normalize_background(meta.get("background"))
    return text + f" on a {' and '.join(bg)} background"


def meta_to_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------
# Evaluation prompts (the world benchmark's fixed prompts, with their ground truth)
# ----------------------------------------------------------------------------------------------

_EVAL_MOTIONS = ("right", "left", "up", "down", "up-right", "down-left", "up-left", "down-right")
# Prompt seeds of the two splits (disjoint). Their ground truth is drawn from SeedSequence stream
# `_EVAL_STREAM` ([seed, 2]); training clips use streams 0 (spec) and 1 (render) of their
# clip_seed, so no evaluation clip shares random draws with a training clip even where the
# integers happen to meet.
EVAL_SEED_BASE = {"test": 1000, "validation": 5000}
_EVAL_STREAM = 2
_GAP = 2.0  # pixels kept between ground-truth objects, and between objects and a wall they avoid


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    caption: str
    spec: dict[str, Any]
    seed: int


def _make_eval_prompts(split: str) -> list[EvalPrompt]:
    """Prompts of one split. The test split (48): 24 single objects (3 rounds over the 8 colours,
    all 8 directions, shapes x sizes, backgrounds cycling over the 4), 2 still objects, 4
    single objects on two-tone backgrounds, 8 two-object and 2 three-object prompts and 8 wall
    prompts (the first object crosses behind the wall moving left or right; some with a second
    object). The validation split (24) takes the same recipe with other attribute rotations and
    fewer rounds. Objects within a prompt have distinct colours."""
    rot, rounds, n_still, n_two_tone, n_two, n_three, n_wall = (
        (0, 3, 2, 4, 8, 2, 8) if split == "test" else (1, 1, 2, 2, 5, 1, 6))
    colors, sizes, bgs = list(COLORS), list(SIZES), list(BACKGROUNDS)

    def obj(i, shape=None, size=None, motion=None):
        return {"shape": shape or SHAPES[(i + rot) % 3], "color": colors[i % 8],
                "size": size or sizes[(i // 3 + rot) % 2],
                "motion": motion or _EVAL_MOTIONS[(i + rot) % 8]}

    specs = []  # (objects, background, occluder)
    for k in range(rounds):
        for i in range(8):
            specs.append(([obj(i, SHAPES[(i + k + rot) % 3], sizes[(i + k + rot) % 2],
                               _EVAL_MOTIONS[(i + 3 * k + rot) % 8])], [bgs[(i + k + rot) % 4]], False))
    for j in range(n_still):
        specs.append(([obj(3 + 5 * j + rot, motion="still")], [bgs[(j + 1 + rot) % 4]], False))
    for j in range(n_two_tone):
        specs.append(([obj(2 * j + 1 + rot)], [bgs[j % 4], bgs[(j + 1 + rot) % 4]], False))
    for j in range(n_two):
        a, b = obj(j + rot, size="small"), obj(j + 3 + rot, motion=_EVAL_MOTIONS[(j + 4) % 8])
        if j % 4 == 3:
            b["motion"] = "still"
        specs.append(([a, b], [bgs[(j + rot) % 4]], False))
    for j in range(n_three):
        specs.append(([obj(j + 2 * m + rot, size="small") for m in (0, 2, 5)],
                      [bgs[(j + 2 + rot) % 4]], False))
    for j in range(n_wall):
        lead = obj(j + 4 + rot, size="large" if j % 4 == 3 else "small",
                   motion="right" if j % 2 == 0 else "left")
        objects = [lead]
        if j % 3 == 1:  # a second object that stays on one side of the wall
            objects.append(obj(j + 1 + rot, size="small", motion=("up", "down", "still")[(j // 3) % 3]))
        bg = [bgs[j % 4]] if j != n_wall - 1 else [bgs[(j + 1) % 4], bgs[(j + 2) % 4]]
        specs.append((objects, bg, True))
    prompts = []
    for j, (objects, bg, occ) in enumerate(specs):
        spec = {"objects": objects, "background": bg, "occluder": occ}
        prompts.append(EvalPrompt(caption_from_meta(spec), spec, EVAL_SEED_BASE[split] + j))
    return prompts


TEST_PROMPTS: list[EvalPrompt] = _make_eval_prompts("test")  # for reporting
VALIDATION_PROMPTS: list[EvalPrompt] = _make_eval_prompts("validation")  # for choosing settings
EVAL_PROMPTS = TEST_PROMPTS  # the name older callers use
PROMPT_SETS = {"test": TEST_PROMPTS, "validation": VALIDATION_PROMPTS}


def _half_width(o: dict[str, Any], S: int) -> float:
    r = SIZES[o["size"]] * S
    return 0.9 * r if o["shape"] == "square" else r


def _boxes(cx, cy, e):
    return np.stack([cx - e, cy - e, cx + e, cy + e], -1)  # (T, 4) x0, y0, x1, y1


def _clear(a: np.ndarray, b: np.ndarray, gap: float) -> bool:
    """True when boxes (T, 4) a and b are at least `gap` pixels apart in every frame."""
    sep = np.maximum(np.maximum(b[:, 0] - a[:, 2], a[:, 0] - b[:, 2]),
                     np.maximum(b[:, 1] - a[:, 3], a[:, 1] - b[:, 3]))
    return bool(np.all(sep >= gap))


def _draw_path(rng, o, lead, wall, cfg: WorldConfig, vmin, vmax):
    """One straight in-frame path for object o -> (boxes (T, 4), o with speed and start). The
    first object of a wall prompt moving left or right (`lead`) crosses behind the wall."""
    T, H, W, S = cfg.frames, cfg.height, cfg.width, cfg.scale
    t = np.arange(T, dtype=np.float64)
    r, e = SIZES[o["size"]] * S, _half_width(o, S)
    lo = np.array([r + 1.0, r + 1.0])
    hi = np.array([W - 2.0 - r, H - 2.0 - r])
    d = np.asarray(MOTIONS[o["motion"]], np.float64)
    room = float(np.min(np.where(np.abs(d) > 0, hi - lo, np.inf))) if d.any() else np.inf
    vcap = min(vmax, room * 0.99 / max(T - 1, 1))
    speed = 0.0 if o["motion"] == "still" else float(rng.uniform(min(vmin, vcap), vcap))
    start = np.array([rng.uniform(*_start_range(lo[a], hi[a], d[a] * speed * (T - 1))[:2])
                      for a in range(2)])
    if lead and o["motion"] in ("left", "right"):
        # Crossing in the frame of a rightward move (mirrored for leftward).
        sgn = 1.0 if o["motion"] == "right" else -1.0
        w0, w1 = (wall if sgn > 0 else (W - wall[1], W - wall[0]))
        travel = (w1 + 1 + e) - (w0 - 2 - e)  # fully left of the wall -> fully right of it
        if travel <= vcap * (T - 1):
            speed = float(rng.uniform(max(travel / max(T - 1, 1), min(vmin, vcap)), vcap))
            x_start = w0 - 2 - e - rng.uniform(0, speed * (T - 1) - travel)
        else:  # too slow to come out: fully visible for a few frames, then goes behind
            x_start = w0 - 2 - e - min(2, T - 1) * speed
        x_start = max(min(x_start, hi[0] - speed * (T - 1)), lo[0])
        start[0] = x_start if sgn > 0 else (W - 1) - x_start
    box = _boxes(start[0] + d[0] * speed * t, start[1] + d[1] * speed * t, e)
    return box, dict(o, speed=speed, start=[float(start[0]), float(start[1])])


def _place_eval_spec(spec: dict[str, Any], seed: int, cfg: WorldConfig) -> dict[str, Any]:
    """A render spec with every random choice made (wall, split, speeds, starts), so that
    render_from_spec draws nothing: straight paths inside the frame, objects `_GAP` apart, only
    the first object of a wall prompt meets the wall and, when its speed allows (small objects
    at 32x32x9), it is fully visible before and after crossing behind it."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _EVAL_STREAM]))
    T, W, S = cfg.frames, cfg.width, cfg.scale
    out = dict(spec, objects=[])
    if len(_normalize_background(spec.get("background"))) == 2:
        out["split"] = ("vertical", "horizontal")[int(rng.integers(2))]
    wall = None
    if spec.get("occluder"):
        ow = max(1, int(round(cfg.occluder_width * W)))
        x0 = (W - ow) // 2 + int(rng.integers(-1, 2))
        lead = spec["objects"][0]
        e, r = _half_width(lead, S), SIZES[lead["size"]] * S
        if (lead["motion"] in ("left", "right")  # cannot cross (too slow, too big): room to approach
                and (ow + 3 + 2 * e > cfg.speed_range[1] * S * (T - 1) or (W - ow) // 2 - 3 - e < r + 1)):
            x0 = 3 * W // 4 - ow if lead["motion"] == "right" else W // 4
        x0 = int(np.clip(x0, W // 4, max(W // 4, 3 * W // 4 - ow)))
        wall = (x0, x0 + ow)
        out["occluder"] = {"x0": x0, "x1": x0 + ow}
    vmin, vmax = (v * S for v in cfg.speed_range)
    best = None
    for attempt in range(100):  # whole arrangements: objects placed in turn, each with a few tries
        placed, objects, failed = [], [], 0
        slow = 1.0 - 0.6 * attempt / 100  # long clips in small frames: slower paths fit side by side
        for i, o in enumerate(spec["objects"]):
            for _ in range(20):
                box, placed_o = _draw_path(rng, o, i == 0 and wall is not None, wall, cfg,
                                           vmin * slow, vmax * slow)
                ok = all(_clear(box, b, _GAP) for b in placed)
                wall_box = None if wall is None else np.tile([wall[0], -1e3, wall[1] - 1, 1e3], (T, 1))
                if ok and wall is not None and not (i == 0 and o["motion"] in ("left", "right")):
                    ok = _clear(box, wall_box, _GAP + 0.5)
                elif ok and wall is not None:  # the crosser starts in the open
                    ok = _clear(box[:1], wall_box[:1], 1.5)
                if ok:
                    break
            failed += not ok
            placed.append(box)
            objects.append(placed_o)
        if best is None or failed < best[0]:
            best = (failed, objects)
        if not failed:
            break
    out["objects"] = best[1]
    return out


def render_prompt(prompt: EvalPrompt, cfg: WorldConfig | None = None,
                  seed_offset: int = 0) -> dict[str, Any]:
    """Ground-truth clip for an eval prompt at cfg's size (`_place_eval_spec`: no bounce, no
    overlaps, wall crossings), rendered by render_from_spec. Deterministic in (prompt.seed +
    seed_offset, cfg)."""
    cfg = cfg or WorldConfig()
    seed = prompt.seed + seed_offset
    spec = _place_eval_spec(prompt.spec, seed, cfg)
    return render_from_spec(spec, seed, dataclasses.replace(cfg, avoid_bounce=True))
