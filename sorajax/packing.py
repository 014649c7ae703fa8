"""Packing clips of different shapes into fixed token budgets (NaViT-style), for the DiT.

A packed global batch is `rows` rows of `tokens` patch tokens each; a row holds up to
`max_clips` whole clips (latents of any (t, h, w): portrait, landscape, square, long, short, and
1-frame images) one after the other, and padding after them. Every token carries its clip's
segment id (1..max_clips in its row; 0 = padding), its 3D position counted from its clip's
origin, and its clip's noise level; the captions of a row sit in `max_clips` text slots whose
text tokens carry the slot's id. The DiT (`WanDiT.forward_packed`) then attends only within a
clip and to the clip's own caption, so one compiled step (one shape per token budget) trains
every mix of clip shapes without recompiling.

    sizes ─ Packer (greedy first fit over a look-ahead window of a shuffled stream; deterministic:
            the plan is a pure function of the sizes and the seed) ─ PackPlan[i] = the global
            batch i as rows of example indices ─ pack() ─ arrays for the train step

The plan is random-access (`PackPlan[i]`), so the Grain iterator over it saves its position with
the checkpoint like any other and a resumed run sees the same batches.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sorajax import conditioning, flow, sharding
from sorajax.models import dit as dit_lib


def clip_tokens(latent_shape, patch) -> int:
    """Tokens of latents shaped (t, h, w[, z]) under patch (pt, ph, pw)."""
    t, h, w = tuple(latent_shape)[:3]
    pt, ph, pw = patch
    return (t // pt) * (h // ph) * (w // pw)


@dataclasses.dataclass(frozen=True)
class Budget:
    rows: int  # rows per global batch
    tokens: int  # tokens per row
    max_clips: int  # clips (and caption slots) per row


class Packer:
    """Greedy first-fit packing of a shuffled, endless stream of examples with `sizes[i]` tokens.

    Each row starts with the oldest pending example (so none waits forever) and then takes, in
    stream order, every pending example that still fits, looking at most `lookahead` examples
    ahead, until the row is full or holds `max_clips`. Epochs are fresh permutations of all
    examples (seeded by (seed, epoch)); the pending window carries over from one epoch to the next.
    """

    def __init__(self, sizes: Sequence[int], budget: Budget, *, seed: int, lookahead: int = 64,
                 shuffle: bool = True):
        self.sizes = np.asarray(sizes, np.int64)
        self.budget = budget
        self.seed, self.lookahead, self.shuffle = int(seed), int(lookahead), bool(shuffle)
        if len(self.sizes) == 0:
            raise ValueError("nothing to pack: no examples")
        big = int(self.sizes.max())
        if big > budget.tokens:
            raise ValueError(f"an example of {big} tokens does not fit a row of {budget.tokens} "
                             "tokens; raise the token budget or lower the pixel/frame budget")
        if budget.max_clips < 1 or budget.rows < 1:
            raise ValueError(f"budget {budget}: rows and max_clips must be >= 1")
        self._epoch, self._cursor, self._order = 0, 0, self._permutation(0)
        self.pending: list[int] = []

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.sizes)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(n)

    def _draw(self) -> int:
        if self._cursor == len(self._order):
            self._epoch += 1
            self._order, self._cursor = self._permutation(self._epoch), 0
        i = int(self._order[self._cursor])
        self._cursor += 1
        return i

    def next_row(self) -> list[int]:
        while len(self.pending) < self.lookahead:
            self.pending.append(self._draw())
        room, row, keep = self.budget.tokens, [], []
        for i in self.pending:
            if len(row) < self.budget.max_clips and self.sizes[i] <= room:
                row.append(i)
                room -= int(self.sizes[i])
            else:
                keep.append(i)
        self.pending = keep
        return row

    def next_batch(self) -> list[list[int]]:
        return [self.next_row() for _ in range(self.budget.rows)]


class PackPlan:
    """Random-access global batches of a Packer: plan[i] -> `rows` lists of example indices. The
    plan is extended on demand, under a lock (Grain's reader threads ask concurrently), and is
    the same in every process, which each build it."""

    def __init__(self, packer: Packer, length: int = 2 ** 40):
        self.packer = packer
        self._batches: list[list[list[int]]] = []
        self._len = int(length)
        self._lock = threading.Lock()

    def __len__(self):
        return self._len

    def __getitem__(self, i):
        i = int(i)
        with self._lock:
            while len(self._batches) <= i:
                self._batches.append(self.packer.next_batch())
            return self._batches[i]

    def efficiency(self, batches: int) -> float:
        """Real tokens / token budget over the first `batches` global batches."""
        b = self.packer.budget
        used = sum(int(self.packer.sizes[j]) for k in range(batches) for row in self[k] for j in row)
        return used / (batches * b.rows * b.tokens)


class BucketPlan:
    """Bucketing, the simple alternative to packing: every global batch holds clips of one shape
    (one bucket per distinct shape), `batch_of[shape]` of them, so that the tokens per batch stay
    about the same across buckets (bucket_batch_sizes). plan[i] -> (shape, clip indices). Each
    epoch shuffles every bucket and then the order of all the epoch's batches (seeded by (seed,
    epoch)); a bucket's last incomplete batch waits for the next epoch's shuffle. One compiled
    step per bucket (jit caches them)."""

    def __init__(self, shapes: Sequence, batch_of: dict, *, seed: int, length: int = 2 ** 40):
        self.keys = [tuple(s) for s in shapes]
        self.buckets: dict[tuple, list[int]] = {}
        for i, k in enumerate(self.keys):
            self.buckets.setdefault(k, []).append(i)
        self.batch_of = {tuple(k): int(v) for k, v in batch_of.items()}
        small = {k: len(v) for k, v in self.buckets.items() if len(v) < self.batch_of[k]}
        if small:
            k = min(small)
            raise ValueError(f"bucket {'x'.join(map(str, k))} has {small[k]} clips, fewer than its batch of "
                             f"{self.batch_of[k]}: lower the batch or drop the shape")
        self.seed, self._len = int(seed), int(length)
        self._batches: list[tuple[tuple, list[int]]] = []
        self._epoch = 0
        self._lock = threading.Lock()

    def __len__(self):
        return self._len

    def _extend(self):
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self._epoch])
        epoch = []
        for k in sorted(self.buckets):
            idx, b = np.asarray(self.buckets[k]), self.batch_of[k]
            idx = idx[rng.permutation(len(idx))]
            epoch += [(k, idx[j:j + b].tolist()) for j in range(0, len(idx) - b + 1, b)]
        self._batches += [epoch[j] for j in rng.permutation(len(epoch))]
        self._epoch += 1

    def __getitem__(self, i):
        i = int(i)
        with self._lock:
            while len(self._batches) <= i:
                self._extend()
            return self._batches[i]


def bucket_batch_sizes(tokens_of: dict, target_tokens: int, multiple: int = 1) -> dict:
    """Per shape: the batch that keeps about `target_tokens` tokens per global batch, a multiple
    of `multiple` (the data-parallel size), at least one multiple."""
    return {k: max(multiple, (int(target_tokens) // max(int(n), 1)) // multiple * multiple)
            for k, n in tokens_of.items()}


def pack(examples: Sequence[Sequence[dict]], budget_tokens: int, max_clips: int, patch,
         empty_ids, empty_mask) -> dict[str, np.ndarray]:
    """Rows of examples ({"latents": (t, h, w, z), "ids": (L,), "mask": (L,)}) -> one packed batch:

      tokens (R, N, pt*ph*pw*z) f32   patch vectors (dit.patchify order), zeros on padding
      positions (R, N, 3) int32       (t, h, w) of each token within its clip
      segment_ids (R, N) int32        1 + the clip's slot in its row; 0 = padding
      start_tokens (R, N) bool        the tokens of each clip's first latent frame
      ids, mask (R, K, L) int32       each slot's caption (empty slots: the empty caption)
      text_segment_ids (R, K*L) int32 1 + slot, for every text position of the slot
      clip_tokens (R, K) int32        tokens per slot (0: empty)
      clip_frames (R, K) int32        latent frames (t // pt) per slot (0: empty)
    """
    R, N, K = len(examples), int(budget_tokens), int(max_clips)
    L = len(empty_ids)
    p = None
    out = {"positions": np.zeros((R, N, 3), np.int32), "segment_ids": np.zeros((R, N), np.int32),
           "start_tokens": np.zeros((R, N), bool),
           "ids": np.tile(np.asarray(empty_ids, np.int32), (R, K, 1)),
           "mask": np.tile(np.asarray(empty_mask, np.int32), (R, K, 1)),
           "clip_tokens": np.zeros((R, K), np.int32), "clip_frames": np.zeros((R, K), np.int32)}
    tokens = None
    for r, row in enumerate(examples):
        if len(row) > K:
            raise ValueError(f"row {r} holds {len(row)} clips; at most {K}")
        at = 0
        for k, ex in enumerate(row):
            lat = np.asarray(ex["latents"], np.float32)
            t, h, w = (lat.shape[0] // patch[0], lat.shape[1] // patch[1], lat.shape[2] // patch[2])
            tok = dit_lib.patchify(lat[None], patch)[0]  # (n, P)
            n = tok.shape[0]
            if at + n > N:
                raise ValueError(f"row {r}: {at + n} tokens exceed the budget of {N}")
            if tokens is None:
                p = tok.shape[1]
                tokens = np.zeros((R, N, p), np.float32)
            tokens[r, at:at + n] = tok
            out["positions"][r, at:at + n] = dit_lib.grid_positions(t, h, w)
            out["segment_ids"][r, at:at + n] = k + 1
            out["start_tokens"][r, at:at + h * w] = True
            out["ids"][r, k] = ex["ids"]
            out["mask"][r, k] = ex["mask"]
            out["clip_tokens"][r, k] = n
            out["clip_frames"][r, k] = t
            at += n
    out["tokens"] = tokens if tokens is not None else np.zeros((R, N, 1), np.float32)
    out["text_segment_ids"] = np.repeat(np.arange(1, K + 1, dtype=np.int32), L)[None].repeat(R, 0)
    return out


def token_budget(max_tokens: int, multiple: int = 1) -> int:
    """The smallest multiple of `multiple` (e.g. the context-parallel size) >= max_tokens."""
    return int(math.ceil(max_tokens / multiple) * multiple)


# ----------------------------------------------------------------------------------------------
# The packed rectified-flow loss (traced inside the train step).
# ----------------------------------------------------------------------------------------------
def slot_of_tokens(segment_ids, max_clips: int):
    """(R, N) slot index 0..K-1 of each token (padding -> 0; mask it with segment_ids > 0)."""
    return jnp.clip(segment_ids - 1, 0, max_clips - 1)


def per_token(values, segment_ids):
    """(R, K, ...) per-slot values -> (R, N, ...) per token (padding gets slot 0's)."""
    slot = slot_of_tokens(segment_ids, values.shape[1])
    idx = slot.reshape(slot.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, idx, axis=1)


def packed_loss(model, batch, context, sigma, noise, given):
    """The flow loss of a packed batch at chosen noise: per-slot sigma (R, K), noise like
    batch["tokens"], `given` (R, N) bool tokens kept clean at noise level 0 (conditioning frames).
    Each clip's loss is its mean squared velocity error over its generated tokens; the batch's
    loss is the mean over the clips that have any (so long clips don't drown short ones: the
    same loss as running each clip alone and averaging). -> (loss, number of clips)."""


    x0, seg = batch["tokens"], batch["segment_ids"]  # (R, N, P), (R, N)
    K = batch["clip_tokens"].shape[1]
    real = seg > 0
    given = given & real
    s = per_token(sigma, seg)  # (R, N)
    xt = jnp.where(given[..., None], x0, flow.add_noise(x0, noise, s))
    # The model sees K + 1 noise levels per row (each slot's sigma, and 0 for given tokens) and
    # each token's index into them: its timestep modulation is computed per level, not per token.
    levels = jnp.concatenate([sigma, jnp.zeros_like(sigma[:, :1])], axis=1)  # (R, K + 1)
    level = jnp.where(given, K, slot_of_tokens(seg, K))  # (R, N)
    v = model.velocity_packed(xt, (levels.astype(s.dtype), level), batch["positions"], seg,
                              context, batch["text_segment_ids"], batch["start_tokens"])
    err = jnp.mean(jnp.square(v.astype(jnp.float32) - flow.velocity_target(x0, noise).astype(jnp.float32)), -1)
    w = (real & ~given).astype(jnp.float32)  # (R, N)
    onehot = (slot_of_tokens(seg, K)[..., None] == jnp.arange(K)).astype(jnp.float32)  # (R, N, K)
    num = jnp.einsum("rn,rnk->rk", err * w, onehot)
    den = jnp.einsum("rn,rnk->rk", w, onehot)
    has = den > 0
    clips = jnp.sum(has)
    loss = jnp.sum(jnp.where(has, num / jnp.maximum(den, 1.0), 0.0)) / jnp.maximum(clips, 1)
    return loss, clips


def packed_flow_loss(model, batch, key, *, flow_cfg, text_dropout: float, empty_ids, empty_mask,
                     cond_rates=None, max_frames: int = 1):
    """The DiT stage's loss on a packed batch: per-slot text dropout (for guidance), per-clip
    logit-normal noise levels, per-clip conditioning masks over each clip's own latent frames
    (`cond_rates` in conditioning.KINDS order; None: text-to-video only; `max_frames` bounds the
    clips' latent frames) -> (loss, aux metrics)."""


    k_drop, k_sigma, k_noise, k_mask = jax.random.split(key, 4)
    ids, mask = batch["ids"], batch["mask"]  # (R, K, L)
    R, K, L = ids.shape
    drop = jax.random.bernoulli(k_drop, text_dropout, (R, K, 1))
    ids = jnp.where(drop, jnp.asarray(empty_ids)[None, None], ids)
    mask = jnp.where(drop, jnp.asarray(empty_mask)[None, None], mask)
    # The R*K captions are sharded like a batch: left to propagation through the reshape, the
    # text encoder ran replicated on every chip (the packed 14B step's largest all-reduces).
    flat = [sharding.constrain(a.reshape(R * K, L), ("batch", None)) for a in (ids, mask)]
    ctx = sharding.constrain(model.encode_text(*flat), ("batch", None, None))  # (R*K, L, D)
    ctx = sharding.constrain(ctx.reshape(R, K * L, ctx.shape[-1]), ("batch", None, None))
    sigma = flow.sample_sigmas(k_sigma, (R, K), logit_mean=flow_cfg.logit_mean,
                               logit_std=flow_cfg.logit_std, shift=flow_cfg.shift)
    noise = jax.random.normal(k_noise, batch["tokens"].shape, batch["tokens"].dtype)
    given = jnp.zeros(batch["segment_ids"].shape, bool)
    if cond_rates is not None and any(r > 0 for r in cond_rates):
        fm = conditioning.sample_masks(k_mask, R * K, int(max_frames), cond_rates,
                                       lengths=batch["clip_frames"].reshape(-1)).reshape(R, K, -1)
        frame = jnp.clip(batch["positions"][..., 0], 0, int(max_frames) - 1)  # (R, N)
        given = jnp.take_along_axis(per_token(fm, batch["segment_ids"]), frame[..., None], -1)[..., 0]
    loss, clips = packed_loss(model, batch, ctx, sigma, noise, given)
    real = jnp.maximum(jnp.sum(batch["clip_tokens"]), 1)
    return loss, {"clips": clips.astype(jnp.float32),
                  "cond_frac": jnp.sum(given & (batch["segment_ids"] > 0)) / real,
                  "packing_efficiency": jnp.sum(batch["clip_tokens"]) / batch["segment_ids"].size}
