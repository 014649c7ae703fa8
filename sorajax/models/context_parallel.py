"""Context-parallel (sequence-parallel) attention for a token sequence sharded over a mesh axis.

Layout is (B, N, H, D) for q, k, v everywhere; attention is bidirectional (no causal mask),
scale defaults to 1/sqrt(D), softmax statistics and all accumulators are float32 whatever the
input dtype (bf16 works; outputs come back in q.dtype). With c = size of the sequence axis and
n = N / c tokens per device:

``flash_attention``
    Single-device blockwise attention with an online softmax (FlashAttention) and a custom VJP
    that saves only (q, k, v, o, logsumexp) and recomputes the probabilities block by block in
    the backward pass (FlashAttention-2). Never builds the N x N logits: peak temporaries are
    O(B * block_q * H * block_k). Block rule: a block is min(block, N); when N is not a multiple
    of it the sequence is zero-padded up to one and the padded keys are masked out. Segment ids
    are blocked like q and k.

``variant="ring"`` (Ring Attention)
    Each device keeps its n queries; the k/v shards travel around the ring with
    ``lax.ppermute`` (with their kv segment ids, if any). Forward: c blockwise steps merged by
    logsumexp, c-1 ppermutes of (k, v), each issued before the compute on the current block so
    XLA can overlap the two. Backward: c-1 ppermutes of (k, v) plus c ppermutes of the float32
    (dk, dv) accumulators, which ride along with their k/v block and are back at their owner
    after the c-th hop. Works for any head count. Memory per device: O(n * block) temporaries
    plus two k/v shards in flight.

``variant="all_to_all"`` (DeepSpeed-Ulysses)
    ``lax.all_to_all`` swaps sequence for heads: every device gets the full sequence for H/c
    heads, runs any local kernel (flash_attention by default, or e.g. cuDNN), and a second
    all_to_all swaps back. 4 all-to-alls per attention (q, k, v in, o out; 4 more in the
    backward), each moving 1/c of a shard per peer. Needs local heads % c == 0. Memory per
    device: whatever the local kernel needs for N tokens and H/c heads (O(N * block) for flash).
    Segment ids are all-gathered to the full sequence (small: one int per token) and passed to
    the local kernel.

Packed sequences (NaViT): every entry point takes optional ``q_segment_ids`` (B, Nq) and
``kv_segment_ids`` (B, Nk) int32; a query attends to a key iff their ids are equal (ids are only
compared: padding is whatever id the caller gives it). Masked logits are a large finite negative
(SEGMENT_MASKED), not -inf, so a query with no matching key gets a finite, meaningless output,
and what its cotangent adds to the gradients is finite but unspecified too (a loss should give
such queries a zero cotangent). Without segment ids the kernels are the unmasked ones, unchanged.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

VARIANTS = ("ring", "all_to_all")
F32 = jnp.float32
SEGMENT_MASKED = -1e30  # f32 logit of a query/key pair in different segments: finite, unlike -inf


# ----------------------------------------------------------------------------------------------
# Blockwise cores shared by flash_attention and the ring (inputs already padded to the blocks).
# ----------------------------------------------------------------------------------------------
def _resolve_scale(scale, head_dim):
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _pad_seq(x, block):
    """Zero-pads axis 1 of x up to a multiple of block."""
    pad = (-x.shape[1]) % block
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _full(shape, fill, *like):
    """f32 constant that varies over the shard_map axes its `like` arrays vary over (scan
    carries must match the body outputs under check_vma); XLA folds the zero terms away."""
    x = lax.full_like(like[0], fill, F32, shape)
    for a in like[1:]:
        x = x + lax.full_like(a, 0, F32, shape)
    return x


def _to_blocks(x, block):
    """(B, N, ...) -> (N // block, B, block, ...)."""
    b, n = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n // block, block, *x.shape[2:]), 1, 0)


def _from_blocks(x):
    """(nb, B, block, ...) -> (B, nb * block, ...)."""
    nb, b, block = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, nb * block, *x.shape[3:])


def _mm(spec, a, b):
    """einsum with `a` (f32 probabilities) cast to b's dtype, accumulated in f32."""
    return jnp.einsum(spec, a.astype(b.dtype), b, preferred_element_type=F32)


def _logits(qi, kj, pos, scale, n_valid, qsi=None, ksj=None):
    """Scaled f32 logits of a q block against a k block, padded keys (pos >= n_valid) -> -inf,
    keys of another segment (qsi (B, bq) != ksj (B, bk), when given) -> SEGMENT_MASKED. A query
    row of a block then has a finite max (every block holds >= 1 real key): no inf - inf."""
    s = jnp.einsum("bqhd,bkhd->bqhk", qi, kj, preferred_element_type=F32) * scale  # (B, bq, H, bk)
    if qsi is not None:
        s = jnp.where(qsi[:, :, None, None] == ksj[:, None, None, :], s, SEGMENT_MASKED)
    if pos is not None:
        s = jnp.where(pos < n_valid, s, -jnp.inf)
    return s


def _key_positions(nk_pad, bk, n_valid):
    """(nkb, bk) key index per block, or None when nothing is padded (no mask needed)."""
    return None if nk_pad == n_valid else jnp.arange(nk_pad).reshape(-1, bk)


def _seg_blocks(seg, block):
    """(B, N) segment ids -> (N // block, B, block), or None."""
    return None if seg is None else _to_blocks(seg, block)


def _fwd_core(q, k, v, scale, bq, bk, n_valid, qs=None, ks=None):
    """q (B, Nq, H, D) padded to bq; k, v (B, Nk, H, D) padded to bk, keys >= n_valid masked;
    optional segment ids qs (B, Nq), ks (B, Nk) padded likewise (both or neither).
    Returns o (B, Nq, H, D) f32 and lse (B, Nq, H) f32. Every k block holds >= 1 real key."""
    kb, vb = _to_blocks(k, bk), _to_blocks(v, bk)  # (nkb, B, bk, H, D)
    pos = _key_positions(k.shape[1], bk, n_valid)  # (nkb, bk) or None

    def one_q_block(xs_q):
        qi, qsi = xs_q  # (B, bq, H, D), (B, bq) or None

        def step(carry, xs):
            m, l, acc = carry  # (B, bq, H), (B, bq, H), (B, bq, H, D)
            kj, vj, pj, ksj = xs
            s = _logits(qi, kj, pj, scale, n_valid, qsi, ksj)  # (B, bq, H, bk)
            m_new = jnp.maximum(m, s.max(-1))  # (B, bq, H)
            p = jnp.exp(s - m_new[..., None])  # (B, bq, H, bk)
            alpha = jnp.exp(m - m_new)  # (B, bq, H); 0 on the first block (m = -inf)
            l = alpha * l + p.sum(-1)
            pv = _mm("bqhk,bkhd->bqhd", p, vj)  # (B, bq, H, D)
            return (m_new, l, acc * alpha[..., None] + pv), None

        stats = _full(qi.shape[:3], 0.0, qi, k, v)  # (B, bq, H)
        init = (stats - jnp.inf, stats, _full(qi.shape, 0.0, qi, k, v))
        (m, l, acc), _ = lax.scan(step, init, (kb, vb, pos, _seg_blocks(ks, bk)))
        return acc / l[..., None], m + jnp.log(l)  # (B, bq, H, D), (B, bq, H)

    # (nqb, B, bq, H, D), (nqb, B, bq, H)
    o, lse = lax.map(one_q_block, (_to_blocks(q, bq), _seg_blocks(qs, bq)))
    return _from_blocks(o), _from_blocks(lse)


def _bwd_core(q, k, v, do, lse, delta, scale, bq, bk, n_valid, qs=None, ks=None):
    """FlashAttention-2 backward of one (q, k/v) pair of padded blocks, recomputing P from lse.
    lse/delta (B, Nq, H) are the statistics of the FULL attention row; qs/ks optional segment
    ids as in _fwd_core. Returns f32 dq, dk, dv."""
    qb, dob = _to_blocks(q, bq), _to_blocks(do, bq)  # (nqb, B, bq, H, D)
    lseb, deltab = _to_blocks(lse, bq), _to_blocks(delta, bq)  # (nqb, B, bq, H)
    kb, vb = _to_blocks(k, bk), _to_blocks(v, bk)  # (nkb, B, bk, H, D)
    pos = _key_positions(k.shape[1], bk, n_valid)
    qsb = _seg_blocks(qs, bq)  # (nqb, B, bq) or None

    def k_step(dq_blocks, xs):  # dq_blocks (nqb, B, bq, H, D) f32
        kj, vj, pj, ksj = xs

        def q_step(carry, ys):
            dk, dv = carry  # (B, bk, H, D) f32
            qi, doi, lsei, deltai, dqi, qsi = ys
            s = _logits(qi, kj, pj, scale, n_valid, qsi, ksj)
            p = jnp.exp(s - lsei[..., None])  # (B, bq, H, bk)
            dv = dv + _mm("bqhk,bqhd->bkhd", p, doi)  # P^T dO
            dp = _mm("bqhd,bkhd->bqhk", doi, vj)  # (B, bq, H, bk) = dO V^T
            ds = p * (dp - deltai[..., None])  # (B, bq, H, bk); scale applied once at the end
            dqi = dqi + _mm("bqhk,bkhd->bqhd", ds, kj)  # dS K
            dk = dk + _mm("bqhk,bqhd->bkhd", ds, qi)  # dS^T Q
            return (dk, dv), dqi

        zeros = _full(kj.shape, 0.0, q, k, v, do)  # (B, bk, H, D)
        (dk, dv), dq_blocks = lax.scan(q_step, (zeros, zeros), (qb, dob, lseb, deltab, dq_blocks, qsb))
        return dq_blocks, (dk, dv)

    dq0 = _full(qb.shape, 0.0, q, k, v, do)  # (nqb, B, bq, H, D)
    dq_blocks, (dkb, dvb) = lax.scan(k_step, dq0, (kb, vb, pos, _seg_blocks(ks, bk)))
    return _from_blocks(dq_blocks) * scale, _from_blocks(dkb) * scale, _from_blocks(dvb)


def _delta(do, o):
    return jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # (B, N, H) = rowsum(dO * O)


# ----------------------------------------------------------------------------------------------
# 1. Single-device flash attention.
# ----------------------------------------------------------------------------------------------
def _check_segments(q_segment_ids, kv_segment_ids, nq, nk):
    """The segment ids as int32 (both None, or both given with shapes (B, Nq) and (B, Nk))."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids go together: give both or neither")
    if q_segment_ids is None:
        return None, None
    qs, ks = jnp.asarray(q_segment_ids, jnp.int32), jnp.asarray(kv_segment_ids, jnp.int32)
    if qs.ndim != 2 or ks.ndim != 2 or qs.shape[1] != nq or ks.shape[1] != nk:
        raise ValueError(f"segment ids must be (B, Nq={nq}) and (B, Nk={nk}); got {qs.shape} and {ks.shape}")
    return qs, ks


def flash_attention(q, k, v, *, scale=None, block_q=512, block_k=512, q_segment_ids=None,
                    kv_segment_ids=None):
    """Memory-efficient softmax attention. q (B, Nq, H, D), k/v (B, Nk, H, D) -> (B, Nq, H, D).
    q_segment_ids (B, Nq) / kv_segment_ids (B, Nk) int: a query attends to a key iff equal ids."""
    qs, ks = _check_segments(q_segment_ids, kv_segment_ids, q.shape[1], k.shape[1])
    return _flash(q, k, v, qs, ks, _resolve_scale(scale, q.shape[-1]), int(block_q), int(block_k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, qs, ks, scale, block_q, block_k):
    return _flash_fwd(q, k, v, qs, ks, scale, block_q, block_k)[0]


def _flash_fwd(q, k, v, qs, ks, scale, block_q, block_k):
    nq, nk = q.shape[1], k.shape[1]
    bq, bk = min(block_q, nq), min(block_k, nk)
    pq = functools.partial(_pad_seq, block=bq)
    pk = functools.partial(_pad_seq, block=bk)
    segs = () if qs is None else (pq(qs), pk(ks))
    o, lse = _fwd_core(pq(q), pk(k), pk(v), scale, bq, bk, nk, *segs)
    o, lse = o[:, :nq].astype(q.dtype), lse[:, :nq]  # (B, Nq, H, D), (B, Nq, H)
    return o, (q, k, v, qs, ks, o, lse)


def _flash_bwd(scale, block_q, block_k, res, do):
    q, k, v, qs, ks, o, lse = res
    nq, nk = q.shape[1], k.shape[1]
    bq, bk = min(block_q, nq), min(block_k, nk)
    pq = functools.partial(_pad_seq, block=bq)
    pk = functools.partial(_pad_seq, block=bk)
    delta = _delta(do, o)  # (B, Nq, H)
    segs = () if qs is None else (pq(qs), pk(ks))
    dq, dk, dv = _bwd_core(pq(q), pk(k), pk(v), pq(do), pq(lse), pq(delta), scale, bq, bk, nk, *segs)
    # Integer segment ids get no cotangent (None).
    return dq[:, :nq].astype(q.dtype), dk[:, :nk].astype(k.dtype), dv[:, :nk].astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# 2. Ring attention (inside shard_map).
# ----------------------------------------------------------------------------------------------
def ring_attention_shard(q, k, v, *, axis_name, scale=None, block_q=512, block_k=512,
                         q_segment_ids=None, kv_segment_ids=None):
    """Local shards q (B, n, H, D), k/v (B, m, H, D) of sequences split in mesh order over
    `axis_name` -> attention of the local queries against the whole k/v sequence, (B, n, H, D).
    Optional segment-id shards q_segment_ids (B, n), kv_segment_ids (B, m): the kv ids travel
    around the ring with their k/v block."""
    qs, ks = _check_segments(q_segment_ids, kv_segment_ids, q.shape[1], k.shape[1])
    return _ring(q, k, v, qs, ks, axis_name, _resolve_scale(scale, q.shape[-1]), int(block_q),
                 int(block_k))


def _ring_perm(axis_name):
    c = lax.axis_size(axis_name)
    return c, [(i, (i + 1) % c) for i in range(c)]  # device i sends to i + 1


def _merge(o, lse, o_t, lse_t):
    """Combines two partial softmax results over disjoint key sets by their logsumexps."""
    lse_new = jnp.logaddexp(lse, lse_t)  # (B, n, H)
    o = o * jnp.exp(lse - lse_new)[..., None] + o_t * jnp.exp(lse_t - lse_new)[..., None]
    return o, lse_new  # (B, n, H, D), (B, n, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q, k, v, qs, ks, axis_name, scale, block_q, block_k):
    return _ring_fwd(q, k, v, qs, ks, axis_name, scale, block_q, block_k)[0]


def _ring_fwd(q, k, v, qs, ks, axis_name, scale, block_q, block_k):
    c, perm = _ring_perm(axis_name)
    nq, nk = q.shape[1], k.shape[1]
    bq, bk = min(block_q, nq), min(block_k, nk)
    qp = _pad_seq(q, bq)  # (B, nq_pad, H, D)
    qsp = None if qs is None else _pad_seq(qs, bq)  # (B, nq_pad) or None

    def attend(kk, vv, kks):
        return _fwd_core(qp, kk, vv, scale, bq, bk, nk, *(() if qs is None else (qsp, kks)))

    def step(carry, _):
        kk, vv, kks, o, lse = carry  # k/v (B, nk_pad, H, D), ids (B, nk_pad) from device i - t
        nxt = lax.ppermute((kk, vv, kks), axis_name, perm)  # in flight during the compute
        o, lse = _merge(o, lse, *attend(kk, vv, kks))
        return (*nxt, o, lse), None

    o0 = _full(qp.shape, 0.0, q, k, v)  # (B, nq_pad, H, D)
    lse0 = _full(qp.shape[:3], -jnp.inf, q, k, v)  # (B, nq_pad, H)
    ksp = None if ks is None else _pad_seq(ks, bk)
    carry = (_pad_seq(k, bk), _pad_seq(v, bk), ksp, o0, lse0)
    (kk, vv, kks, o, lse), _ = lax.scan(step, carry, None, length=c - 1)  # c - 1 ppermutes
    o, lse = _merge(o, lse, *attend(kk, vv, kks))  # last block: no send
    o, lse = o[:, :nq].astype(q.dtype), lse[:, :nq]
    return o, (q, k, v, qs, ks, o, lse)


def _ring_bwd(axis_name, scale, block_q, block_k, res, do):
    q, k, v, qs, ks, o, lse = res
    c, perm = _ring_perm(axis_name)
    nq, nk = q.shape[1], k.shape[1]
    bq, bk = min(block_q, nq), min(block_k, nk)
    pq = functools.partial(_pad_seq, block=bq)
    qp, dop, lsep, deltap = pq(q), pq(do), pq(lse), pq(_delta(do, o))
    qsp = None if qs is None else pq(qs)

    def grads(kk, vv, kks):
        segs = () if qs is None else (qsp, kks)
        return _bwd_core(qp, kk, vv, dop, lsep, deltap, scale, bq, bk, nk, *segs)

    def step(carry, _):
        kk, vv, kks, dq, dk, dv = carry  # dk/dv (B, nk_pad, H, D) f32: accumulators of block kk/vv
        nxt = lax.ppermute((kk, vv, kks), axis_name, perm)  # in flight during the compute
        dq_t, dk_t, dv_t = grads(kk, vv, kks)
        dk, dv = lax.ppermute((dk + dk_t, dv + dv_t), axis_name, perm)  # follow their block
        return (*nxt, dq + dq_t, dk, dv), None

    kp, vp = _pad_seq(k, bk), _pad_seq(v, bk)  # (B, nk_pad, H, D)
    ksp = None if ks is None else _pad_seq(ks, bk)  # (B, nk_pad)
    zk = _full(kp.shape, 0.0, q, k, v, do)  # (B, nk_pad, H, D)
    carry = (kp, vp, ksp, _full(qp.shape, 0.0, q, k, v, do), zk, zk)
    (kk, vv, kks, dq, dk, dv), _ = lax.scan(step, carry, None, length=c - 1)
    dq_t, dk_t, dv_t = grads(kk, vv, kks)
    dk, dv = lax.ppermute((dk + dk_t, dv + dv_t), axis_name, perm)  # c-th hop: back at the owner
    dq = dq + dq_t
    return (dq[:, :nq].astype(q.dtype), dk[:, :nk].astype(k.dtype), dv[:, :nk].astype(v.dtype),
            None, None)  # no cotangent for the integer segment ids


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------------------------
# 3. All-to-all (Ulysses) attention (inside shard_map).
# ----------------------------------------------------------------------------------------------
def all_to_all_attention_shard(q, k, v, *, axis_name, attend=None, q_segment_ids=None,
                               kv_segment_ids=None):
    """Local shards (B, n, H, D) -> (B, n, H, D) via heads<->sequence all_to_all around
    `attend(q, k, v)` (default flash_attention) on the full sequence for H/c heads. With
    segment-id shards q_segment_ids (B, n) / kv_segment_ids (B, m) the full-sequence ids are
    all-gathered and the kernel is called as attend(q, k, v, q_segment_ids=, kv_segment_ids=)."""
    qs, ks = _check_segments(q_segment_ids, kv_segment_ids, q.shape[1], k.shape[1])
    c = lax.axis_size(axis_name)
    heads = q.shape[2]
    if heads % c or k.shape[2] % c:
        raise ValueError(f"all_to_all context parallelism needs heads ({heads}) divisible by the "
                         f"{axis_name!r} axis ({c}); use variant='ring'")
    attend = flash_attention if attend is None else attend

    def seq_to_heads(x):  # (B, n, H, D) -> (B, n * c, H / c, D)
        return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

    segs = {}
    if qs is not None:  # (B, N) in the order all_to_all concatenates the sequence
        segs = dict(q_segment_ids=lax.all_gather(qs, axis_name, axis=1, tiled=True),
                    kv_segment_ids=lax.all_gather(ks, axis_name, axis=1, tiled=True))
    o = attend(seq_to_heads(q), seq_to_heads(k), seq_to_heads(v), **segs)  # (B, N, H / c, D)
    return lax.all_to_all(o, axis_name, split_axis=1, concat_axis=2, tiled=True)  # (B, n, H, D)


# ----------------------------------------------------------------------------------------------
# 4. Entry point for the model (global arrays, under jit).
# ----------------------------------------------------------------------------------------------
def _axes_size(mesh, axes):
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def context_parallel_attention(q, k, v, *, mesh, variant, seq_axis="context", batch_axes=None,
                               head_axes=None, scale=None, attend=None, block_q=512, block_k=512,
                               q_segment_ids=None, kv_segment_ids=None):
    """Attention of global q (B, Nq, H, D), k/v (B, Nk, H, D) with the sequences sharded over
    `seq_axis` of `mesh`, batch over `batch_axes` and heads over `head_axes` (a mesh axis name,
    a tuple of names, or None) -> (B, Nq, H, D) sharded the same way.

    variant: "ring" (any head count) or "all_to_all" (local heads % context size == 0).
    scale / block_q / block_k: for the built-in kernels (ring steps, default flash_attention).
    attend: local kernel for "all_to_all" and for a context axis of size 1, called as
    attend(q, k, v) and applying its own scale; default flash_attention. A custom kernel
    (cuDNN, Pallas) may not implement shard_map's varying-axes typing, so with one the
    shard_map runs with check_vma=False.
    q_segment_ids (B, Nq) / kv_segment_ids (B, Nk) int (both or neither): packed sequences, a
    query attends to a key iff equal ids; sharded like the tokens (batch_axes, seq_axis). With
    them `attend` is called as attend(q, k, v, q_segment_ids=..., kv_segment_ids=...).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown context-parallel variant {variant!r}; choose from {VARIANTS}")
    local = attend if attend is not None else functools.partial(
        flash_attention, scale=scale, block_q=block_q, block_k=block_k)
    if isinstance(seq_axis, (tuple, list)) and len(seq_axis) == 1:
        seq_axis = seq_axis[0]  # a PartitionSpec entry like ("context",)
    qs, ks = _check_segments(q_segment_ids, kv_segment_ids, q.shape[1], k.shape[1])
    segs = {} if qs is None else dict(q_segment_ids=qs, kv_segment_ids=ks)
    c = _axes_size(mesh, seq_axis)
    if c == 1:
        return local(q, k, v, **segs)
    for name, size, dim in (("sequence", c, q.shape[1]), ("key sequence", c, k.shape[1]),
                            ("batch", _axes_size(mesh, batch_axes), q.shape[0]),
                            ("heads", _axes_size(mesh, head_axes), q.shape[2])):
        if dim % size:
            raise ValueError(f"context_parallel_attention: {name} length {dim} is not divisible "
                             f"by its mesh axes (size {size})")
    if variant == "ring":
        fn = functools.partial(ring_attention_shard, axis_name=seq_axis, scale=scale,
                               block_q=block_q, block_k=block_k)
    else:
        fn = functools.partial(all_to_all_attention_shard, axis_name=seq_axis, attend=local)
    spec = P(batch_axes, seq_axis, head_axes, None)
    if qs is None:
        return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=attend is None)(q, k, v)
    seg_spec = P(batch_axes, seq_axis)

    def packed(q, k, v, qs, ks):
        return fn(q, k, v, q_segment_ids=qs, kv_segment_ids=ks)
    return jax.shard_map(packed, mesh=mesh, in_specs=(spec, spec, spec, seg_spec, seg_spec),
                         out_specs=spec, check_vma=attend is None)(q, k, v, qs, ks)
