"""Grain input pipeline over a random-access source (e.g. `builders.load_source`).

    rows=:   indices ─ shuffle(seed, reshuffled every epoch) ─ global batch ─ this process's rows
             ─ decode/transform ─ repeat(num_epochs) ─ iterator (checkpointable)
    shards:  source ─ shard by process ─ shuffle ─ decode/transform ─ batch ─ repeat ─ iterator

Two ways to split the global batch (`batch_size` is always the *global* batch):
  - `rows=` (what training uses): every process walks the same global sequence of global batches
    (one shuffle of the whole source) and reads only `rows`, the rows of each global batch that
    its devices hold in the batch sharding (`sharding.process_batch_rows`). The global batch at
    every step is then the same whatever the process count or mesh, so a 2-process run and a
    1-process run see the same data, and the iterator's position (the same in every process) can
    be restored with any process count.
  - `shard_index`/`shard_count`: each process reads a disjoint shard (indices
    shard_index::shard_count, truncated to a common length so every process sees the same number
    of batches per epoch) and yields `batch_size // shard_count` examples. The data then depends
    on the process count.
The iterator's position is a small JSON-serialisable dict (`get_state` / `set_state`), saved
with the checkpoint so a resumed run sees exactly the batches it would have seen.

Reads happen in this process (no worker processes: they cost more than they save on small CPU
hosts and in tests); `num_threads` reader threads prefetch.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import grain
import jax
import numpy as np

from sorajax.data import builders


def decode_example(ex: dict[str, Any]) -> dict[str, Any]:
    """A raw world example → {"frames": float32 (T, H, W, 3) in [-1, 1], "caption": str,
    "seed": int64, ...}. The JSON "meta" is dropped (decode it from the source when needed)."""
    out = {}
    for k, v in ex.items():
        if k == "meta":
            continue
        out[k] = builders.decode_text(v) if isinstance(v, bytes) else v
    if "frames" in ex:  # latent sources (precomputed VAE latents) carry no frames
        frames = np.asarray(ex["frames"])
        if frames.dtype == np.uint8:
            frames = frames.astype(np.float32) * (2.0 / 255.0) - 1.0  # (T, H, W, 3) in [-1, 1]
        out["frames"] = frames.astype(np.float32)
    return out


def collate(examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks numeric leaves; strings become an object-dtype array of Python str."""
    batch = {}
    for k in examples[0]:
        vals = [e[k] for e in examples]
        if isinstance(vals[0], str):
            arr = np.empty(len(vals), dtype=object)
            arr[:] = vals
            batch[k] = arr
        else:
            batch[k] = np.stack([np.asarray(v) for v in vals])
    return batch


def make_dataset(source, *, batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 shard_index: int | None = None, shard_count: int | None = None,
                 drop_remainder: bool = True, rows=None) -> grain.MapDataset:
    """The MapDataset behind make_iterator (same arguments)."""
    if rows is not None:
        return _global_batch_dataset(source, batch_size=batch_size, seed=seed, shuffle=shuffle,
                                     num_epochs=num_epochs, transform=transform,
                                     drop_remainder=drop_remainder, rows=rows)
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if batch_size % shard_count:
        raise ValueError(f"global batch {batch_size} not divisible by {shard_count} processes")
    local_batch = batch_size // shard_count
    per_shard = len(source) // shard_count
    if per_shard == 0 or (drop_remainder and per_shard < local_batch):
        raise ValueError(f"{len(source)} examples are too few for {shard_count} shards of "
                         f"batch {local_batch}")
    ds = grain.MapDataset.source(source)
    ds = ds[shard_index::shard_count][:per_shard]  # disjoint, equal-length shards
    if shuffle:
        ds = ds.shuffle(seed=int(seed) & 0xFFFFFFFF)  # reseeded per epoch by repeat()

    def _map(ex):
        ex = decode_example(ex)
        return transform(ex) if transform is not None else ex

    ds = ds.map(_map)
    ds = ds.batch(local_batch, drop_remainder=drop_remainder, batch_fn=collate)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)  # None: forever; each epoch has a fresh shuffle
    return ds


def _global_batch_dataset(source, *, batch_size, seed, shuffle, num_epochs, transform,
                          drop_remainder, rows) -> grain.MapDataset:
    """Global batches of source indices (the same in every process: one shuffle of the whole
    source), of which this process decodes only `rows`. Same element order as the shard_count=1
    pipeline: shuffle, batch, repeat over the same index permutation."""
    rows = [int(r) for r in rows]
    if not rows or any(not 0 <= r < batch_size for r in rows):
        raise ValueError(f"rows {rows} must be a non-empty subset of range({batch_size})")
    if len(source) < batch_size:
        raise ValueError(f"{len(source)} examples are too few for a batch of {batch_size}")
    ds = grain.MapDataset.range(len(source))
    if shuffle:
        ds = ds.shuffle(seed=int(seed) & 0xFFFFFFFF)  # reseeded per epoch by repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=lambda xs: np.asarray(xs, np.int64))  # (B,) source indices

    def _read(idx):  # this process's rows of one global batch
        exs = []
        for r in rows:
            if r < len(idx):  # a short last batch (drop_remainder=False)
                ex = decode_example(source[int(idx[r])])
                exs.append(transform(ex) if transform is not None else ex)
        return collate(exs)

    ds = ds.map(_read)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds


def make_iterator(source, *, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None,
                  transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  drop_remainder: bool = True, num_threads: int = 2,
                  prefetch: int = 8, worker_count: int = 0, rows=None) -> grain.DatasetIterator:
    """A checkpointable iterator of process-local batches:
    {"frames": float32 (B, T, H, W, 3) in [-1, 1], "caption": object array of str,
     "seed": int64 (B,), ...whatever `transform(example)` adds}, B = len(rows), or
    batch_size // shard_count without `rows`.

    `batch_size` is the global batch. `rows` (sorted global-batch row indices, e.g.
    sharding.process_batch_rows) makes the global batch independent of the process count (see
    the module docstring); without it shard_index/shard_count default to this process's
    jax.process_index()/process_count(). `num_epochs=None` repeats forever.
    `worker_count > 0` decodes in that many worker processes (grain mp_prefetch; `transform`
    must then be picklable; the saved state's format depends on worker_count, so restore with
    the same value); 0 keeps everything in this process.
    """
    ds = make_dataset(source, batch_size=batch_size, seed=seed, shuffle=shuffle,
                      num_epochs=num_epochs, transform=transform, shard_index=shard_index,
                      shard_count=shard_count, drop_remainder=drop_remainder, rows=rows)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    it_ds = ds.to_iter_dataset(read)
    if worker_count > 0:
        from absl import flags  # grain's workers read absl flags; use defaults if unparsed
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def make_packed_iterator(source, plan, *, rows, transform, pack_fn, num_threads: int = 2,
                         prefetch: int = 8) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's rows of packed global batches
    (sorajax/packing.py): `plan[i]` lists, per row of global batch i, the source indices packed
    into it (the same plan in every process); this process reads its `rows` of each, decodes and
    transforms their examples and calls `pack_fn(rows of examples) -> batch dict`."""
    rows = [int(r) for r in rows]

    def _read(batch_rows):
        return pack_fn([[transform(decode_example(source[int(j)])) for j in batch_rows[r]] for r in rows])

    ds = grain.MapDataset.source(plan).map(_read)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def make_bucket_iterator(source, plan, *, rows_of, transform, num_threads: int = 2,
                         prefetch: int = 8) -> grain.DatasetIterator:
    """A checkpointable iterator of this process's rows of bucketed global batches
    (packing.BucketPlan): `plan[i]` = (shape, clip indices) of global batch i, whose size varies
    by bucket; `rows_of(global batch size)` names this process's rows. Each batch dict carries
    "global_batch" (int): the size of the global batch it is part of."""

    def _read(item):
        _, idx = item
        batch = collate([transform(decode_example(source[int(idx[r])])) for r in rows_of(len(idx))])
        batch["global_batch"] = len(idx)
        return batch

    ds = grain.MapDataset.source(plan).map(_read)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))


def get_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position as a JSON-serialisable dict."""
    state = it.get_state()
    return json.loads(json.dumps(state))  # fails loudly if grain ever returns non-JSON state


def set_state(it: grain.DatasetIterator, state: dict[str, Any]) -> None:
    """Restores a position from get_state: the next batches are exactly those that followed."""
    it.set_state(state)

