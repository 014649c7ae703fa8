"""Attention backends behind sorajax.models.attention: they agree with plain softmax attention,
and a backend the platform cannot run (splash off TPU, cudnn off GPU or in f32) falls back to
"flash" with one warning that names the fallback (the documented behaviour, docs/SCALING.md)."""
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
