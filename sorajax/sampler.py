"""Jitted sampling: the whole denoising loop (and the VAE decode) is one compiled program.

No host round-trips per step: the noise levels are an array argument and the loop is a
lax.fori_loop, so one compile serves every seed, prompt, guidance scale and shift of a shape.
Solvers: euler (first order; diffusers' FlowMatchEulerDiscreteScheduler), heun (second order, two
model calls per step), unipc (UniPC bh2 order-2 multistep predictor-corrector, one model call per
step; diffusers' UniPCMultistepScheduler as Wan 2.1 configures it, with its own noise levels).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import conditioning, flow, sharding

SOLVERS = ("euler", "heun", "unipc")

# Incremented each time a sampling program is traced: tests pin "compiles once per shape".
TRACE_COUNT = {"sample": 0}


def _cfg_velocity(model, x, sigma, text_kv, guidance, use_cfg: bool, cond=None, cache=None, threshold=None,
                  start=None):
    """Classifier-free guidance: v = v_neg + g (v_pos - v_neg), both in one batched call.
    `text_kv`: the DiT's cross-attention keys/values of the prompts (then, with CFG, of the
    negative prompts), computed once per sample (VideoModel.text_kv).

    `cond` = (latents (B, t, h, w, z), frame mask (B, t) bool, tokens per latent frame): the
    masked latent frames are conditioning: the model sees them clean, at noise level 0 (per-token
    timesteps, as the DiT stage trains them with dit_train.cond_rates), and their velocity is 0,
    so every solver keeps them exactly where they started.

    `cache` (VideoModel.init_step_cache, with `threshold`): the step cache -- returns (v, cache).
    `start` (B,) bool: the windows begin at their clips' first latent (DiTConfig.start_embedding)."""
    b = x.shape[0]
    if cond is None:
        sig = jnp.full((b,), sigma, x.dtype)
    else:
        c_lat, c_mask, per_frame = cond
        fm = c_mask[:, :, None, None, None]
        x = jnp.where(fm, c_lat, x)
        # (B, 2) levels (sigma, 0) and each token's (B, N): conditioning.token_levels
        sig = conditioning.token_levels(jnp.full((b,), sigma, x.dtype), c_mask, per_frame)
    if use_cfg:  # (2B, t, h, w, z)
        x = jnp.concatenate([x, x], axis=0)
        sig = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=0), sig)
        start = None if start is None else jnp.concatenate([start, start], axis=0)
    if cache is None:
        v = model.velocity(x, sig, None, text_kv=text_kv, start=start)
    else:
        v, cache = model.velocity_cached(x, sig, text_kv, cache, threshold, start=start)
    if use_cfg:
        v_pos, v_neg = v[:b], v[b:]
        v = v_neg + guidance * (v_pos - v_neg)
    if cond is not None:
        v = jnp.where(fm, jnp.zeros_like(v), v)
    return v if cache is None else (v, cache)


# Solvers take vel(x, s) -> v, or with `state` a stateful vel(x, s, state) -> (v, state) (the step
# cache), and return the final x (and the final state when given one).
def _stateful(vel, state):
    if state is None:
        return (lambda x, s, st: (vel(x, s), st)), jnp.zeros((), jnp.int32)
    return vel, state


def _euler(vel, x, sigmas, state=None):
    f, st0 = _stateful(vel, state)

    def body(i, carry):
        x, st = carry
        s, s_next = sigmas[i], sigmas[i + 1]
        v, st = f(x, s, st)
        return x + (s_next - s) * v, st

    x, st = jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, (x, st0))
    return x if state is None else (x, st)


def _heun(vel, x, sigmas, state=None):
    f, st0 = _stateful(vel, state)

    def body(i, carry):
        x, st = carry
        s, s_next = sigmas[i], sigmas[i + 1]
        v1, st = f(x, s, st)
        x_e = x + (s_next - s) * v1
        # Second-order correction, except on the final step to sigma = 0 (as in EDM/k-diffusion).
        v2, st = jax.lax.cond(s_next > 0, lambda: f(x_e, s_next, st), lambda: (v1, st))
        return x + (s_next - s) * 0.5 * (v1 + v2), st

    x, st = jax.lax.fori_loop(0, sigmas.shape[0] - 1, body, (x, st0))
    return x if state is None else (x, st)


def _unipc_bh2_coeffs(lam_t, lam_s0, lam_s1):
    """UniPC B(h) coefficients (bh2, data prediction, order <= 2) for a step from lambda_s0 to
    lambda_t, with lambda_s1 the point before s0 (used by second-order terms).

    As in diffusers: hh = -h, h*phi_1 = e^hh - 1, B(h) = e^hh - 1, b_k = k! h*phi_{k+1} / B(h),
    r = (lambda_s1 - lambda_s0) / h. Returns (h_phi_1, B_h, r, rho_c0, rho_c1) where (rho_c0,
    rho_c1) solve [[1, 1], [r, 1]] rho = (b_1, b_2) (the order-2 corrector). Finite also for
    lambda = +-inf (sigma 0 or 1): then h_phi_1 = B_h = -1 and the second-order terms vanish."""
    h = lam_t - lam_s0
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    b_h = h_phi_1  # bh2
    h_phi_k1 = h_phi_1 / hh - 1.0
    h_phi_k2 = h_phi_k1 / hh - 0.5
    b1 = h_phi_k1 / b_h
    b2 = h_phi_k2 * 2.0 / b_h
    r = (lam_s1 - lam_s0) / h
    rho_c0 = (b1 - b2) / (1.0 - r)
    rho_c1 = b1 - rho_c0
    return h_phi_1, b_h, r, rho_c0, rho_c1


def _unipc(vel, x, sigmas, state=None):
    """UniPC multistep (Zhao et al. 2023): order-2 UniP predictor + UniC corrector, B(h) = bh2,
    data (x0) prediction, for flow matching -- diffusers' UniPCMultistepScheduler(
    prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2, solver_type="bh2",
    predict_x0=True, lower_order_final=True, disable_corrector=[]), as Wan 2.1 samples.

    Flow sigmas: alpha = 1 - sigma, lambda = log(alpha) - log(sigma) (+inf at sigma = 0); the
    model's x0 = x - sigma v. Step i (0-based, n steps), with m_i the x0 at the predicted x_i:
      corrector (i >= 1; order of step i-1): x_i <- UniC(x_{i-1} (corrected), m_{i-1}, m_i[, m_{i-2}])
      predictor, order p_i = min(2, n - i, i + 1) (first and last steps first order):
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h}-1) m_i
                  - alpha_{i+1} B(h) 0.5 (m_{i-1} - m_i) / r          (second order only)
    The model output at the predicted (uncorrected) x_i is reused by the corrector, so the cost
    is one model call per step; no corrector follows the last step, whose output (sigma = 0) is
    m_{n-1}. Everything stays on device: coefficients are array ops in sigmas' dtype, the
    lower-order steps are selected with jnp.where (the unselected branch may hold inf/NaN on
    the first/last step and is discarded).
    """
    f, st0 = _stateful(vel, state)
    n = sigmas.shape[0] - 1
    alphas = 1.0 - sigmas
    lams = jnp.log(alphas) - jnp.log(sigmas)  # +inf at sigma = 0, -inf at sigma = 1
    dtype = x.dtype

    def at(a, j):
        return a[jnp.clip(j, 0, n)]

    def body(i, carry):
        x, x_last, m1, m2, st = carry  # x_i (predicted), x_{i-1} (corrected), m_{i-1}, m_{i-2}
        s0 = sigmas[i]
        v, st = f(x, s0, st)
        m = (x - s0 * v).astype(dtype)  # x0 prediction at (x_i, sigma_i)

        # UniC corrector from sigma_{i-1} to sigma_i, order of the previous step (2 iff i >= 2).
        h_phi_1, b_h, r, rho0, rho1 = _unipc_bh2_coeffs(lams[i], at(lams, i - 1), at(lams, i - 2))
        c_ord2 = i >= 2
        d1 = (m2 - m1) / jnp.where(c_ord2, r, 1.0)
        corr = jnp.where(c_ord2, rho0 * d1 + rho1 * (m - m1), 0.5 * (m - m1))
        a_t = alphas[i]
        x_c = (s0 / at(sigmas, i - 1)) * x_last - (a_t * h_phi_1) * m1 - (a_t * b_h) * corr
        sample = jnp.where(i >= 1, x_c.astype(dtype), x)

        # UniP predictor from sigma_i to sigma_{i+1}.
        s_t, a_t = sigmas[i + 1], alphas[i + 1]
        h_phi_1, b_h, r, _, _ = _unipc_bh2_coeffs(lams[i + 1], lams[i], at(lams, i - 1))
        p_ord2 = (i >= 1) & (i <= n - 2)
        d1 = (m1 - m) / jnp.where(p_ord2, r, 1.0)
        x_p = (s_t / s0) * sample - (a_t * h_phi_1) * m
        x_p = jnp.where(p_ord2, x_p - (a_t * b_h) * (0.5 * d1), x_p)
        return x_p.astype(dtype), sample, m, m1, st

    zeros = jnp.zeros_like(x)
    x, _, _, _, st = jax.lax.fori_loop(0, n, body, (x, x, zeros, zeros, st0))
    return x if state is None else (x, st)


_SOLVER_FNS = {"euler": _euler, "heun": _heun, "unipc": _unipc}


def _unipc_sigmas64(steps: int, shift: float) -> np.ndarray:
    n = flow.NUM_TRAIN_TIMESTEPS
    s = np.linspace(1.0, 1.0 / n, int(steps) + 1)[:-1]  # float64, as the reference
    s = shift * s / (1.0 + (shift - 1.0) * s)
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    return s


def unipc_sigmas(steps: int, shift: float) -> np.ndarray:
    """Noise levels of diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift,
    final_sigmas_type="zero").set_timesteps(steps): steps + 1 float32 values,
    shift(linspace(1, 1/1000, steps + 1)[:-1]) with the first lowered by 1e-6 (so log(1 - sigma)
    stays finite), then 0. Not flow.flow_match_sigmas (FlowMatchEulerDiscreteScheduler), whose
    grid ends at shift(1/1000) and starts at exactly 1."""
    return np.concatenate([_unipc_sigmas64(steps, shift), [0.0]]).astype(np.float32)


def unipc_timesteps(steps: int, shift: float) -> np.ndarray:
    """The integer timesteps that scheduler hands the model (WanPipeline passes them to the DiT):
    trunc(1000 * sigma) of the float64 sigmas, before the float32 cast; `steps` int64 values."""
    return (_unipc_sigmas64(steps, shift) * flow.NUM_TRAIN_TIMESTEPS).astype(np.int64)


def schedule(solver: str, steps: int, shift: float):
    """(sigmas, model_sigmas): the solver's steps + 1 noise levels and, aligned with them, the
    noise level the model is told (its timestep / 1000). For euler/heun both are
    flow.flow_match_sigmas; for unipc the sigmas are unipc_sigmas and the model sees the
    truncated integer timesteps, as diffusers' WanPipeline calls the DiT with UniPC (its
    scheduler.timesteps are int64)."""
    if solver == "unipc":
        sig = unipc_sigmas(steps, shift)
        t = unipc_timesteps(steps, shift).astype(np.float32) / flow.NUM_TRAIN_TIMESTEPS
        return sig, np.concatenate([t, [0.0]]).astype(np.float32)
    sig = flow.flow_match_sigmas(int(steps), float(shift))
    return sig, sig


def model_sigma_lookup(sigmas, model_sigmas):
    """s -> the model noise level aligned with s in `sigmas` (s is always one of them: solvers
    call vel(x, sigmas[i])). A nearest-value lookup keeps the solvers' vel(x, s) interface and
    stays on device."""
    return lambda s: model_sigmas[jnp.argmin(jnp.abs(sigmas - s))]


def tail_schedule(solver: str, steps: int, shift: float, strength: float):
    """(sigmas, model_sigmas) of `steps` steps that start at a noise level <= `strength` (SDEdit,
    video-to-video): the last steps + 1 levels of the solver's schedule over round(steps /
    strength) steps, so the step count (and the compiled program) stays `steps`. strength 1 is
    the full schedule."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength {strength} must be in (0, 1]")
    total = max(int(steps), int(round(steps / strength)))
    sig, msig = schedule(solver, total, shift)
    while total > steps and sig[total - steps] > strength + 1e-6:  # rounding: start at or below it
        total += 1
        sig, msig = schedule(solver, total, shift)
    return sig[total - steps:], msig[total - steps:]


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, solver: str, use_cfg: bool, decode: bool, mesh=None, rules=None,
              conditioned: bool = False, from_latents: bool = False, step_cache: bool = False):
    def run(*args):
        if mesh is None:
            return _run(*args)
        with sharding.activation_rules(mesh, rules):  # sequence-sharded DiT / VAE activations
            return _run(*args)

    def _run(state, noise, ids, mask, neg_ids, neg_mask, sigmas, model_sigmas, guidance, cond_latents,
             cond_mask, init_latents, cache_threshold, start):
        TRACE_COUNT["sample"] += 1
        model = nnx.merge(graphdef, state)
        ctx = model.encode_text(ids, mask)  # (B, L, D)
        if use_cfg:  # (2B, L, D): the conditional and unconditional halves of one batched call
            ctx = jnp.concatenate([ctx, model.encode_text(neg_ids, neg_mask)], axis=0)
        # The text's cross-attention keys/values, once per sample (not per denoising step).
        kv = model.text_kv(ctx)
        x = noise
        if from_latents:  # SDEdit: the given latents noised to the schedule's first level
            x = (1.0 - sigmas[0]) * init_latents + sigmas[0] * noise
        cond = None
        if conditioned:
            _, ph, pw = model.dit.cfg.patch_size  # temporal patch 1 (Pipeline checks it)
            per_frame = (x.shape[2] // ph) * (x.shape[3] // pw)
            cond_mask = cond_mask.astype(bool)
            cond = (cond_latents.astype(x.dtype), cond_mask, per_frame)
            x = jnp.where(cond_mask[:, :, None, None, None], cond[0], x)
        t_of = model_sigma_lookup(sigmas, model_sigmas) if solver == "unipc" else (lambda s: s)
        if step_cache:
            cache0 = model.init_step_cache(x.shape[0] * (2 if use_cfg else 1), x.shape[1:])
            vel = lambda x, s, c: _cfg_velocity(model, x, t_of(s), kv, guidance, use_cfg, cond, c, cache_threshold,
                                                start)
            latents, cache = _SOLVER_FNS[solver](vel, x, sigmas, cache0)  # (B, t, h, w, z)
            runs = cache[-1]
        else:
            vel = lambda x, s: _cfg_velocity(model, x, t_of(s), kv, guidance, use_cfg, cond, start=start)
            latents = _SOLVER_FNS[solver](vel, x, sigmas)  # (B, t, h, w, z)
            runs = jnp.int32(-1)
        if conditioned:  # exactly the given latents (UniPC's arithmetic keeps them to rounding)
            latents = jnp.where(cond[1][:, :, None, None, None], cond[0], latents)
        if not decode:
            return latents, None, runs
        frames = model.decode_latents(latents)  # (B, T, H, W, 3) in [-1, 1]
        return latents, jnp.clip((frames + 1.0) * 0.5, 0.0, 1.0), runs

    return jax.jit(run)


def sample(graphdef, state, noise, ids, mask, neg_ids, neg_mask, *, steps: int, shift: float,
           guidance: float, solver: str = "euler", decode: bool = True, mesh=None, rules=None,
           cond_latents=None, cond_mask=None, init_latents=None, strength: float = 1.0,
           step_cache: float = 0.0, stats: bool = False, start=None):
    """Runs the compiled sampler. Returns (latents, frames in [0, 1] or None). With `mesh` (and
    the config's sharding `rules`), activations follow the rules: context-parallel attention and
    the row-sharded VAE when the mesh has a context axis.

    Guidance g: v = v_neg + g (v_pos - v_neg) with the negative prompt (neg_ids, neg_mask); g = 1
    (or None) is the conditional prediction alone (one model call, no negative prompt), g = 0 the
    unconditional (negative-prompt) prediction.

    Conditioning (image-to-video, extension, connect, keyframes, long rollouts): `cond_latents`
    (B, t, h, w, z) and `cond_mask` (B, t) -- the masked latent frames are given and kept; the rest
    is generated around them. One compiled program serves every mask of a shape.
    Video-to-video (SDEdit): `init_latents` (B, t, h, w, z) noised to the first level of
    tail_schedule(strength), then denoised in `steps` steps.

    `step_cache` > 0: the step cache (VideoModel.velocity_cached) with that threshold; with
    `stats` the result has a third item, {"block_runs": model calls that ran the blocks,
    "model_calls": all model calls} (block_runs None without the cache).

    `start` (B,) bool (default all True): each window begins at its clip's first latent frame
    (text/image-to-video), or was cut mid-clip (extension, long videos: sorajax/modes.py); read
    by DiTs with start_embedding."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known: {SOLVERS}")
    if init_latents is not None:
        sigmas, model_sigmas = tail_schedule(solver, int(steps), float(shift), float(strength))
    else:
        sigmas, model_sigmas = schedule(solver, int(steps), float(shift))
    g = 1.0 if guidance is None else float(guidance)
    use_cfg = g != 1.0
    if mesh is not None:
        rules = sharding.normalize_rules(rules)
    conditioned = cond_mask is not None
    if not step_cache >= 0:
        raise ValueError(f"step_cache {step_cache} must be >= 0 (0 = off)")
    fn = _compiled(graphdef, solver, use_cfg, decode, mesh, rules, conditioned, init_latents is not None,
                   step_cache > 0)
    empty = jnp.zeros((), jnp.float32)
    latents, frames, runs = fn(
        state, noise, ids, mask, neg_ids, neg_mask, jnp.asarray(sigmas), jnp.asarray(model_sigmas),
        jnp.float32(g), empty if cond_latents is None else jnp.asarray(cond_latents, jnp.float32),
        empty if cond_mask is None else jnp.asarray(cond_mask, bool),
        empty if init_latents is None else jnp.asarray(init_latents, jnp.float32), jnp.float32(step_cache),
        jnp.ones((noise.shape[0],), bool) if start is None else jnp.asarray(start, bool))
    if not stats:
        return latents, frames
    calls = (2 * int(steps) - 1) if solver == "heun" else int(steps)
    return latents, frames, {"block_runs": int(runs) if step_cache > 0 else None, "model_calls": calls}

