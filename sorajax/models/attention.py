"""Attention kernels behind one function, selected by backend name.

Layout is (B, N, heads, head_dim) for q, k and v (the layout jax.nn.dot_product_attention and
cuDNN want, so no transposes). Backends:
  "xla"    plain XLA einsum-softmax-einsum (every platform, any dtype; the parity reference)
  "cudnn"  cuDNN fused flash attention (NVIDIA GPUs, bf16/fp16); falls back to "xla" with a
           one-time warning where it is unavailable (CPU, TPU, f32, unsupported head_dim)
  "auto"   let JAX pick (implementation=None)
Context-parallel variants (ring / all-to-all) will be added here as further backends.
"""
from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)

BACKENDS = ("xla", "cudnn", "auto")
_warned: set[str] = set()


def _warn_once(key: str, msg: str):
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def dot_product_attention(q, k, v, *, backend: str = "xla", mask=None, scale: float | None = None):
    """Softmax attention. q: (B, Nq, H, D), k/v: (B, Nk, H, D) -> (B, Nq, H, D).

    mask: optional bool array broadcastable to (B, H, Nq, Nk); True = attend.
    scale: logits scale, default 1/sqrt(D).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    impl = {"xla": "xla", "cudnn": "cudnn", "auto": None}[backend]
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
        except Exception as e:  # noqa: BLE001 - any refusal (platform, dtype, shape) means fall back
            _warn_once(f"cudnn:{type(e).__name__}",
                       f"cudnn attention unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       "falling back to xla")
            impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
