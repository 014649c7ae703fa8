"""The latent cache: every training clip encoded once by the frozen VAE, streamed to disk.

    LATENTS_DIR/fingerprint.json         what the cache is made from (written first)
    LATENTS_DIR/parts/cC-pP-of-N.arrayrecord  chunk C's clips encoded by process P of N: one record
                                         per clip (its index, caption, [latent shape,] latent means)
    LATENTS_DIR/parts/cC-pP-of-N.json    written after its .arrayrecord: the clip indices in it
                                         [and their latent shapes] and per-channel sums (it marks
                                         the part complete)
    LATENTS_DIR/cache.json               written last, by process 0: the parts, clip shape (null
                                         for mixed shapes), dtype and latent statistics (it marks
                                         the cache complete)

Building (`build`) streams: every process reads only its rows of each global encode batch (the
batch sharding's rows, `sharding.process_batch_rows`), the VAE encodes the global batch on every
device of every process, and each process appends its rows' latents to its part of the chunk,
so host memory is one encode batch whatever the dataset size. Clips of mixed shapes (native-shape
training: a source whose `clip_shapes` gives each clip's (T, H, W), 1-frame images included) are
encoded in batches of one shape: the clips are ordered by (shape, index), each shape's run is cut
into batches (the last padded with a repeat of one of its clips) and the batches are grouped into
chunks, the same plan in every process; the records and parts of such a "native" cache carry
each clip's latent shape (the [...] above). A killed build (kill -9 included) resumes: chunks
whose parts are all complete are kept, the others are redone, with any process count.
Multi-process builds need LATENTS_DIR on a file system every process sees (a gcsfuse mount on a
pod).

Reading (`LatentCache`) is random access by clip index over the array_record parts (Grain's
ArrayRecordDataSource), whatever process count built the cache; the Grain pipeline then
shuffles, shards by process and checkpoints its position as for any source. Captions are stored
as text: the DiT stage tokenizes them on the fly (microseconds), so a cache serves any tokenizer
and a trainable text encoder.

The per-channel latent statistics (mean, std) are over every latent position of every clip,
whatever its shape.

A cache whose fingerprint differs from the run's (another data seed, size, frame count, clip
count or VAE) is rebuilt, never paired with other captions.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import struct

import grain
import jax
import jax.numpy as jnp
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from tqdm import tqdm

from sorajax import fileio, sharding
from sorajax.data import builders
from sorajax.data.pipeline import decode_example
from sorajax.errors import UserError

DTYPES = {"bfloat16": jnp.bfloat16, "float32": np.float32}
_PART = re.compile(r"c(\d+)-p(\d+)-of-(\d+)\.json$")


def fingerprint(config, num_clips: int, vae_provenance: str) -> dict:
    """What the cached latents depend on. The latent statistics written into vae.overrides by
    normalize_latents are left out: they are measured from these latents."""
    vae = {k: v for k, v in config.vae.overrides.items() if k not in ("latents_mean", "latents_std")}
    fp = {"data": {k: v for k, v in config.data.to_dict().items() if k != "data_dir"},
          "num_clips": int(num_clips), "vae_variant": config.vae.variant,
          "vae_overrides": json.loads(json.dumps(vae, default=list)), "vae": vae_provenance,
          "dtype": config.vae.cache_dtype}
    if config.data.source == "folder":  # a re-prepared folder: its name carries a content digest
        fp["dataset"] = os.path.basename(os.path.dirname(builders.folder_path(config.data.dir)))
        fp["data"].pop("dir", None)  # the same prepared folder may be mounted elsewhere
    return fp


def _key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if "data" in keys and isinstance(old.get("data"), dict):
        keys = [k for k in keys if k != "data"] + [
            f"data.{k}" for k in sorted(set(old["data"]) | set(new["data"]))
            if old["data"].get(k) != new["data"].get(k)]
    return "changed: " + ", ".join(keys) if keys else "unknown format"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------------------------
def _record(index: int, caption: str, lat: np.ndarray, native: bool = False) -> bytes:
    """4-byte head length, the JSON head {"i", "caption"[, "shape" in a native cache]}, then the
    latents' bytes."""
    head = {"i": int(index), "caption": caption}
    if native:
        head["shape"] = [int(d) for d in lat.shape]
    head = json.dumps(head).encode()
    return struct.pack("<I", len(head)) + head + np.ascontiguousarray(lat).tobytes()


def _parse(rec: bytes, shape, dtype) -> tuple[dict, np.ndarray]:
    """(head, latents): shaped by the head's "shape" when it has one, else by `shape` (the
    cache's single shape)."""
    (n,) = struct.unpack_from("<I", rec)
    head = json.loads(rec[4:4 + n])
    return head, np.frombuffer(rec, dtype, offset=4 + n).reshape(head.get("shape") or shape)


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------
class LatentCache:
    """Random-access {"latents": float32 (t, h, w, z), "caption": str} examples of a complete
    cache directory, in clip-index order (not held in memory: read from the parts). `shape` is
    the clips' latent shape, None in a native (mixed-shape) cache; `clip_shapes[i]` is clip i's
    in either."""

    def __init__(self, directory: str):
        meta = _read_json(os.path.join(directory, "cache.json"))
        if meta is None:
            raise UserError(f"{directory!r} is not a complete latent cache (no cache.json); build one "
                            "with `python -m sorajax.cache_latents`")
        self.directory, self.meta = directory, meta
        self.native = bool(meta.get("native"))
        self.shape = None if self.native else tuple(meta["shape"])  # (t, h, w, z)
        self.dtype = np.dtype(DTYPES[meta["dtype"]])
        n = int(meta["num_clips"])
        paths, self._pos = [], np.full(n, -1, np.int64)
        # Every clip's latent shape (t, h, w, z): from the parts in a native cache.
        self.clip_shapes: list = [None] * n if self.native else [self.shape] * n
        offset = 0
        for name in meta["parts"]:
            part = _read_json(os.path.join(directory, "parts", name + ".json"))
            idx = np.asarray(part["indices"], np.int64)
            self._pos[idx] = offset + np.arange(len(idx))
            if self.native:
                for i, s in zip(part["indices"], part["shapes"]):
                    self.clip_shapes[i] = tuple(s)
            offset += len(idx)
            paths.append(os.path.join(directory, "parts", name + ".arrayrecord"))
        if (self._pos < 0).any():
            raise UserError(f"latent cache {directory!r}: clips {np.flatnonzero(self._pos < 0)[:5].tolist()} "
                            "are in no part; rebuild it")
        self._src = grain.sources.ArrayRecordDataSource(paths)
        self.mean = np.asarray(meta["mean"], np.float32)  # per-channel statistics of the latents
        self.std = np.asarray(meta["std"], np.float32)
        self._norm = None

    def normalize(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Examples come out per-channel (x - mean) / std, as the DiT sees Wan's latents."""
        self._norm = (np.asarray(mean, np.float32), np.asarray(std, np.float32))

    def __len__(self):
        return len(self._pos)

    def __getitem__(self, i):
        head, lat = _parse(self._src[int(self._pos[i])], self.shape, self.dtype)
        if head["i"] != int(i):
            raise RuntimeError(f"latent cache {self.directory!r}: record for clip {i} holds clip {head['i']}")
        lat = lat.astype(np.float32)
        if self._norm is not None:
            lat = (lat - self._norm[0]) / self._norm[1]
        return {"latents": lat, "caption": head["caption"]}


def complete(directory: str, fp: dict | None = None) -> bool:
    """Whether `directory` holds a complete cache (made from `fp`, when given)."""
    meta = _read_json(os.path.join(directory, "cache.json"))
    return meta is not None and (fp is None or meta.get("key") == _key(fp))


# ----------------------------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------------------------
def _done_chunks(parts_dir: str) -> set[int]:
    """Chunks whose parts (all N of one process count N) have their .json (the completion mark)."""
    have: dict[tuple[int, int], set[int]] = {}
    for path in glob.glob(os.path.join(parts_dir, "*.json")):
        m = _PART.search(os.path.basename(path))
        if m:
            c, p, n = map(int, m.groups())
            have.setdefault((c, n), set()).add(p)
    return {c for (c, n), ps in have.items() if ps == set(range(n))}


def build(config, source, mesh, out_dir: str, *, vae_provenance: str, load_vae,
          batch_size: int = 32, shard_clips: int = 1024, dtype: str | None = None) -> LatentCache:
    """Encodes every clip of `source` into a cache at `out_dir` (or resumes/reuses one made from
    the same data and VAE) and returns it. Every process must call it. `load_vae() -> (graphdef,
    state)` is only called when there is work left. `batch_size` clips are encoded per call
    (rounded up to the data-parallel size); a chunk (`shard_clips`, rounded to whole batches) is
    the unit of resumption."""
    dtype = dtype or config.vae.cache_dtype
    if dtype not in DTYPES:
        raise UserError(f"latent cache dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    n = len(source)
    if n == 0:
        raise UserError("the dataset has no clips to encode")
    clip_shapes = _clip_shapes(source, n)  # (n, 3) pixel shapes of a mixed-shape source, or None
    native = clip_shapes is not None
    fp = fingerprint(config, n, vae_provenance)
    if native:  # another layout of chunks and records: never resumed from a fixed-shape build's
        fp["native"] = True
    key = _key(fp)
    parts_dir = os.path.join(out_dir, "parts")
    lead = jax.process_index() == 0
    if lead:
        old = _read_json(os.path.join(out_dir, "cache.json")) or _read_json(os.path.join(out_dir, "fingerprint.json"))
        if old is not None and old.get("key") != key:
            print(f"latent cache {out_dir} was made from other data or another VAE "
                  f"({_diff(old.get('fingerprint', {}), fp)}); rebuilding it", flush=True)
            for name in ("cache.json", "fingerprint.json"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
            shutil.rmtree(parts_dir, ignore_errors=True)
        for tmp in glob.glob(os.path.join(parts_dir, ".c*")):  # a killed build's temporary files
            os.remove(tmp)
        if old is None or old.get("key") != key:
            os.makedirs(parts_dir, exist_ok=True)
            fileio.write_json(os.path.join(out_dir, "fingerprint.json"), {"key": key, "fingerprint": fp})
    sharding.sync("sorajax:latents_start")
    if complete(out_dir, fp):
        return LatentCache(out_dir)

    rules = sharding.normalize_rules(config.sharding_rules)
    dp = sharding.data_parallel_size(mesh, rules)
    batch = -(-int(batch_size) // dp) * dp
    per_chunk = max(1, -(-int(shard_clips) // batch))  # batches per chunk
    chunk_clips = per_chunk * batch
    order, bounds = _plan(n, batch, clip_shapes)
    n_chunks = -(-len(bounds) // per_chunk)
    done = _done_chunks(parts_dir)
    sharding.sync("sorajax:latents_listed")  # every process listed before anyone writes
    todo = [c for c in range(n_chunks) if c not in done]
    pi, pc = jax.process_index(), jax.process_count()
    if lead:  # parts of unfinished chunks written by another process count are stale
        for path in glob.glob(os.path.join(parts_dir, "c*-p*-of-*")):
            m = re.search(r"c(\d+)-p\d+-of-(\d+)\.", os.path.basename(path))
            if m and int(m.group(1)) in todo and int(m.group(2)) != pc:
                os.remove(path)
    if todo:
        if lead:
            print(f"latent cache {out_dir}: {n} clips in {n_chunks} chunks of {chunk_clips}; "
                  f"{n_chunks - len(todo)} done, encoding {len(todo)}", flush=True)
        graphdef, state = load_vae()
        rows = sharding.process_batch_rows(mesh, rules, batch)

        def enc(st, x):  # traced under the rules: activations follow them (e.g. context-sharded)
            with sharding.activation_rules(mesh, rules):
                return nnx.merge(graphdef, st).encode(x)[0]

        fn = jax.jit(enc, out_shardings=sharding.batch_sharding(mesh, rules, 5))
        n_batches = sum(len(bounds[c * per_chunk:(c + 1) * per_chunk]) for c in todo)
        bar = tqdm(total=n_batches, desc="encode latents", unit="batch", disable=not lead)
        for c in todo:
            _encode_chunk(fn, state, source, mesh, rules, order, bounds[c * per_chunk:(c + 1) * per_chunk],
                          batch, rows, clip_shapes, parts_dir, f"c{c:05d}-p{pi:03d}-of-{pc:03d}",
                          DTYPES[dtype], bar)
        bar.close()
    sharding.sync("sorajax:latents_encoded")
    if lead:
        _finish(out_dir, key, fp, n, dtype, native)
    sharding.sync("sorajax:latents_done")
    return LatentCache(out_dir)


def _clip_shapes(source, n: int) -> np.ndarray | None:
    """The source's `clip_shapes` ((T, H, W) per clip) as an (n, 3) int array; None without."""
    shapes = getattr(source, "clip_shapes", None)
    if shapes is None:
        return None
    if len(shapes) != n:
        raise UserError(f"the source has {n} clips but {len(shapes)} clip_shapes")
    try:
        arr = np.asarray([[int(d) for d in s] for s in shapes], np.int64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n, 3):
        raise UserError("the source's clip_shapes must be one (frames, height, width) per clip")
    return arr


def _plan(n: int, batch: int, clip_shapes: np.ndarray | None):
    """The encode batches, the same in every process: (order, bounds), batch k holding clips
    order[bounds[k, 0]:bounds[k, 1]] (padded to `batch` by repeating its last clip; padding is
    encoded and discarded). Chunk c is batches [c * per_chunk, (c + 1) * per_chunk).

    Fixed shape: the clips in index order, cut every `batch`. Mixed shapes: the clips ordered by
    (shape, index), each shape's run cut every `batch`, so a batch holds one shape (a chunk may
    hold several)."""
    if clip_shapes is None:
        starts = np.arange(0, n, batch, dtype=np.int64)
        return range(n), np.stack([starts, np.minimum(starts + batch, n)], 1)
    order = np.lexsort((np.arange(n), clip_shapes[:, 2], clip_shapes[:, 1], clip_shapes[:, 0]))
    s = clip_shapes[order]
    cuts = np.flatnonzero((s[1:] != s[:-1]).any(1)) + 1  # where the shape changes
    bounds = []
    for r0, r1 in zip(np.r_[0, cuts], np.r_[cuts, n]):
        bounds.extend((b0, min(b0 + batch, r1)) for b0 in range(int(r0), int(r1), batch))
    return order, np.asarray(bounds, np.int64).reshape(-1, 2)


def _encode_chunk(fn, state, source, mesh, rules, order, bounds, batch, rows, clip_shapes, parts_dir,
                  name, dtype, bar):
    """This process's rows of a chunk's batches (`bounds` into `order`, see _plan), encoded batch
    by batch and appended to its part."""
    native = clip_shapes is not None
    indices, shapes, total, total_sq, count, shape = [], [], 0.0, 0.0, 0, None
    # The records go to a temporary sibling, renamed into place when complete (fileio.atomic_path).
    with fileio.atomic_path(os.path.join(parts_dir, name + ".arrayrecord")) as tmp:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        try:
            for b0, b1 in bounds:
                clips = np.asarray(order[b0:b1], np.int64)
                real = np.arange(batch) < len(clips)  # the rest is padding: its output is dropped
                clips = np.concatenate([clips, np.full(batch - len(clips), clips[-1], np.int64)])
                idx = clips[rows]  # this process's rows of the global batch (clip indices)
                ex = [decode_example(source[int(i)]) for i in idx]
                if native:
                    for i, e in zip(idx, ex):
                        if tuple(e["frames"].shape[:3]) != tuple(clip_shapes[i]):
                            raise UserError(f"clip {int(i)} has frames of shape {e['frames'].shape[:3]} "
                                            f"but its clip_shapes entry is {tuple(clip_shapes[i].tolist())}")
                x = np.stack([e["frames"] for e in ex])  # (rows, T, H, W, 3)
                out = fn(state, sharding.global_batch({"x": x}, mesh, rules, batch_size=batch)["x"])
                local = {}
                for sh in out.addressable_shards:  # this process's rows of the output
                    start = sh.index[0].start or 0
                    data = np.asarray(sh.data, np.float32)
                    for r in range(data.shape[0]):
                        local.setdefault(start + r, data[r])
                for j, i in enumerate(idx):
                    if not real[rows[j]]:
                        continue
                    lat = local[int(rows[j])]
                    shape = lat.shape
                    writer.write(_record(int(i), ex[j]["caption"], lat.astype(dtype), native))
                    indices.append(int(i))
                    shapes.append(list(lat.shape))
                    lat64 = lat.astype(np.float64).reshape(-1, lat.shape[-1])
                    total = total + lat64.sum(0)
                    total_sq = total_sq + np.square(lat64).sum(0)
                    count += lat64.shape[0]
                bar.update(1)
        finally:
            writer.close()
    part = {"indices": indices, "count": count, "shape": list(shape) if shape and not native else None,
            "sum": np.asarray(total).tolist(), "sum_sq": np.asarray(total_sq).tolist()}
    if native:
        part["shapes"] = shapes  # clip indices[k]'s latent shape (t, h, w, z)
    fileio.write_json(os.path.join(parts_dir, name + ".json"), part, indent=None)


def _finish(out_dir, key, fp, n, dtype, native=False):
    """cache.json from the complete parts: their order, the clip shape (None when native: the
    parts hold each clip's), per-channel mean/std over every latent position."""
    parts_dir = os.path.join(out_dir, "parts")
    done = _done_chunks(parts_dir)
    names, total, total_sq, count, shape, seen = [], 0.0, 0.0, 0, None, 0
    for path in sorted(glob.glob(os.path.join(parts_dir, "*.json"))):
        m = _PART.search(os.path.basename(path))
        if not m or int(m.group(1)) not in done:
            continue
        part = _read_json(path)
        if native != ("shapes" in part):
            raise RuntimeError(f"latent cache {out_dir}: part {os.path.basename(path)} is "
                               f"{'not ' if native else ''}per-clip shaped; rebuild the cache")
        names.append(os.path.basename(path)[:-len(".json")])
        seen += len(part["indices"])
        if part["count"]:
            total = total + np.asarray(part["sum"])
            total_sq = total_sq + np.asarray(part["sum_sq"])
            count += part["count"]
            shape = part["shape"]
    if seen != n:
        raise RuntimeError(f"latent cache {out_dir}: {seen} clips in complete parts, expected {n}")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0)) + 1e-6
    meta = {"key": key, "fingerprint": fp, "num_clips": n, "shape": None if native else shape,
            "dtype": dtype, "parts": names, "mean": mean.tolist(), "std": std.tolist()}
    if native:
        meta["native"] = True
    fileio.write_json(os.path.join(out_dir, "cache.json"), meta)
