"""World-clip analyzer: what a generated clip shows, measured against its prompt's spec.

numpy only (~15 ms a 9x32x32 clip). `analyze_clip(frames (T, H, W, 3), spec)` takes a spec in
world.py's format ({"objects": [{shape, color, size, motion}], "background": [name(s)],
"occluder": bool}) and measures the wall (known gray columns, excluded everywhere), the background
of every frame (plain or two halves), the objects (pixels labelled by their nearest
background->colour line, connected components per frame bridged across the wall, split by colour,
linked over frames into tracks, matched to the prompt's objects) with their colour, shape, size,
direction and speed, persistence (nothing appears, vanishes or changes size without cause),
object permanence behind the wall and temporal consistency (flicker, jumps).
docs/EVALUATION.md describes each measurement and its thresholds.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any

import numpy as np

from sorajax.data import world as world_lib

# ==============================================================================================
# Thresholds (distances in RGB [0, 1]; lengths as fractions of S = min(H, W))
# ==============================================================================================
LO = 0.12  # a pixel this far from the background may be foreground
CORE_ALPHA = 0.5  # ... and is when it lies at least this far along its background->colour line
MAX_RESIDUAL = 0.3  # farther than this from every colour line: not a world colour
BG_TOL = 0.09  # a region median within this of a world background is that background
SPLIT_TOL, SPLIT_GAIN = 0.1, 0.03  # two-tone: halves' medians this far apart, fitting this much better
WALL_TOL, WALL_FRACTION = 0.12, 0.8  # wall columns: gray within WALL_TOL in >= 80% of pixels
MIN_AREA_FRAC = 0.35  # components under this fraction of the smallest object's area are noise
SPLIT_SHARE = 0.3  # a component splits by colour when a second colour has this share of it
STILL_THRESHOLD = 0.1  # displacement over the clip below which an object is still
MOVE_THRESHOLD = 0.1  # displacement a moving object must at least reach
COS_THRESHOLD = 0.8  # cosine to the prompted direction (rejects the neighbour at 45 degrees)
SPEED_MAX = 0.1  # per frame; the world moves at 0.03-0.065
# Area stability over the frames where an object is fully visible, as log-area tolerances
# base + PIXEL_SLACK / r (r: the object's equivalent radius in pixels; pixelation moves the
# area of a 3-pixel object by +-20% as it moves): max / min area, and the change between the first
# and last such frames along the least-squares trend of log area.
AREA_RATIO_BASE, AREA_TREND_BASE, PIXEL_SLACK = 0.15, 0.15, 1.2
POS_TOL, POS_TOL_GROWTH = 0.09, 0.02  # re-emergence position tolerance (+ growth per frame)
FLICKER_BG = 0.06  # frame-to-frame jump of a background region's luminance
FLICKER_OBJ = 0.12  # frame-to-frame jump of an object's median luminance
TRACK_RESIDUAL = 0.05  # largest distance of a visible object's centre from its straight track

_PALETTE_NAMES = list(world_lib.COLORS)
_PALETTE = np.asarray([world_lib.COLORS[c] for c in _PALETTE_NAMES], np.float32) / 255.0  # (K, 3)
_BG_NAMES = list(world_lib.BACKGROUNDS)
_BG = np.asarray([world_lib.BACKGROUNDS[c] for c in _BG_NAMES], np.float32) / 255.0
_WALL = np.asarray(world_lib.OCCLUDER_COLOR, np.float32) / 255.0
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def to_unit(frames) -> np.ndarray:
    """uint8 [0, 255], float [0, 1] (or float [-1, 1]) -> float32 [0, 1], (T, H, W, 3)."""
    x = np.asarray(frames)
    if x.ndim == 3:  # an image is a 1-frame video
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3), got {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if np.nanmin(x) < -0.05:  # [-1, 1] convention
        x = (x + 1.0) / 2.0
    return np.clip(np.nan_to_num(x), 0.0, 1.0)


# ==============================================================================================
# Scene: wall and background
# ==============================================================================================

def _find_wall(x: np.ndarray) -> tuple[int, int] | None:
    """[x0, x1) of the widest run of gray columns, or None."""
    gray = np.linalg.norm(x - _WALL, axis=-1) < WALL_TOL  # (T, H, W)
    cols = np.concatenate([[0], gray.mean(axis=(0, 1)) >= WALL_FRACTION, [0]]).astype(int)  # (W + 2,)
    edges = np.diff(cols)
    runs = list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))
    return tuple(int(v) for v in max(runs, key=lambda r: r[1] - r[0])) if runs else None


def _name_bg(c: np.ndarray) -> str | None:
    d = np.linalg.norm(_BG - c, axis=-1)
    return _BG_NAMES[int(d.argmin())] if d.min() <= BG_TOL else None


def _background(x: np.ndarray, wall) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Per-pixel background estimate (T, H, W, 3) and per-frame {layout, names, luma}: plain or
    two halves, whichever fits the frame best (mean distance to the region medians; a split must
    gain SPLIT_GAIN and its halves differ by SPLIT_TOL)."""
    T, H, W, _ = x.shape
    keep = np.ones(W, bool)
    if wall:
        keep[wall[0]:wall[1]] = False
    rows, cols = np.mgrid[0:H, 0:W]
    layouts = {"plain": [np.ones((H, W), bool)], "vertical": [cols < W // 2, cols >= W // 2],
               "horizontal": [rows < H // 2, rows >= H // 2]}
    fits = {}
    for name, regions in layouts.items():
        img, meds = np.empty_like(x), []
        for r in regions:
            m = np.median(x[:, r & keep[None, :]], axis=1)  # (T, 3)
            img[:, r] = m[:, None]
            meds.append(m)
        fits[name] = (np.linalg.norm(x - img, axis=-1)[:, :, keep].mean(axis=(1, 2)), meds, img)  # (T,)
    bgimg, frames = np.empty_like(x), []
    for t in range(T):
        split = min(("vertical", "horizontal"), key=lambda k: fits[k][0][t])
        m = [c[t] for c in fits[split][1]]
        layout = (split if fits["plain"][0][t] - fits[split][0][t] > SPLIT_GAIN
                  and np.linalg.norm(m[0] - m[1]) > SPLIT_TOL else "plain")
        bgimg[t] = fits[layout][2][t]
        meds = [c[t] for c in fits[layout][1]]
        frames.append({"layout": layout, "names": [_name_bg(c) for c in meds],
                       "luma": [float(c @ _LUMA) for c in meds]})
    return bgimg, frames


def _background_ok(frames: list[dict[str, Any]], want: list[str]) -> bool:
    """Every frame shows the prompted background (two-tone halves in either order)."""
    return all(None not in f["names"] and set(f["names"]) == set(want) and len(f["names"]) >= len(set(want))
               for f in frames)


# ==============================================================================================
# Objects: pixel labels, components, tracks
# ==============================================================================================

def _label_pixels(x: np.ndarray, bgimg: np.ndarray, wall):
    """-> colour index (T, H, W) (-1: not an object pixel), alpha along the colour's line."""
    d = x - bgimg  # (T, H, W, 3)
    cand = np.linalg.norm(d, axis=-1) >= LO  # (T, H, W)
    if wall:
        cand[:, :, wall[0]:wall[1]] = False
    labels = np.full(cand.shape, -1, np.int64)
    alpha_map = np.zeros(cand.shape, np.float32)
    if cand.any():
        dc = d[cand]  # (N, 3)
        v = _PALETTE[None] - bgimg[cand][:, None, :]  # (N, K, 3)
        alpha = np.clip((dc[:, None, :] * v).sum(-1) / np.maximum((v * v).sum(-1), 1e-6), 0.0, 1.0)
        res = np.linalg.norm(dc[:, None, :] - alpha[..., None] * v, axis=-1)  # (N, K)
        k = res.argmin(-1)
        a, r = alpha[np.arange(len(k)), k], res[np.arange(len(k)), k]
        labels[cand], alpha_map[cand] = np.where((a >= CORE_ALPHA) & (r <= MAX_RESIDUAL), k, -1), a
    return labels, alpha_map


def _connected(mask: np.ndarray, bridge: np.ndarray) -> np.ndarray:
    """8-connected labels (T, H, W) of `mask | bridge` by min-label propagation; -1 outside."""
    T, H, W = mask.shape
    on = mask | bridge
    big = np.iinfo(np.int64).max
    lab = np.where(on, np.arange(T * H * W).reshape(T, H, W), big)
    while True:
        p = np.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        m = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                m = np.minimum(m, p[:, dy:dy + H, dx:dx + W])
        m = np.where(on, m, big)
        if np.array_equal(m, lab):
            break
        lab = m
    return np.where(mask, lab, -1)


def _min_area(S: int) -> float:
    return MIN_AREA_FRAC * min(world_lib.SHAPE_AREA.values()) * (min(world_lib.SIZES.values()) * S) ** 2


def _components(x, labels, alpha, wall, S) -> list[list[dict[str, Any]]]:
    """Per frame: components {color, area, box (x0, y0, x1, y1), fill, asym, aspect, luma, ...}."""
    T, H, W = labels.shape
    bridge = np.zeros_like(labels, bool)
    if wall:
        bridge[:, :, wall[0]:wall[1]] = True
    lab = _connected(labels >= 0, bridge)
    luma = x @ _LUMA  # (T, H, W)
    min_area = _min_area(S)
    out = []
    for t in range(T):
        comps = []
        for i in np.unique(lab[t][lab[t] >= 0]):
            rr, cc = np.nonzero(lab[t] == i)
            ks = labels[t, rr, cc]
            counts = np.bincount(ks, weights=alpha[t, rr, cc], minlength=len(_PALETTE_NAMES))
            order = np.argsort(-counts)
            parts = [order[0]]
            if counts[order[1]] >= SPLIT_SHARE * counts.sum() and (ks == order[1]).sum() >= min_area:
                parts.append(order[1])
            for k in parts:
                sel = (ks == k) if len(parts) > 1 else np.ones(len(ks), bool)
                c = _describe(rr[sel], cc[sel], int(k), luma[t], alpha[t], wall, H, W)
                c["purity"] = float(counts[k] / max(counts.sum(), 1e-6))
                c["clear"] = not (c["wall_touch"] or c["border"]) and c["area"] >= min_area
                if c["area"] >= min_area or (c["wall_touch"] and c["area"] >= 2):  # + slivers at the wall
                    comps.append(c)
        out.append(comps)
    return out


def _describe(rr, cc, k, luma, alpha, wall, H, W) -> dict[str, Any]:
    y0, y1, x0, x1 = int(rr.min()), int(rr.max()), int(cc.min()), int(cc.max())
    h, w = y1 - y0 + 1, x1 - x0 + 1
    core = alpha[rr, cc] >= 0.8
    wall_touch = bool(wall) and bool(np.any((cc == wall[0] - 1) | (cc == wall[1])))
    return {
        "color": k, "area": int(len(rr)), "box": (x0, y0, x1, y1),
        "center": ((x0 + x1) / 2.0, (y0 + y1) / 2.0),
        "fill": len(rr) / float(h * w),
        "asym": float((rr.mean() - y0) / (h - 1) - 0.5) if h > 1 else 0.0,
        "aspect": float(np.log(w / h)),
        "luma": float(np.median(luma[rr, cc][core] if core.any() else luma[rr, cc])),
        "wall_touch": wall_touch,
        "side": (None if not wall else "left" if x1 < wall[0] else "right" if x0 >= wall[1] else "both"),
        "border": bool(x0 == 0 or y0 == 0 or x1 == W - 1 or y1 == H - 1),
    }


def _track(comps: list[list[dict[str, Any]]], S: int) -> list[dict[int, dict[str, Any]]]:
    """Links components over frames (same colour, nearest to the predicted centre)."""
    tracks: list[dict[int, dict[str, Any]]] = []
    for t, frame in enumerate(comps):
        pairs = []
        for ci, c in enumerate(frame):
            for ti, tr in enumerate(tracks):
                last = max(tr)
                if last >= t or tr[last]["color"] != c["color"]:
                    continue
                seen = sorted(tr)[-2:]
                p = np.asarray(tr[last]["center"])
                if len(seen) == 2:
                    p = p + (p - np.asarray(tr[seen[0]]["center"])) / (seen[1] - seen[0]) * (t - last)
                dist = float(np.linalg.norm(np.asarray(c["center"]) - p))
                if dist <= S * (0.25 + 0.1 * (t - last - 1)):
                    pairs.append((dist, ci, ti))
        used_c, used_t = set(), set()
        for _, ci, ti in sorted(pairs):
            if ci not in used_c and ti not in used_t:
                tracks[ti][t] = frame[ci]
                used_c, used_t = used_c | {ci}, used_t | {ti}
        tracks.extend({t: c} for ci, c in enumerate(frame) if ci not in used_c)
    return tracks


# ==============================================================================================
# Per-object measurements
# ==============================================================================================

@functools.lru_cache(maxsize=8)
def _shape_refs(S: int) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(size, shape) -> (low, high) of (fill, asym, |aspect|) over ground-truth renders at
    random sub-pixel centres, widened by a margin for blur and noise."""
    rng = np.random.default_rng(0)
    margin = np.array([0.06, 0.06, 0.15])
    refs = {}
    for size, rf in world_lib.SIZES.items():
        r = rf * S
        c = rng.uniform(r + 2, S - r - 2, (48, 2))
        for shape in world_lib.SHAPES:
            masks = world_lib._shape_mask(shape, c[:, 0], c[:, 1], r, S, S)  # (N, S, S)
            ds = [_describe(*np.nonzero(m), 0, np.zeros((S, S)), np.ones((S, S)), None, S, S)
                  for m in masks if m.any()]  # (tiny frames: a shape may cover no pixel centre)
            f = np.asarray([(d["fill"], d["asym"], abs(d["aspect"])) for d in ds]
                           or [(0.0, 0.0, 0.0), (1.0, 0.5, 9.0)])  # nothing measured: anything goes
            refs[(size, shape)] = (f.min(0) - margin, f.max(0) + margin)
    return refs


def _plausible_shapes(c: dict[str, Any], size: str, S: int) -> set[str]:
    f, refs = np.array([c["fill"], c["asym"], abs(c["aspect"])]), _shape_refs(S)
    return {s for s in world_lib.SHAPES if np.all((f >= refs[(size, s)][0]) & (f <= refs[(size, s)][1]))}


def _size_class(area: float, shape: str, S: int) -> tuple[str, float]:
    radius = float(np.sqrt(area / world_lib.SHAPE_AREA[shape])) / S
    name = min(world_lib.SIZES, key=lambda k: abs(np.log(radius / world_lib.SIZES[k])))
    return name, radius


def _fit(ts, vals):
    """Least-squares (intercept, slope) over the finite values; None with < 2 distinct times."""
    ts, vals = np.asarray(ts, np.float64), np.asarray(vals, np.float64)
    ok = np.isfinite(vals)
    if ok.sum() < 2 or np.ptp(ts[ok]) == 0:
        return None
    slope, icpt = np.polyfit(ts[ok], vals[ok], 1)
    return float(icpt), float(slope)


def _measure(tr: dict[int, dict[str, Any]], obj: dict[str, Any], T: int, S: int, wall) -> dict[str, Any]:
    """Colour, shape, size, motion of a track, judged against one prompted object."""
    clear = [t for t in sorted(tr) if tr[t]["clear"]]
    use = clear or sorted(tr)
    area = float(np.median([tr[t]["area"] for t in use]))
    hw = float(np.median([(tr[t]["box"][2] - tr[t]["box"][0]) / 2 for t in use]))
    hh = float(np.median([(tr[t]["box"][3] - tr[t]["box"][1]) / 2 for t in use]))
    size0, _ = _size_class(area, obj["shape"], S)
    plaus = [_plausible_shapes(tr[t], size0, S) for t in clear]
    votes = {s: sum(s in p for p in plaus) for s in world_lib.SHAPES}
    best = max(world_lib.SHAPES, key=lambda s: votes[s])
    if votes[obj["shape"]] == votes[best]:  # pixel-identical shapes (a 5x5 circle is a square)
        best = obj["shape"]
    shape = best if clear and votes[best] >= 0.5 * len(clear) else None
    shape_ok = bool(clear) and votes[obj["shape"]] >= 0.5 * len(clear)
    size, radius = _size_class(area, shape or obj["shape"], S)
    est = {t: _estimate(tr[t], hw, hh, wall) for t in sorted(tr)}
    ts = sorted(est)
    fx = _fit(ts, [est[t][0] for t in ts])
    fy = _fit(ts, [est[t][1] for t in ts])
    color = _PALETTE_NAMES[tr[use[0]]["color"]]
    m: dict[str, Any] = dict(
        color=color, color_ok=color == obj["color"], shape=shape, shape_ok=shape_ok, size=size,
        size_ok=size == obj["size"], fill_ratio=float(np.median([tr[t]["fill"] for t in use])),
        radius=radius, area=area, half=(hw, hh), frames=ts, estimates=est, clear_frames=clear,
        purity=float(np.mean([tr[t]["purity"] for t in use])))
    if fx is None and fy is None:
        return dict(m, fit=None, displacement=None, displacement_norm=None, direction_cosine=None,
                    speed=None, direction_ok=False)
    fx = fx or (float(np.nanmean([est[t][0] for t in ts])), 0.0)
    fy = fy or (float(np.nanmean([est[t][1] for t in ts]) if any(np.isfinite(est[t][1]) for t in ts)
                      else 0.0), 0.0)
    disp = np.array([fx[1], fy[1]]) * (T - 1)
    norm = float(np.linalg.norm(disp)) / S
    speed = float(np.hypot(fx[1], fy[1])) / S
    want = np.asarray(world_lib.MOTIONS[obj["motion"]])
    if obj["motion"] == "still":
        cos, ok = None, norm < STILL_THRESHOLD
    else:
        cos = float(disp @ want / max(np.linalg.norm(disp), 1e-6))
        ok = norm >= MOVE_THRESHOLD and cos >= COS_THRESHOLD and speed <= SPEED_MAX
    m.update(fit=(fx, fy), displacement=[float(disp[0]), float(disp[1])], displacement_norm=norm,
             direction_cosine=cos, speed=speed, direction_ok=bool(ok))
    return m


def _estimate(c: dict[str, Any], hw: float, hh: float, wall) -> tuple[float, float]:
    """Centre of the whole object from a component: its box centre, or with part of it behind the
    wall, the visible (outer) edge minus the half extent."""
    x0, y0, x1, y1 = c["box"]
    if c["clear"] or c["border"]:
        return c["center"] if c["clear"] else (np.nan, np.nan)
    cy = (y0 + y1) / 2 if (y1 - y0) / 2 >= 0.8 * hh else np.nan
    return {"left": (x0 + hw, cy), "right": (x1 - hw, cy)}.get(c["side"], ((x0 + x1) / 2, cy))


def _predict(fit, t):
    return np.array([fit[0][0] + fit[0][1] * t, fit[1][0] + fit[1][1] * t])


def _behind_or_out(p, hw, hh, wall, H, W) -> bool:
    """Whether an object predicted at centre p may be hidden (touches the wall) or leave the frame."""
    if p[0] - hw < 0 or p[0] + hw > W - 1 or p[1] - hh < 0 or p[1] + hh > H - 1:
        return True
    return bool(wall) and p[0] + hw + 1 >= wall[0] and p[0] - hw - 1 <= wall[1] - 1


def _persistence(tr, m, T, H, W, S, wall) -> list[str]:
    """Why the object is not persistent: vanished (outside the wall's cover) or changed size."""
    issues = []
    if m["fit"] is not None:
        hw, hh = m["half"]
        gone = [t for t in range(T) if t not in tr
                and not _behind_or_out(_predict(m["fit"], t), hw, hh, wall, H, W)]
        if gone:
            issues.append(f"missing in frames {gone}")
    elif len(tr) < T:
        issues.append(f"seen in {len(tr)} of {T} frames")
    clear = m["clear_frames"]
    areas = np.array([tr[t]["area"] for t in clear], np.float64)
    slack = PIXEL_SLACK / np.sqrt(max(m["area"], 1.0) / np.pi)
    if len(areas) >= 2 and np.log(areas.max() / areas.min()) > AREA_RATIO_BASE + slack:
        issues.append(f"area {areas.min():.0f}..{areas.max():.0f}")
    if len(areas) >= 4:
        change = np.polyfit(np.asarray(clear, np.float64), np.log(areas), 1)[0] * np.ptp(clear)
        if abs(change) > AREA_TREND_BASE + slack:
            issues.append(f"area changes x{np.exp(change):.2f} over the clip")
    return issues


def _permanence(tr, m, size: str, T, H, W, S, wall) -> tuple[bool | None, list[str]]:
    """Does an object that goes behind the wall come out where and when its motion before the
    wall says, with its colour, shape and size? None: it does not cross in this clip."""
    if not wall or not tr:
        return None, []
    ts = sorted(tr)
    entry = next((tr[t]["side"] for t in ts if tr[t]["side"] in ("left", "right")), None)
    if entry is None or tr[ts[0]]["side"] != entry:
        return None, []
    pre = []
    for t in range(ts[0], T):
        if t not in tr or tr[t]["side"] != entry:
            break
        pre.append(t)
    est = m["estimates"]
    fx = _fit(pre, [est[t][0] for t in pre])
    if fx is None:
        return None, []
    ys = [est[t][1] for t in pre if np.isfinite(est[t][1])]
    fy = _fit(pre, [est[t][1] for t in pre]) or ((float(np.mean(ys)) if ys else 0.0), 0.0)
    sgn = 1.0 if entry == "left" else -1.0
    if fx[1] * sgn <= 0:
        return None, []
    hw, hh = m["half"]
    pre_clear = [t for t in pre if tr[t]["clear"]]
    ref_area = np.median([tr[t]["area"] for t in pre_clear]) if pre_clear else None
    ref_shapes = set().union(*[_plausible_shapes(tr[t], size, S) for t in pre_clear])
    exit_side = "right" if sgn > 0 else "left"
    last, issues, checked, after = pre[-1], [], 0, []
    for t in range(last + 1, T):
        p = _predict((fx, fy), t)
        if p[0] - hw < 0 or p[0] + hw > W - 1:
            continue
        lead = p[0] + sgn * hw
        emerged = lead >= wall[1] + 2 if sgn > 0 else lead <= wall[0] - 3  # 3 columns out
        c = tr.get(t)
        tol = S * (POS_TOL + POS_TOL_GROWTH * (t - last))
        if not emerged:
            if c is not None and c["side"] == exit_side and sgn * (c["box"][int(1 + sgn)] - lead) > tol:
                issues.append(f"frame {t}: out before its motion brings it out")
            continue
        checked += 1
        if c is None or c["side"] not in (exit_side, "both"):
            issues.append(f"frame {t}: not out of the wall")
            continue
        edge = c["box"][2] if sgn > 0 else c["box"][0]
        if abs(edge - lead) > tol:
            issues.append(f"frame {t}: leading edge at {edge}, expected {lead:.1f}")
        fully_out = (p[0] - hw >= wall[1] + 1) if sgn > 0 else (p[0] + hw <= wall[0] - 2)
        if fully_out and c["clear"]:
            if np.linalg.norm(np.asarray(c["center"]) - p) > tol:
                issues.append(f"frame {t}: at {c['center']}, expected ({p[0]:.1f}, {p[1]:.1f})")
            after.append(c)
        elif fully_out and (p[0] - hw - wall[1] if sgn > 0 else wall[0] - 1 - p[0] - hw) > tol:
            issues.append(f"frame {t}: still at the wall, expected clear of it")
    # Same size and shape as before the wall, in most frames where it is out again.
    if after and ref_area and np.mean([1 / 1.6 <= c["area"] / ref_area <= 1.6 for c in after]) < 0.5:
        issues.append(f"area {[c['area'] for c in after]} after the wall, {ref_area:.0f} before")
    if after and ref_shapes and np.mean([bool(ref_shapes & _plausible_shapes(c, size, S))
                                         for c in after]) < 0.5:
        issues.append(f"no longer a {'/'.join(sorted(ref_shapes))} after the wall")
    if not checked:
        return None, []
    return not issues, issues


# ==============================================================================================
# The clip
# ==============================================================================================

_COST = {"color_ok": 4.0, "shape_ok": 1.0, "size_ok": 1.0, "direction_ok": 1.0}


def _match(objs, tracks, T, S, wall):
    """Prompted objects -> tracks minimising attribute mismatches (colour counts most)."""
    meas = {(i, j): _measure(tr, o, T, S, wall) for i, o in enumerate(objs) for j, tr in enumerate(tracks)}
    best, best_cost = None, None
    n = min(len(objs), len(tracks))
    for js in itertools.permutations(range(len(tracks)), n):
        for iis in itertools.combinations(range(len(objs)), n):
            cost = sum(w * (not meas[(i, j)][k]) for i, j in zip(iis, js) for k, w in _COST.items())
            cost += 10.0 * (len(objs) - n)
            if best_cost is None or cost < best_cost:
                best, best_cost = dict(zip(iis, js)), cost
    return best or {}, meas


def analyze_clip(frames, spec: dict[str, Any]) -> dict[str, Any]:
    """Measures one clip against its prompt's spec (or a bare object dict).

    frames: (T, H, W, 3) uint8, float [0, 1] or [-1, 1]. Returns a JSON-serialisable dict: per
    prompted object its measurements and *_ok flags, extra objects, the background, and the clip's
    color_ok / shape_ok / size_ok / direction_ok / count_ok / background_ok / persistence_ok /
    permanence_ok (None: nothing crossed behind a wall) / temporal_ok / prompt_ok.
    """
    if "objects" not in spec:
        spec = {"objects": [spec], "background": ["black"], "occluder": False}
    objs = spec["objects"]
    want_colors = {o["color"] for o in objs}
    x = to_unit(frames)
    T, H, W, _ = x.shape
    S = min(H, W)
    wall = _find_wall(x)
    bg0 = _background(x, wall)[0]  # first pass; then objects (dilated by 1) painted over with it
    near = np.pad(_label_pixels(x, bg0, wall)[0] >= 0, ((0, 0), (1, 1), (1, 1)))
    near = np.any([near[:, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], axis=0)
    bgimg, bg_frames = _background(np.where(near[..., None], bg0, x), wall)
    want_bg = world_lib._normalize_background(spec.get("background"))
    labels, alpha = _label_pixels(x, bgimg, wall)
    comps = _components(x, labels, alpha, wall, S)
    min_area = _min_area(S)
    tracks = [tr for tr in _track(comps, S) if max(c["area"] for c in tr.values()) >= min_area]
    tracks = sorted(tracks, key=lambda tr: -sum(c["area"] for c in tr.values()))[:6]
    match, meas = _match(objs, tracks, T, S, wall)

    per_obj, persistence_issues, permanence = [], [], []
    for i, o in enumerate(objs):
        rec: dict[str, Any] = {"target": {k: o[k] for k in ("shape", "color", "size", "motion")}}
        if i not in match:
            per_obj.append(dict(rec, found=False, color=None, color_ok=False, shape=None, shape_ok=False,
                                size=None, size_ok=False, displacement=None, direction_cosine=None,
                                direction_ok=False, persistent=False, permanence_ok=None))
            continue
        tr, m = tracks[match[i]], meas[(i, match[i])]
        issues = _persistence(tr, m, T, H, W, S, wall)
        perm, perm_issues = _permanence(tr, m, m["size"], T, H, W, S, wall)
        persistence_issues += [f"{o['color']} {o['shape']}: {s}" for s in issues]
        if perm is not None:
            permanence.append(perm)
        rec.update(found=True, frames=m["frames"], persistent=not issues, persistence_issues=issues,
                   permanence_ok=perm, permanence_issues=perm_issues,
                   **{k: m[k] for k in ("color", "color_ok", "shape", "shape_ok", "fill_ratio", "size",
                                        "size_ok", "radius", "area", "displacement", "displacement_norm",
                                        "direction_cosine", "speed", "direction_ok", "purity")})
        per_obj.append(rec)

    extra = []
    for j, tr in enumerate(tracks):
        if j in match.values():
            continue
        m = _measure(tr, {"shape": "circle", "color": "", "size": "small", "motion": "still"}, T, S, wall)
        issues = _persistence(tr, m, T, H, W, S, wall)
        extra.append(dict(color=m["color"], frames=m["frames"], area=m["area"], transient=bool(issues)))
        if issues:
            persistence_issues.append(f"extra {m['color']} object: {issues[0]}")

    temporal = _temporal(bg_frames, tracks, [meas[(i, j)] for i, j in match.items()], comps, wall, S)
    votes_total = sum(c["area"] for f in comps for c in f)
    votes_prompted = sum(c["area"] for f in comps for c in f if _PALETTE_NAMES[c["color"]] in want_colors)
    out: dict[str, Any] = {
        "objects": per_obj, "extra_objects": extra,
        "count": len(tracks), "count_ok": len(tracks) == len(objs),
        "wall": list(wall) if wall else None, "color_purity": votes_prompted / max(votes_total, 1),
        "background": {"want": want_bg, "layouts": sorted({f["layout"] for f in bg_frames}),
                       "measured": [f["names"] for f in bg_frames]},
        "color": per_obj[0]["color"], "displacement": per_obj[0]["displacement"]}
    attrs = ("color_ok", "shape_ok", "size_ok", "direction_ok")
    out.update({k: all(o[k] for o in per_obj) for k in attrs})
    out["background_ok"] = _background_ok(bg_frames, want_bg) and bool(wall) == bool(spec.get("occluder"))
    cos = [o["direction_cosine"] for o in per_obj if o.get("direction_cosine") is not None]
    out.update(direction_cosine=float(np.mean(cos)) if cos else None,
               persistence_ok=not persistence_issues, persistence_issues=persistence_issues,
               permanence_ok=bool(all(permanence)) if permanence else None,
               temporal_ok=not temporal, temporal_issues=temporal,
               prompt_ok=out["count_ok"] and out["background_ok"] and all(out[k] for k in attrs))
    return _jsonable(out)


def _temporal(bg_frames, tracks, metas, comps, wall, S) -> list[str]:
    """Flicker (background or object luminance jumps between frames) and jerky tracks."""
    issues = []
    for t in range(1, len(bg_frames)):
        a, b = bg_frames[t - 1], bg_frames[t]
        if a["layout"] != b["layout"]:
            issues.append(f"background layout changes at frame {t}")
        elif max(abs(p - q) for p, q in zip(a["luma"], b["luma"])) > FLICKER_BG:
            issues.append(f"background luminance jumps at frame {t}")
    for tr in tracks:
        for t in sorted(tr):
            if t - 1 in tr and abs(tr[t]["luma"] - tr[t - 1]["luma"]) > FLICKER_OBJ:
                issues.append(f"{_PALETTE_NAMES[tr[t]['color']]} object luminance jumps at frame {t}")
                break
    # Jumps: the largest component of each prompted object's colour, frame by frame, should
    # follow a straight line (this sees shuffled frames even where they break the tracks).
    colors = [m["color"] for m in metas]
    for m in metas:
        if colors.count(m["color"]) > 1:
            continue
        k = _PALETTE_NAMES.index(m["color"])
        ts, est = [], []
        for t, frame in enumerate(comps):
            cs = [c for c in frame if c["color"] == k]
            if cs:
                ts.append(t)
                est.append(_estimate(max(cs, key=lambda c: c["area"]), *m["half"], wall))
        est = np.asarray(est, np.float64).reshape(-1, 2)
        fits = [_fit(ts, est[:, a]) for a in range(2)]
        if len(ts) < 3 or fits[0] is None:
            continue
        res = [abs(e - (f[0] + f[1] * t)) for a, f in enumerate(fits) if f is not None
               for t, e in zip(ts, est[:, a]) if np.isfinite(e)]
        if max(res) > TRACK_RESIDUAL * S:
            issues.append(f"{m['color']} object leaves its straight track by {max(res):.1f} px")
    return issues


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, np.bool_, np.integer)):
        return v.item() if isinstance(v, np.generic) else v
    if isinstance(v, (float, np.floating)):
        return round(float(v), 4) if np.isfinite(v) else None
    return v
