"""Attention kernels behind one function, selected by backend name, plus context parallelism.

Layout is (B, N, heads, head_dim) for q, k and v (the layout jax.nn.dot_product_attention and
cuDNN want, so no transposes). Backends (`DiTConfig.attention`):
  "xla"     plain XLA einsum-softmax-einsum (every platform, any dtype; the parity reference).
            Materialises (B, H, Nq, Nk) logits: fine for short sequences, not for 75k tokens.
  "flash"   blockwise online-softmax attention in pure JAX with a recomputing custom VJP
            (sorajax.models.context_parallel.flash_attention): O(N x block) memory on every
            platform, XLA-partitionable.
  "cudnn"   cuDNN fused flash attention (NVIDIA GPUs, bf16/fp16).
  "splash"  the Pallas TPU splash-attention kernel (TPU only); the sequence is padded to the
            kernel block and padded keys are masked with segment ids.
  "auto"    let JAX pick (implementation=None).
A backend unavailable on the running platform (cudnn off GPU or in f32, splash off TPU) falls
back to "flash" with a one-time warning naming the reason and the fallback.

Packed sequences (NaViT): every entry point takes optional `q_segment_ids` (B, Nq) and
`kv_segment_ids` (B, Nk) int32, and a query attends to a key iff their ids are equal (several
clips in one token row; cross-attention keys = the clips' captions with their clips' ids). The
ids are only compared (padding is whatever id the caller gives it); a query with no matching key
gets a finite, meaningless output. xla builds a (B, 1, Nq, Nk) mask, flash and ring mask blocks,
all_to_all gathers the ids for its local kernel, splash uses its kernel's SegmentIds; "cudnn"
and "auto" (jax.nn.dot_product_attention, no segment ids) fall back to "flash" with a one-time
warning. Without segment ids every path is the unmasked one.

Context parallelism: when the active mesh (sharding.activation_rules) shards the "length"
logical axis (default: the "context" mesh axis) over more than one device, self-attention runs
as `context_parallel` = "ring" (k/v blocks travel around the ring; online softmax) or
"all_to_all" (heads <-> sequence swap, full-sequence attention on heads/c, swap back); see
sorajax/models/context_parallel.py. Cross-attention (short text keys) needs neither: its queries
stay sequence-sharded and the keys are replicated. Context parallelism never switches itself
off: a token count that the context axis does not divide is a ValueError (`unsplit_axes`), not
a silent fallback to unsharded full attention.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from sorajax import sharding

log = logging.getLogger(__name__)

BACKENDS = ("xla", "flash", "cudnn", "splash", "auto")
CONTEXT_PARALLEL = ("ring", "all_to_all")
FALLBACK = "flash"  # what an unavailable backend (splash off TPU, cudnn off GPU / in f32) runs
_warned: set[str] = set()


def _warn_once(key: str, msg: str):
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


# ----------------------------------------------------------------------------------------------
# Local (per-device or unsharded) kernels: (B, Nq, H, D), (B, Nk, H, D) -> (B, Nq, H, D), each
# callable as fn(q, k, v, q_segment_ids=None, kv_segment_ids=None) with ids (B, Nq), (B, Nk).
# ----------------------------------------------------------------------------------------------
def _segment_mask(q_segment_ids, kv_segment_ids):
    """(B, 1, Nq, Nk) bool: query and key in the same segment."""
    return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


def _xla(q, k, v, scale, mask=None, q_segment_ids=None, kv_segment_ids=None):
    if q_segment_ids is not None:
        seg = _segment_mask(q_segment_ids, kv_segment_ids)
        mask = seg if mask is None else jnp.logical_and(mask, seg)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


def _flash(q, k, v, scale, q_segment_ids=None, kv_segment_ids=None):
    from sorajax.models.context_parallel import flash_attention

    return flash_attention(q, k, v, scale=scale, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)


def _splash_block(n: int) -> int:
    return 512 if n >= 512 else 128


def _splash(q, k, v, scale, q_segment_ids=None, kv_segment_ids=None):
    """Pallas splash attention (TPU). Pads Nq/Nk to the kernel block; segment id 1 marks padding
    so real queries never attend to padded keys. With per-example segment ids (packing) the
    padding gets an id below every real one. Softmax scale is folded into q."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, nq, H, D = q.shape
    nk = k.shape[1]
    bq, bk = _splash_block(nq), _splash_block(nk)
    pq, pk = -nq % bq, -nk % bk
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, pq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kh = jnp.pad(k, ((0, 0), (0, pk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # (B, H, Nk', D)
    vh = jnp.pad(v, ((0, 0), (0, pk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    mask = sm.MultiHeadMask([sm.FullMask((nq + pq, nk + pk)) for _ in range(H)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks)
    if q_segment_ids is None:
        seg = sk.SegmentIds(q=(jnp.arange(nq + pq) >= nq).astype(jnp.int32),
                            kv=(jnp.arange(nk + pk) >= nk).astype(jnp.int32))
        o = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=seg))(qh, kh, vh)  # (B, H, Nq', D)
    else:
        pad_id = jnp.minimum(q_segment_ids.min(), kv_segment_ids.min()) - 1  # no real token has it
        qs = jnp.pad(q_segment_ids.astype(jnp.int32), ((0, 0), (0, pq)), constant_values=pad_id)
        ks = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, pk)), constant_values=pad_id)
        o = jax.vmap(lambda a, b, c, i, j: kernel(a, b, c, segment_ids=sk.SegmentIds(q=i, kv=j)))(
            qh, kh, vh, qs, ks)  # (B, H, Nq', D)
    return o.transpose(0, 2, 1, 3)[:, :nq]


def _resolve(backend: str, dtype, segments: bool = False) -> str:
    """The backend that will really run on this platform/dtype, with segment ids when
    `segments` (with a one-time warning)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    platform = _platform()
    if backend == "splash" and platform != "tpu":
        _warn_once(f"splash:{platform}", f"attention backend 'splash' needs a TPU (running on {platform}); "
                   f"falling back to '{FALLBACK}' (blockwise attention in plain JAX)")
        return FALLBACK
    if backend == "cudnn" and (platform != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)):
        _warn_once(f"cudnn:{platform}:{jnp.dtype(dtype)}",
                   f"attention backend 'cudnn' needs an NVIDIA GPU and bf16/fp16 (running on {platform}, "
                   f"{jnp.dtype(dtype)}); falling back to '{FALLBACK}' (blockwise attention in plain JAX)")
        return FALLBACK
    if segments and backend in ("cudnn", "auto"):
        _warn_once(f"{backend}:segments", f"attention backend {backend!r} (jax.nn.dot_product_attention) "
                   f"takes no segment ids for packed sequences; falling back to '{FALLBACK}' "
                   f"(blockwise attention in plain JAX)")
        return FALLBACK
    return backend


def _platform() -> str:
    """The platform the traced program is for: the active mesh's devices (compile-only TPU
    devices when the AOT planner traces on a CPU host), else JAX's default backend."""
    mesh, _ = sharding.active()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def _local_fn(backend: str, scale):
    if backend == "xla":
        return functools.partial(_xla, scale=scale)
    if backend == "flash":
        return functools.partial(_flash, scale=scale)
    if backend == "splash":
        return functools.partial(_splash, scale=scale)
    impl = {"cudnn": "cudnn", "auto": None}[backend]

    def fused(q, k, v, q_segment_ids=None, kv_segment_ids=None):
        if q_segment_ids is not None:  # _resolve sends packed attention to FALLBACK
            raise ValueError(f"attention backend {backend!r} takes no segment ids")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
    return fused


def _segments(q_segment_ids, kv_segment_ids):
    """Both None, or both as int32 (raises when only one is given)."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together: give both or neither")
    if q_segment_ids is None:
        return None, None
    return jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def dot_product_attention(q, k, v, *, backend: str = "xla", mask=None, scale: float | None = None,
                          q_segment_ids=None, kv_segment_ids=None):
    """Softmax attention without context parallelism. q: (B, Nq, H, D), k/v: (B, Nk, H, D).

    mask: optional bool array broadcastable to (B, H, Nq, Nk); True = attend (xla only).
    scale: logits scale, default 1/sqrt(D).
    q_segment_ids (B, Nq) / kv_segment_ids (B, Nk) int: packed sequences (both or neither); a
    query attends to a key iff their ids are equal (ANDed with `mask` when both are given).
    """
    qs, ks = _segments(q_segment_ids, kv_segment_ids)
    backend = _resolve(backend, q.dtype, qs is not None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    segs = {} if qs is None else dict(q_segment_ids=qs, kv_segment_ids=ks)
    if mask is not None:
        return _xla(q, k, v, scale, mask, **segs)
    fn = _local_fn(backend, scale)
    if backend == "splash":
        return _in_shard_map(fn, q, k, v, segments=(qs, ks))
    return fn(q, k, v, **segs)


def _spec_axes(spec, dims) -> tuple[str, ...]:
    """Mesh axes of the PartitionSpec entries at positions `dims`, in order."""
    out = []
    for i in dims:
        entry = spec[i] if i < len(spec) else None
        out += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
    return tuple(out)


def unsplit_axes(names, shape, dims) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wanted, dropped): the mesh axes (size > 1) that the active rules map the logical axes at
    positions `dims` of `names` to, and those of them that sharding.constrain drops for `shape`
    because they do not divide it. Both () outside activation_rules."""
    mesh, _ = sharding.active()
    if mesh is None or mesh.size == 1:
        return (), ()
    free = tuple(None if i in dims else d for i, d in enumerate(shape))  # no divisibility test
    wanted = _spec_axes(sharding.logical_spec(names, free), dims)
    kept = _spec_axes(sharding.logical_spec(names, shape), dims)
    return wanted, tuple(a for a in wanted if a not in kept)


def describe_axes(axes) -> tuple[str, int]:
    """("context=8", 8) for mesh axes of the active mesh ("fsdp=2 x context=4", 8 for two)."""
    mesh, _ = sharding.active()
    return " x ".join(f"{a}={mesh.shape[a]}" for a in axes), math.prod(mesh.shape[a] for a in axes)


def _check_tokens_split(q_shape):
    """Context parallelism never switches itself off: raises when the rules shard the token axis
    but its length does not divide the context devices (sharding.constrain would drop the axis
    and attention would silently run unsharded, full-sequence, on every device)."""
    wanted, dropped = unsplit_axes(("batch", "length", "heads", None), q_shape, (1,))
    if dropped:
        what, c = describe_axes(wanted)
        change = " or ".join(f"mesh.{a}" for a in wanted)
        raise ValueError(
            f"self-attention over {q_shape[1]} tokens cannot be split over {what} devices: the "
            f"token count must be a multiple of {c}; change frames/height/width or {change}")


def _specs(q_shape):
    """(batch_axes, seq_axes, head_axes) of (B, N, H, D) under the active rules."""
    spec = sharding.logical_spec(("batch", "length", "heads", None), q_shape)
    return tuple(spec) + (None,) * (4 - len(spec)) if spec is not None else (None,) * 4


def _in_shard_map(fn, q, k, v, *, segments=(None, None)):
    """Runs a per-device kernel (Pallas: not auto-partitionable) over batch/head shards, with
    optional segment ids `segments` = (q ids (B, Nq), kv ids (B, Nk)). The queries (their ids and
    the output) keep the sequence sharding the rules give them -- every query attends to every
    key, so no device needs another's queries -- and the keys/values are whole on every device:
    for the DiT's cross-attention, 512 text tokens, not the video's 75,600 queries gathered onto
    each context device and their gradient summed back (docs/SCALING.md)."""
    mesh, _ = sharding.active()
    qs, ks = segments
    segs = {} if qs is None else dict(q_segment_ids=qs, kv_segment_ids=ks)
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, **segs)
    b, s, h, _ = _specs(q.shape)
    P = jax.sharding.PartitionSpec
    q_spec, kv_spec = P(b, s, h, None), P(b, None, h, None)
    if qs is None:
        return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             check_vma=False)(q, k, v)

    def packed(q, k, v, qs, ks):
        return fn(q, k, v, q_segment_ids=qs, kv_segment_ids=ks)
    return jax.shard_map(packed, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(b, s), P(b, None)),
                         out_specs=q_spec, check_vma=False)(q, k, v, qs, ks)


def self_attention(q, k, v, *, backend: str = "xla", context_parallel: str = "ring",
                   scale: float | None = None, q_segment_ids=None, kv_segment_ids=None):
    """Self-attention over the (possibly sequence-sharded) token axis.

    Under sharding.activation_rules with the "length" axis split over c > 1 devices this is
    context-parallel (`context_parallel` = "ring" | "all_to_all"); otherwise it is
    dot_product_attention with `backend`. Raises ValueError when the rules split "length" over
    c > 1 devices but the token count N is not a multiple of c.
    q_segment_ids (B, N) int: packed clips, a token attends to the tokens of its own id;
    kv_segment_ids defaults to q_segment_ids (give it only if the keys' ids differ).
    """
    if context_parallel not in CONTEXT_PARALLEL:
        raise ValueError(f"unknown context_parallel {context_parallel!r}; choose from {CONTEXT_PARALLEL}")
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    qs, ks = _segments(q_segment_ids, kv_segment_ids)
    backend = _resolve(backend, q.dtype, qs is not None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mesh, _ = sharding.active()
    _check_tokens_split(q.shape)
    b, s, h, _ = _specs(q.shape)
    if mesh is None or s is None:
        return dot_product_attention(q, k, v, backend=backend, scale=scale, q_segment_ids=qs,
                                     kv_segment_ids=ks)
    from sorajax.models.context_parallel import context_parallel_attention

    # Ring attention uses its own blockwise kernel per ring step; all-to-all runs `backend` on
    # the full sequence of its heads/c heads.
    attend = _local_fn(backend, scale) if context_parallel == "all_to_all" else None
    return context_parallel_attention(q, k, v, mesh=mesh, variant=context_parallel, seq_axis=s,
                                      batch_axes=b, head_axes=h, scale=scale, attend=attend,
                                      q_segment_ids=qs, kv_segment_ids=ks)
