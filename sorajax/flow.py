"""Rectified flow: pure functions for timesteps, shift, noising, targets and the loss.

Convention (Wan / SD3): sigma in [0, 1]; x_sigma = (1 - sigma) * x0 + sigma * noise; the model
predicts the velocity v = noise - x0 and sees the timestep t = 1000 * sigma. Sampling integrates
dx/dsigma = v from sigma = 1 (noise) to 0 (data).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma, shift: float):
    """Time shift sigma' = s*sigma / (1 + (s-1)*sigma): s > 1 spends more time at high noise,
    which larger (more redundant) token counts need."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def shift_for_tokens(num_tokens: int, base_tokens: int = 256, base_shift: float = 1.0) -> float:
    """Resolution/length-aware shift: grows with sqrt(tokens / base_tokens) (SD3 heuristic,
    since the signal-to-noise ratio of a fixed noise level rises with the token count)."""
    return base_shift * math.sqrt(max(num_tokens, 1) / base_tokens)


def sample_sigmas(key, shape, *, logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0):
    """Logit-normal training noise levels, then shifted."""
    u = logit_mean + logit_std * jax.random.normal(key, shape)
    return shift_sigma(jax.nn.sigmoid(u), shift)


def add_noise(x0, noise, sigma):
    """x_sigma for a sigma broadcast from the left: (B,) or (B, T) against (B, T, H, W, C)."""
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0, noise):
    return noise - x0


def motion_weight(x0, strength: float):
    """Loss weights (B, t, h, w, 1) for latents x0 (B, t, h, w, z): 1 + strength * m, where m is
    how much each latent position changes to the adjacent latent frame (channel-mean absolute
    difference; frame 0 takes frame 1's), scaled to mean 1 over each clip. Moving objects are a
    few percent of the positions; this makes their motion, not the static background, what
    the loss is mostly about. A still clip (or a 1-frame one) gets weight 1 everywhere."""
    x = x0.astype(jnp.float32)
    if x.shape[1] < 2:
        return jnp.ones(x.shape[:-1] + (1,), jnp.float32)
    d = jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1]), axis=-1, keepdims=True)  # (B, t-1, h, w, 1)
    m = jnp.concatenate([d[:, :1], d], axis=1)  # (B, t, h, w, 1)
    m = m / jnp.maximum(jnp.mean(m, axis=(1, 2, 3, 4), keepdims=True), 1e-6)
    return jax.lax.stop_gradient(1.0 + strength * m)


def flow_loss(v_pred, v_target, weight=None):
    """Mean squared velocity error; `weight` (broadcastable) masks out clean/conditioning frames."""
    err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
    if weight is None:
        return jnp.mean(err)
    w = jnp.broadcast_to(weight, err.shape).astype(jnp.float32)
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


def flow_match_sigmas(steps: int, shift: float) -> np.ndarray:
    """Inference noise levels, steps + 1 values from ~1 to 0, exactly as diffusers'
    FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps) computes them (static
    shift, default sigma bounds). Returned as float32 like the reference."""
    n = NUM_TRAIN_TIMESTEPS
    train_t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    train_s = shift_sigma(train_t / n, shift)
    sigma_max, sigma_min = float(train_s[0]), float(train_s[-1])
    t = np.linspace(sigma_max * n, sigma_min * n, steps, dtype=np.float64)
    s = (t / n).astype(np.float32)
    s = shift_sigma(s, shift).astype(np.float32)
    return np.concatenate([s, np.zeros(1, np.float32)])
