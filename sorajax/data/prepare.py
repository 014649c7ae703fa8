"""A folder of videos, images and captions -> a TFDS array_record dataset that training reads
(`data.source='folder'`, `data.dir=DATA_DIR`), plus DATA_DIR/report.json. docs/DATA.md.

    python -m sorajax.data.prepare --src VIDEOS_DIR --out DATA_DIR [--fps 8] [--workers N] \\
        [--frames 9 --height 32 --width 32 [--aspect-ratios 1,1.78,0.56 --durations 9,13] |
         --config configs/videos.py]

    VIDEOS_DIR ─ walk (sorted) ─ captions (sidecar NAME.txt > captions.jsonl > captions.csv)
      ─ per file, in worker processes (sorajax/data/decode.py, JAX-free):
          decode ─ fps ─ resize + centre crop ─ N-frame clips  → DATA_DIR/.work/KEY.{clips,json}
      ─ duplicates (same bytes) ─ splits (hash of the file name) ─ TFDS builder (DATA_DIR/.build)
      ─ rename into DATA_DIR/video_folder/ ─ DATA_DIR/report.json

Native shapes (aspect ratios given, docs/SHAPES.md): each file keeps the configured aspect ratio
nearest its own, at the native size of the pixel budget height x width (shapes.native_size), its
clips the longest configured duration its length allows, an image one frame; the dataset stores
each clip at its shape and lists the shapes in its metadata (builders.folder_source).

Resume: KEY hashes the file's path, size, mtime and the clip settings; KEY.json is written last
(after KEY.clips), so a killed run (even SIGKILL) redoes only the files without a KEY.json, and a
rerun with new files decodes only those. The dataset itself is assembled from .work each run
(cheap next to decoding) and renamed into place, so a reader never sees half of it.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import io
import json
import os
import posixpath
import queue
import shutil
import subprocess
import sys
import threading
from typing import Sequence

import tensorflow_datasets as tfds
from absl import logging as absl_logging
from tqdm import tqdm

from sorajax import cli, config_base, config_lib, fileio
from sorajax.data import builders, decode, shapes
from sorajax.errors import RunFailed, UserError

REASONS = ("unreadable", "no caption", "too short", "too small", "duplicate", "unsupported")
CAPTION_FILES = ("captions.jsonl", "captions.csv")  # at the top of VIDEOS_DIR; sidecars win
DECODE_VERSION = 1  # part of every work KEY: bump when decode.py's pixels change
TEMPORAL_STRIDE = 4  # the causal VAEs' (toy and Wan): clips of 1 + 4k frames


# ==============================================================================================
# Inputs and captions.
# ==============================================================================================
def walk(src: str) -> list[str]:
    """Every file under src as a sorted relative posix path; dot-files and dot-folders (.DS_Store,
    .git) are not inputs."""
    out = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if not f.startswith("."):
                out.append(os.path.relpath(os.path.join(root, f), src).replace(os.sep, "/"))
    return sorted(out)


def _norm(name: str) -> str:
    return posixpath.normpath(str(name).replace("\\", "/")).lstrip("/")


def _clean(text) -> str:
    return " ".join(str(text or "").split())


def read_caption_files(src: str) -> dict[str, dict[str, str]]:
    """{"captions.jsonl": {file: caption}, "captions.csv": {...}} from the top of src; a malformed
    line is a UserError naming the file and line."""
    out = {}
    path = os.path.join(src, "captions.jsonl")
    if os.path.isfile(path):
        caps = {}
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    caps[_norm(row["file"])] = _clean(row["caption"])
                except (ValueError, KeyError, TypeError) as e:
                    raise UserError(f"{path} line {i}: expected {{\"file\": ..., \"caption\": ...}} "
                                    f"({type(e).__name__}: {e})") from None
        out["captions.jsonl"] = caps
    path = os.path.join(src, "captions.csv")
    if os.path.isfile(path):
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f)
            if not rows.fieldnames or not {"file", "caption"} <= set(rows.fieldnames):
                raise UserError(f"{path}: the first line must be the header file,caption "
                                f"(got {rows.fieldnames})")
            out["captions.csv"] = {_norm(r["file"]): _clean(r["caption"]) for r in rows if r["file"]}
    return out


def find_caption(src: str, rel: str, tables: dict) -> tuple[str, str]:
    """(caption, where it came from) by precedence: the sidecar NAME.txt next to the file, then
    captions.jsonl, then captions.csv; the first non-empty one wins. ("", "") when none."""
    side = os.path.join(src, os.path.splitext(rel)[0] + ".txt")
    if os.path.isfile(side):
        with open(side, encoding="utf-8", errors="replace") as f:
            text = _clean(f.read())
        if text:
            return text, "sidecar"
    for name in CAPTION_FILES:
        text = tables.get(name, {}).get(rel, "")
        if text:
            return text, name
    return "", ""


# ==============================================================================================
# Decoding every file (in this process or in JAX-free worker processes).
# ==============================================================================================
def work_key(src: str, rel: str, settings: dict) -> str:
    st = os.stat(os.path.join(src, rel))
    ident = json.dumps([rel, st.st_size, st.st_mtime_ns, settings, DECODE_VERSION], sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _done(out: str) -> dict | None:
    """The finished result of a work entry, or None (missing, or its clips are gone)."""
    try:
        with open(out + ".json") as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    if res.get("status") == "used" and not os.path.isfile(out + ".clips"):
        return None
    return res


def _run_workers(tasks: list[dict], workers: int, bar, work: str) -> None:
    """Decodes `tasks` in `workers` processes running decode.py by path (`python -P`: the
    sorajax package, hence JAX, is never imported there). Each takes the next task when it
    finishes one. A worker that dies is a RunFailed naming the file; finished files stay done."""
    todo = collections.deque(tasks)
    lock, results, failures = threading.Lock(), queue.Queue(), []
    procs = []
    for i in range(workers):
        log = open(os.path.join(work, f"worker-{i}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, "-P", decode.__file__], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=log, text=True), log))

    def drive(proc, log):
        try:
            while True:
                with lock:
                    if not todo or failures:
                        break
                    task = todo.popleft()
                proc.stdin.write(json.dumps(task) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker exited ({proc.wait()}) while decoding {task['file']!r}")
                results.put(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            with lock:
                failures.append(f"{e}; see {log.name}")
        finally:
            results.put(None)

    threads = [threading.Thread(target=drive, args=p, daemon=True) for p in procs]
    try:
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            res = results.get()
            if res is None:
                running -= 1
            else:
                bar.update(1)
    finally:
        for p, log in procs:
            if p.stdin and not p.stdin.closed:
                try:
                    p.stdin.close()
                except OSError:
                    pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.close()
    # A worker that fails on its way out (e.g. decode.py's no-JAX check) fails the run too.
    failures += [f"worker exited with {p.returncode}; see {log.name}" for p, log in procs if p.returncode]
    if failures:
        raise RunFailed(f"prepare: {failures[0]}; finished files are kept in {work}, rerun to resume")


# ==============================================================================================
# Assembly: duplicates, splits, the TFDS dataset, report.json.
# ==============================================================================================
def split_of(rel: str, val_fraction: float) -> str:
    """A file's split, a pure function of its relative path: all clips of one video land in the
    same split, and adding files never moves the others."""
    u = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 2 ** 32
    return "validation" if u < val_fraction else "train"


def _build(out: str, items: dict, settings: dict, digest: str) -> str:
    """Writes the dataset into DATA_DIR/.build, then renames it to DATA_DIR/video_folder
    (replacing an older one); returns its path relative to out."""
    build = os.path.join(out, ".build")
    shutil.rmtree(build, ignore_errors=True)
    cfg = builders.folder_config(frames=settings["frames"], height=settings["height"],
                                 width=settings["width"], fps=settings["fps"], digest=digest,
                                 native=settings.get("native"))
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # "Using custom data configuration" etc.
    try:
        b = builders.VideoFolder(items=items, data_dir=build, config=cfg, file_format="array_record")
        with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading ... to .build"
            b.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        absl_logging.set_verbosity(level)
    final, old = os.path.join(out, builders.FOLDER_ROOT), os.path.join(out, ".old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(os.path.join(build, builders.FOLDER_ROOT), final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(build, ignore_errors=True)
    return os.path.relpath(builders.folder_path(out), out)


def _summary(files: list[dict]) -> tuple[dict, str]:
    skipped = collections.Counter(f["reason"] for f in files if f["status"] == "skipped")
    used = [f for f in files if f["status"] == "used"]
    counts = {"files": len(files), "used": len(used), "skipped": sum(skipped.values()),
              "skipped_by_reason": {r: skipped[r] for r in REASONS if skipped[r]},
              "clips": sum(f["clips"] for f in used)}
    why = ", ".join(f"{r}: {n}" for r, n in counts["skipped_by_reason"].items()) or "none"
    if any("shape" in f for f in used):  # native shapes: clips per "FxHxW"
        by_shape = collections.Counter()
        for f in used:
            by_shape[tuple(f["shape"])] += f["clips"]
        counts["clips_by_shape"] = {"x".join(map(str, k)): by_shape[k] for k in sorted(by_shape)}
    return counts, f"{len(files)} files: {len(used)} used, {counts['skipped']} skipped ({why})"


def native_table(native: dict, height: int, width: int) -> dict:
    """What a decode task needs of the native settings (decode.native_hw, decode.cut_longest):
    every configured aspect ratio's native sizes, largest pixel budget first, and the durations."""
    budgets = sorted(set(shapes.pixel_budgets(native, height, width)), reverse=True)
    return {"aspects": native["aspect_ratios"], "durations": native["durations"],
            "sizes": [[list(shapes.native_size(a, p, native["size_multiple"])) for p in budgets]
                      for a in native["aspect_ratios"]]}


# ==============================================================================================
# The command.
# ==============================================================================================
def prepare(src: str, out: str, *, frames: int, height: int, width: int, fps: float = 8.0,
            workers: int = 1, clip_stride: int = 0, max_clips: int = 0,
            val_fraction: float = 0.0, native: dict | None = None, log=print) -> dict:
    """Prepares `src` into `out` (see the module docstring); returns the report dict. `native`:
    builders.folder_native settings (native shapes; clip_stride 0 = each file's duration)."""
    src, out = os.path.abspath(src), os.path.abspath(out)
    if not os.path.isdir(src):
        raise UserError(f"--src {src!r}: not a directory")
    if out == src or out.startswith(src + os.sep) or src.startswith(out + os.sep):
        raise UserError(f"--out {out!r} and --src {src!r} must not contain one another")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out!r}: exists and is not a directory")
    settings = {"frames": frames, "height": height, "width": width, "fps": float(fps),
                "clip_stride": clip_stride or frames, "max_clips": max_clips}
    if native:  # part of every work key: other native settings decode again
        settings.update(clip_stride=clip_stride, native=native)
    tables = read_caption_files(src)
    media, files = [], []  # files: the report's rows
    all_files = walk(src)
    stems = {os.path.splitext(r)[0] for r in all_files
             if os.path.splitext(r)[1].lower() in decode.VIDEO_EXTS + decode.IMAGE_EXTS}
    for rel in all_files:
        ext = os.path.splitext(rel)[1].lower()
        if ext in decode.VIDEO_EXTS + decode.IMAGE_EXTS:
            media.append(rel)
        elif rel in CAPTION_FILES or (ext == ".txt" and os.path.splitext(rel)[0] in stems):
            continue  # captions, not inputs
        else:
            files.append({"file": rel, "status": "skipped", "reason": "unsupported",
                          "detail": f"{ext or 'no extension'}: not one of "
                                    f"{' '.join(decode.VIDEO_EXTS + decode.IMAGE_EXTS)}", "clips": 0})
    if not media:
        raise UserError(f"--src {src!r}: no videos or images "
                        f"({' '.join(decode.VIDEO_EXTS + decode.IMAGE_EXTS)}) in it or below")

    created = not os.path.exists(out)
    work = os.path.join(out, ".work")
    try:
        os.makedirs(work, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out!r}: cannot create it ({e.strerror or e})") from None
    cli.probe_writable_dir(work, f"--out {out!r}")
    try:
        return _prepare(src, out, work, media, files, tables, settings, workers, val_fraction, log)
    except UserError:
        if created:  # bad input (e.g. every file skipped): leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(src, out, work, media, files, tables, settings, workers, val_fraction, log) -> dict:
    for name in os.listdir(work):  # leftovers of a killed run: temporary files, worker logs
        if ".tmp" in name or name.startswith("worker-"):
            os.remove(os.path.join(work, name))
    captions, keys, tasks, results = {}, {}, [], {}
    task_settings = {k: settings[k] for k in ("frames", "height", "width", "fps")}
    if "native" in settings:
        task_settings["native"] = native_table(settings["native"], settings["height"], settings["width"])
    for rel in media:
        cap, where = find_caption(src, rel, tables)
        if not cap:
            files.append({"file": rel, "status": "skipped", "reason": "no caption",
                          "detail": f"no {os.path.splitext(rel)[0]}.txt and no entry in "
                                    f"{' or '.join(CAPTION_FILES)}", "clips": 0})
            continue
        captions[rel] = (cap, where)
        keys[rel] = work_key(src, rel, settings)
        path = os.path.join(work, keys[rel])
        done = _done(path)
        if done is not None:
            results[rel] = done
        else:
            tasks.append(dict(task_settings, path=os.path.join(src, rel), file=rel, out=path,
                              stride=settings["clip_stride"], max_clips=settings["max_clips"]))
    n_workers = max(1, min(workers, len(tasks)))
    with tqdm(total=len(tasks), desc="decode", unit="file", dynamic_ncols=True) as bar:
        if n_workers == 1:
            for t in tasks:
                decode.process(t)
                bar.update(1)
        else:
            _run_workers(tasks, n_workers, bar, work)
    for t in tasks:
        results[t["file"]] = _done(t["out"]) or {
            "file": t["file"], "status": "skipped", "reason": "unreadable",
            "detail": "the decoder left no result", "clips": 0}

    # Duplicates: the first file (sorted path) with given bytes is used, the rest are skipped.
    first_of, items = {}, {"train": [], "validation": []}
    for rel in sorted(results):
        r = dict(results[rel], caption=captions[rel][0], caption_from=captions[rel][1])
        if r["status"] == "used":
            if r["sha256"] in first_of:
                r.update(status="skipped", reason="duplicate", clips=0,
                         detail=f"same content as {first_of[r['sha256']]}")
            else:
                first_of[r["sha256"]] = rel
                r["split"] = split_of(rel, val_fraction)
                item = {"clips_path": os.path.join(work, keys[rel]) + ".clips", "count": r["clips"],
                        "caption": r["caption"], "file": rel, "kind": r["kind"],
                        "stride": settings["clip_stride"]}
                if "shape" in r:  # native shapes
                    item.update(shape=r["shape"], stride=settings["clip_stride"] or r["shape"][0])
                items[r["split"]].append(item)
        files.append(r)
    files.sort(key=lambda f: f["file"])
    counts, line = _summary(files)
    if not items["train"]:
        why = ("every file was skipped" if not counts["used"] else
               f"all {counts['used']} used files hash into validation (--val-fraction {val_fraction})")
        bad = "; ".join(f"{f['file']}: {f['reason']}" for f in files if f["status"] == "skipped")
        raise UserError(f"--src {src!r}: no training clips, {why}: {line}. {bad[:400]}")
    items = {k: v for k, v in items.items() if v}

    used = [f for f in files if f["status"] == "used"]
    digest = hashlib.sha256(json.dumps(
        [settings] + [[f["file"], f["sha256"], f["clips"], f["caption"], f["split"]] for f in used],
        sort_keys=True).encode()).hexdigest()[:8]
    rel_path = _build(out, items, settings, digest)
    splits = {s: sum(i["count"] for i in v) for s, v in items.items()}
    report = {
        "src": src, "settings": settings, "val_fraction": val_fraction,
        "dataset": dict(path=rel_path, name=rel_path.split(os.sep)[1], splits=splits,
                        frames=settings["frames"], height=settings["height"],
                        width=settings["width"], fps=settings["fps"],
                        **({"native": settings["native"]} if "native" in settings else {})),
        "counts": counts,
        "run": {"decoded": sorted(t["file"] for t in tasks), "reused": len(results) - len(tasks)},
        "unmatched_captions": sorted({k for t in tables.values() for k in t} - set(media))[:100],
        "files": files,
    }
    fileio.write_json(os.path.join(out, "report.json"), report)
    live = set(keys.values())
    for name in os.listdir(work):  # entries of files that are gone or changed
        if name.split(".")[0] not in live:
            os.remove(os.path.join(work, name))
    log(f"prepare: {line}; {counts['clips']} clips written "
        f"({', '.join(f'{s} {n}' for s, n in splits.items())})")
    if "clips_by_shape" in counts:
        log("prepare: clips by shape (frames x height x width): "
            + ", ".join(f"{k} {n}" for k, n in counts["clips_by_shape"].items()))
    log(f"prepare: decoded {len(tasks)} file(s), {report['run']['reused']} reused from {work}")
    log(f"prepare: dataset {os.path.join(out, rel_path)}; report {os.path.join(out, 'report.json')}")
    return report


# ==============================================================================================
# CLI.
# ==============================================================================================
def parse_args(argv):
    d = config_base.get_config().data
    p = cli.Parser(
        prog="python -m sorajax.data.prepare",
        description="Turns a folder of videos and images with captions into a TFDS array_record "
                    "dataset of clips (train with configs/videos.py and --config.data.dir=DATA_DIR) "
                    "and DATA_DIR/report.json (every file: used or skipped, and why). Clips are "
                    "--frames x --height x --width, or with native shapes (--aspect-ratios, or a "
                    "--config with data.aspect_ratios) each file keeps its own aspect ratio and "
                    "length. Resumable: rerun after a kill. See docs/DATA.md.")
    p.add_argument("--src", required=True, help="folder of videos (mp4 webm mov mkv gif) and "
                   "images (png jpg jpeg webp), searched recursively, with captions")
    p.add_argument("--out", required=True, help="DATA_DIR to write (created; .work/ inside keeps "
                   "per-file results for resuming)")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the clips (default 8)")
    p.add_argument("--frames", type=int, default=None,
                   help=f"frames per clip, 1 + {TEMPORAL_STRIDE}k (default {d.frames})")
    p.add_argument("--height", type=int, default=None, help=f"clip height (default {d.height})")
    p.add_argument("--width", type=int, default=None, help=f"clip width (default {d.width})")
    p.add_argument("--aspect-ratios", default=None, metavar="LIST",
                   help="native shapes (docs/SHAPES.md): comma-separated width/height ratios, e.g. "
                        "1,1.78,0.56; each file is resized to the one nearest its own (in log ratio) "
                        "within --height x --width pixels, sides multiples of --size-multiple, "
                        "centre-cropped only to that ratio; images become 1-frame clips "
                        "(default: none, every clip --frames x --height x --width)")
    p.add_argument("--durations", default=None, metavar="LIST",
                   help=f"with --aspect-ratios: comma-separated clip lengths, each 1 + {TEMPORAL_STRIDE}k "
                        "frames; a video's clips take the longest its length allows "
                        "(default: --frames)")
    p.add_argument("--size-multiple", type=int, default=None, metavar="N",
                   help=f"with --aspect-ratios: native sides are multiples of this "
                        f"(default {d.size_multiple})")
    p.add_argument("--config", default=None,
                   help="take frames/height/width (and the native-shape settings "
                        "data.aspect_ratios/durations/size_multiple/resolutions) from this config's "
                        "data section (configs/NAME.py[:ARG]) instead of the flags above")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="decoding processes (default: the CPUs available; 1 = in this process)")
    p.add_argument("--clip-stride", type=int, default=0,
                   help="frames between clip starts (default: the clip length, no overlap)")
    p.add_argument("--max-clips", type=int, default=0,
                   help="at most this many clips per video, from its start (0 = all)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of files (by a hash of their path) in a 'validation' split (default 0)")
    return p.parse_args(argv)


def _number_list(flag: str, text: str, kind, what: str) -> tuple:
    try:
        vals = tuple(kind(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if not vals or not all(v > 0 and v != float("inf") for v in vals):
        raise UserError(f"{flag} {text}: must be comma-separated {what}")
    return vals


def _native(a, d) -> dict | None:
    """The native-shape settings of the flags (a) or of --config's data section (d): checked
    builders.folder_native settings, or None."""
    native = builders.folder_native(d)
    if native is None:
        return None

    def name(field):
        return f"--{field.replace('_', '-')}" if a.config is None else f"--config {a.config}: data.{field}"
    if not all(0 < v < float("inf") for v in native["aspect_ratios"]):
        raise UserError(f"{name('aspect_ratios')} {native['aspect_ratios']}: must be width/height ratios > 0")
    for f in native["durations"]:
        if f < 1 or (f - 1) % TEMPORAL_STRIDE:
            raise UserError(f"{name('durations')} {f}: the causal VAE takes 1 + {TEMPORAL_STRIDE}k frames "
                            f"(1, 5, 9, 13, 17, ...)")
    if native["size_multiple"] < 1:
        raise UserError(f"{name('size_multiple')} {native['size_multiple']}: must be an integer >= 1")
    return native


def _main(argv) -> int:
    a = parse_args(argv)
    sizes = {k: getattr(a, k) for k in ("frames", "height", "width")}
    shape_flags = {"--aspect-ratios": a.aspect_ratios, "--durations": a.durations,
                   "--size-multiple": a.size_multiple}
    if a.config is not None:
        given = [f"--{k}" for k, v in sizes.items() if v is not None] + [k for k, v in shape_flags.items()
                                                                          if v is not None]
        if given:
            raise UserError(f"--config and {'/'.join(given)}: give one or the other")
        d = config_lib.load_config(a.config).data
        sizes = {"frames": d.frames, "height": d.height, "width": d.width}
    else:
        d = config_base.get_config().data
        if a.aspect_ratios is None:
            extra = [k for k, v in shape_flags.items() if v is not None]
            if extra:
                raise UserError(f"{'/'.join(extra)}: read only with native shapes: add --aspect-ratios")
        else:
            d.aspect_ratios = _number_list("--aspect-ratios", a.aspect_ratios, float, "width/height ratios > 0, "
                                           "e.g. 1,1.78,0.56")
            if a.durations is not None:
                d.durations = _number_list("--durations", a.durations, int, "frame counts 1 + 4k, e.g. 9,13")
            if a.size_multiple is not None:
                d.size_multiple = a.size_multiple
    base = config_base.get_config().data
    sizes = {k: base[k] if v is None else v for k, v in sizes.items()}
    if a.config is None:
        d.update(sizes)  # --frames is the one duration when --durations is not given
    native = _native(a, d)
    for k, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise UserError(f"--{k} {v}: must be an integer >= 1")
    if (sizes["frames"] - 1) % TEMPORAL_STRIDE:
        raise UserError(f"--frames {sizes['frames']}: the causal VAE takes 1 + {TEMPORAL_STRIDE}k "
                        f"frames (1, 5, 9, 13, 17, ...)")
    if not a.fps > 0 or a.fps == float("inf"):
        raise UserError(f"--fps {a.fps}: must be > 0")
    for k in ("workers", "clip_stride", "max_clips"):
        lo = 1 if k == "workers" else 0
        if getattr(a, k) < lo:
            raise UserError(f"--{k.replace('_', '-')} {getattr(a, k)}: must be >= {lo}")
    if not 0 <= a.val_fraction < 1:
        raise UserError(f"--val-fraction {a.val_fraction}: must be in [0, 1)")
    prepare(a.src, a.out, fps=a.fps, workers=a.workers, clip_stride=a.clip_stride,
            max_clips=a.max_clips, val_fraction=a.val_fraction, native=native, **sizes)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
