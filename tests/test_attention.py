"""Attention backends behind sorajax.models.attention: they agree with plain softmax attention,
and a backend the platform cannot run (splash off TPU, cudnn off GPU or in f32) falls back to
"flash" with one warning that names the fallback (the documented behaviour, docs/SCALING.md)."""
import functools
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sorajax.models import attention


def qkv(nq=5, nk=7, seed=0):
    """q (2, nq, 2, 8), k/v (2, nk, 2, 8) f32."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, nq, 2, 8), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((2, nk, 2, 8), np.float32)) for _ in range(2))
    return q, k, v


def reference(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bqhk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bqhk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("backend", ["xla", "flash", "auto"])
def test_backends_agree(backend):
    q, k, v = qkv()
    out = attention.dot_product_attention(q, k, v, backend=backend)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, jnp.float32)
    chex.assert_trees_all_close(out, reference(q, k, v), atol=1e-5, rtol=0)


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
        attention.dot_product_attention(q, k, v, backend="flash9")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fallback is what CPUs run")
@pytest.mark.parametrize("entry", ["dot_product_attention", "self_attention"])
@pytest.mark.parametrize("backend", ["splash", "cudnn"])
def test_unavailable_backend_warns_once_and_falls_back_to_flash(backend, entry, caplog, monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())  # the warning is once per process
    fn = getattr(attention, entry)
    q, k, v = qkv(nq=6, nk=6)  # self-attention: as many keys as queries
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        out = fn(q, k, v, backend=backend)
        again = fn(q, k, v, backend=backend)
    msgs = [r.getMessage() for r in caplog.records if r.name == attention.__name__]
    assert len(msgs) == 1, msgs  # one warning, not one per call
    assert f"'{backend}'" in msgs[0] and "running on cpu" in msgs[0], msgs[0]  # what and why
    assert f"falling back to '{attention.FALLBACK}'" in msgs[0] and attention.FALLBACK == "flash", msgs[0]
    for other in ("flash", "xla"):
        chex.assert_trees_all_close(out, fn(q, k, v, backend=other), atol=1e-5, rtol=0)
    chex.assert_trees_all_equal(out, again)


# ----------------------------------------------------------------------------------------------
# Packed sequences (NaViT): segment ids, a query attends to the keys of its own id only.
# ----------------------------------------------------------------------------------------------
def packed_ids(packings, n, pad=0):
    """(B, n) int32 numpy: row b holds the clips (id, length) of packings[b] in order, then `pad`."""
    ids = np.full((len(packings), n), pad, np.int32)
    for b, clips in enumerate(packings):
        at = 0
        for i, length in clips:
            ids[b, at:at + length] = i
            at += length
    return ids


def runs(ids):
    """[(id, start, stop)] of the runs of equal ids in a 1-D numpy array."""
    edges = np.flatnonzero(np.diff(ids)) + 1
    return [(int(ids[a]), int(a), int(z)) for a, z in zip(np.r_[0, edges], np.r_[edges, len(ids)])]


def per_clip(q, k, v, q_ids, kv_ids):
    """Reference: every clip (a run of one nonzero id in q_ids) attended alone, plain softmax
    over the run of its id in kv_ids; 0 at padding queries (id 0) and at queries whose id no key
    has. Static slices, no masks."""
    rows = []
    for b in range(q.shape[0]):
        keys = {i: (a, z) for i, a, z in runs(kv_ids[b])}
        pieces = []
        for i, a, z in runs(q_ids[b]):
            if i == 0 or i not in keys:
                pieces.append(jnp.zeros_like(q[b:b + 1, a:z]))
            else:
                ka, kz = keys[i]
                pieces.append(reference(q[b:b + 1, a:z], k[b:b + 1, ka:kz], v[b:b + 1, ka:kz]))
        rows.append(jnp.concatenate(pieces, axis=1))
    return jnp.concatenate(rows)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _per_clip_out_and_grads(q, k, v, w, q_ids, kv_ids):
    """per_clip and its d/d(q, k, v) for cotangent w; ids as static tuples (one compile per
    packing and shape, shared by the parametrized tests)."""
    out, vjp = jax.vjp(lambda q, k, v: per_clip(q, k, v, np.array(q_ids), np.array(kv_ids)), q, k, v)
    return out, vjp(w)


def packed_vs_per_clip(attn, q, k, v, q_ids, kv_ids, seed=1, padding_grads=False):
    """(output error on real queries, errors of d/d(q, k, v)) of attn(q, k, v, ids...) vs
    per_clip, for the loss sum(out * w) with a random w that is 0 at padding queries (id 0),
    and whether the whole output (and with `padding_grads` the gradients of sum(out), padding
    queries included: a second backward pass) is finite."""
    real = (q_ids != 0)[..., None, None]
    w = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape, np.float32) * real)
    qs, ks = jnp.asarray(q_ids), jnp.asarray(kv_ids)

    @jax.jit
    def f(q, k, v, w):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, q_segment_ids=qs, kv_segment_ids=ks), q, k, v)
        more = vjp(jnp.ones_like(out)) if padding_grads else ()
        finite = jnp.all(jnp.array([jnp.isfinite(x).all() for x in (out, *more)]))
        return out, vjp(w), finite

    out, grads, finite = f(q, k, v, w)
    static_ids = (tuple(map(tuple, x.tolist())) for x in (q_ids, kv_ids))
    ref, ref_grads = _per_clip_out_and_grads(q, k, v, w, *static_ids)
    err = float(np.max(np.abs(np.where(real, out - ref, 0))))
    return err, [float(np.max(np.abs(a - b))) for a, b in zip(grads, ref_grads)], bool(finite)


def qkv4(nq, nk, seed=0):
    """q (2, nq, 4, 8), k/v (2, nk, 4, 8) f32."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((2, nq, 4, 8), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((2, nk, 4, 8), np.float32)) for _ in range(2))
    return q, k, v


# Two rows packed differently: clips A, B then padding (id 0); ids are arbitrary and reused.
SELF_PACKINGS = [[(1, 5), (2, 9)], [(2, 10), (7, 3)]]  # 16 tokens: 2 and 3 padding


@pytest.mark.parametrize("backend", ["xla", "flash", "auto", "cudnn", "splash"])
def test_packed_self_attention_matches_per_clip(backend, caplog, monkeypatch):
    """Every backend (auto/cudnn/splash: their CPU fallbacks) attends within each clip only,
    forward and gradients; "auto" (no segment ids in jax.nn.dot_product_attention) says so."""
    monkeypatch.setattr(attention, "_warned", set())
    ids = packed_ids(SELF_PACKINGS, 16)
    q, k, v = qkv4(16, 16)
    attn = functools.partial(attention.self_attention, backend=backend)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        err, grad_errs, finite = packed_vs_per_clip(attn, q, k, v, ids, ids)
    assert max(err, *grad_errs) < 1e-5 and finite, (err, grad_errs)
    if backend == "auto":
        msgs = [r.getMessage() for r in caplog.records if r.name == attention.__name__]
        assert len(msgs) == 1 and "segment ids" in msgs[0] and "falling back to 'flash'" in msgs[0], msgs


def test_flash_packed_gradients_across_blocks():
    """Blocks of 8 over 22 tokens (padded to 24): clips straddle blocks, whole k blocks are
    masked for some queries, and the sequence padding mask combines with the segment mask."""
    from sorajax.models.context_parallel import flash_attention

    ids = packed_ids([[(1, 5), (2, 13)], [(3, 11), (1, 7)]], 22)
    q, k, v = qkv4(22, 22, seed=2)
    attn = functools.partial(flash_attention, block_q=8, block_k=8)
    err, grad_errs, finite = packed_vs_per_clip(attn, q, k, v, ids, ids)
    assert max(err, *grad_errs) < 1e-5 and finite, (err, grad_errs)


@pytest.mark.parametrize("kernel", ["xla", "flash_blocks4"])
def test_packed_cross_attention_matches_per_clip(kernel):
    """Video tokens of two clips (then padding, id 0) against their two captions concatenated
    (then text padding, id -1): each clip sees its own caption only. Padding queries match no
    key at all: finite outputs and gradients (their values are unspecified)."""
    from sorajax.models.context_parallel import flash_attention

    q_ids = packed_ids([[(1, 6), (2, 7)], [(5, 10), (6, 4)]], 16)
    kv_ids = packed_ids([[(1, 4), (2, 5)], [(5, 9), (6, 3)]], 12, pad=-1)
    q, _, _ = qkv4(16, 12, seed=3)
    _, k, v = qkv4(16, 12, seed=4)
    attn = (functools.partial(flash_attention, block_q=8, block_k=4) if kernel == "flash_blocks4"
            else functools.partial(attention.dot_product_attention, backend=kernel))
    err, grad_errs, finite = packed_vs_per_clip(attn, q, k, v, q_ids, kv_ids, padding_grads=True)
    assert max(err, *grad_errs) < 1e-5, (err, grad_errs)
    assert finite  # the padding queries' outputs and what their cotangent 1 adds to the gradients


def test_mask_and_segment_ids_combine():
    """dot_product_attention's `mask` and segment ids both apply: masking key 0 out equals giving
    it an id no query has (and differs from the segment ids alone)."""
    ids = packed_ids(SELF_PACKINGS, 16)
    other = ids.copy()
    other[:, 0] = 99
    q, k, v = qkv4(16, 16)
    mask = jnp.asarray(np.arange(16) != 0)[None, None, None, :]  # (1, 1, 1, Nk)

    @jax.jit
    def f(q, k, v):
        return (attention.dot_product_attention(q, k, v, mask=mask, q_segment_ids=ids, kv_segment_ids=ids),
                attention.dot_product_attention(q, k, v, q_segment_ids=ids, kv_segment_ids=other),
                attention.dot_product_attention(q, k, v, q_segment_ids=ids, kv_segment_ids=ids))

    both, want, segments_only = f(q, k, v)
    chex.assert_trees_all_close(both, want, atol=1e-6, rtol=0)
    assert float(jnp.max(jnp.abs(both - segments_only))) > 1e-2


def test_segment_ids_go_together():
    q, k, v = qkv4(16, 16)
    ids = jnp.zeros((2, 16), jnp.int32)
    with pytest.raises(ValueError, match="give both or neither"):
        attention.dot_product_attention(q, k, v, q_segment_ids=ids)
    with pytest.raises(ValueError, match="give both or neither"):
        attention.self_attention(q, k, v, kv_segment_ids=ids)  # q's ids stand in for kv's, not back
