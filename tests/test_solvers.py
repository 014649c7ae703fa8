"""ODE solvers of sorajax/sampler.py: parity with diffusers' schedulers, order of accuracy on an
ODE with a closed-form solution, and the guidance scale in sampler.sample.

Fixture: tests/fixtures/solver_trajectories.npz (scripts/make_solver_fixtures.py): diffusers'
UniPCMultistepScheduler (Wan 2.1 config) and FlowMatchEulerDiscreteScheduler run on a
closed-form velocity field (a two-Gaussian mixture), every step's state recorded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sorajax  # noqa: F401
from sorajax import flow, sampler
from tests.helpers import FIXTURES, tiny_text_dit

REF = dict(np.load(FIXTURES / "solver_trajectories.npz"))
CONFIGS = sorted({k.split("_", 1)[1].rsplit("_", 1)[0] for k in REF if k.startswith("unipc_")})


def _mixture_velocity(x, s):
    """The fixture's field: exact velocity of the data 0.5 N(-MU, A^2) + 0.5 N(MU, A^2)."""
    mu, a = float(REF["mu"]), float(REF["a"])
    var = ((1 - s) * a) ** 2 + s**2
    c = (1 - s) * a * a / var
    e = c * x + mu * (1 - c * (1 - s)) * jnp.tanh((1 - s) * mu * x / var)
    return (x - e) / s


def _run_recording(solver_fn, vel, x, sigmas):
    """(final state, [every state the model was called at]) from one jitted solver run; the
    states come back through an ordered debug callback (tests only)."""
    seen = []

    def recording_vel(x, s):
        jax.debug.callback(lambda a: seen.append(np.asarray(a)), x, ordered=True)
        return vel(x, s)

    out = jax.jit(lambda x, sig: solver_fn(recording_vel, x, sig))(x, sigmas)
    out = np.asarray(jax.block_until_ready(out))
    jax.effects_barrier()
    return out, seen


# ---------------------------------------------------------------- parity with diffusers


def test_fixture_covers_configs():
    assert {"1_3.0", "2_2.0", "4_3.0", "10_5.0", "25_1.0"} <= set(CONFIGS)


@pytest.mark.parametrize("key", CONFIGS)
def test_schedules_equal_diffusers(key):
    steps, shift = int(key.split("_")[0]), float(key.split("_")[1])
    sig, model_sig = sampler.schedule("unipc", steps, shift)
    np.testing.assert_allclose(sig, REF[f"unipc_{key}_sigmas"], rtol=0, atol=1e-6)
    assert sig.dtype == np.float32 and sig[-1] == 0.0
    np.testing.assert_array_equal(sampler.unipc_timesteps(steps, shift), REF[f"unipc_{key}_timesteps"])
    np.testing.assert_array_equal(model_sig[:-1], REF[f"unipc_{key}_timesteps"].astype(np.float32) / 1000)
    sig, model_sig = sampler.schedule("euler", steps, shift)
    np.testing.assert_allclose(sig, REF[f"euler_{key}_sigmas"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(sig, model_sig)
    if steps > 1:  # the UniPC grid is not the Euler one (which ends at shift(1/1000), not 0)
        assert np.abs(sampler.unipc_sigmas(steps, shift) - flow.flow_match_sigmas(steps, shift)).max() > 1e-3


def _assert_trajectory(out, seen, ref, what):
    steps = ref.shape[0] - 1
    assert len(seen) == steps, what  # one model call per step
    states = np.stack(seen + [out])  # the model sees the state before step i, i = 0..steps-1
    err = np.abs(states - ref).max(axis=tuple(range(1, ref.ndim)))
    assert err.max() <= 1e-4, f"{what}: max abs err per step {err}"
    return float(err.max())


@pytest.mark.parametrize("key", CONFIGS)
def test_unipc_trajectory_equals_diffusers(key):
    """Model told the exact sigma: every state of diffusers' UniPC, step by step."""
    steps, shift = int(key.split("_")[0]), float(key.split("_")[1])
    sig = jnp.asarray(sampler.unipc_sigmas(steps, shift))
    out, seen = _run_recording(sampler._unipc, _mixture_velocity, jnp.asarray(REF["x0"]), sig)
    _assert_trajectory(out, seen, REF[f"unipc_{key}_exact"], f"unipc {key}")


@pytest.mark.parametrize("key", CONFIGS)
def test_unipc_with_pipeline_timesteps_equals_diffusers(key):
    """As sampler.sample wires it: the model is told WanPipeline's integer timestep / 1000."""
    steps, shift = int(key.split("_")[0]), float(key.split("_")[1])
    sig, model_sig = (jnp.asarray(a) for a in sampler.schedule("unipc", steps, shift))
    t_of = sampler.model_sigma_lookup(sig, model_sig)
    vel = lambda x, s: _mixture_velocity(x, t_of(s))
    out, seen = _run_recording(sampler._unipc, vel, jnp.asarray(REF["x0"]), sig)
    _assert_trajectory(out, seen, REF[f"unipc_{key}_pipe"], f"unipc/pipe {key}")
    if steps >= 4:  # the truncated timesteps do change the result (so this test sees them)
        assert np.abs(REF[f"unipc_{key}_pipe"][-1] - REF[f"unipc_{key}_exact"][-1]).max() > 1e-4


@pytest.mark.parametrize("key", CONFIGS)
def test_euler_trajectory_equals_diffusers(key):
    steps, shift = int(key.split("_")[0]), float(key.split("_")[1])
    sig, _ = sampler.schedule("euler", steps, shift)
    out, seen = _run_recording(sampler._euler, _mixture_velocity, jnp.asarray(REF["x0"]), jnp.asarray(sig))
    _assert_trajectory(out, seen, REF[f"euler_{key}_traj"], f"euler {key}")


@pytest.mark.parametrize("solver", sampler.SOLVERS)
def test_solvers_converge_on_a_two_point_flow(solver):
    """Data = +-1 with equal mass: the exact velocity is v(x, s) = (x - E[x0|x]) / s with
    E[x0|x] = tanh(x (1 - s) / s^2). Every solver must reach the sign of the start (on its own
    schedule and, for robustness, on the Euler grid that starts at sigma = 1 exactly)."""
    def vel(x, s):
        s = jnp.maximum(s, 1e-4)
        return (x - jnp.tanh(x * (1 - s) / s**2)) / s

    x = jnp.array([0.3, -0.2, 1.5, -2.0])
    for sig in (sampler.schedule(solver, 12, 1.0)[0], flow.flow_match_sigmas(12, 1.0)):
        out = np.asarray(sampler._SOLVER_FNS[solver](vel, x, jnp.asarray(sig)))
        np.testing.assert_allclose(np.abs(out), 1.0, atol=0.05)
        assert np.array_equal(np.sign(out), np.sign(np.asarray(x)))


# ---------------------------------------------------------------- order of accuracy

MU, A = 0.7, 0.4  # data N(MU, A^2): the flow is affine, its ODE solution closed form


def _gauss_var(s):
    return ((1 - s) * A) ** 2 + s**2


def _gauss_velocity(x, s):
    e = MU + (1 - s) * A * A / _gauss_var(s) * (x - (1 - s) * MU)  # E[x0 | x_s]
    return (x - e) / s


def _gauss_exact(x, s0, s1):
    """x(s1) from x(s0): the flow maps quantile to quantile of N((1 - s) MU, var(s))."""
    return (1 - s1) * MU + np.sqrt(_gauss_var(s1) / _gauss_var(s0)) * (x - (1 - s0) * MU)


S0, S_END = 0.9, 0.1  # away from sigma = 0 and 1: the step to 0 does not decide anything
NS = (16, 32, 64, 128)


def _fitted_order(errs):
    return float(-np.polyfit(np.log2(NS), np.log2(errs), 1)[0])


def _orders(solver):
    """Global error at S_END of `solver` on N uniform steps S0 -> S_END, for N in NS (float64).
    For unipc also the error of the state it calls the model at when sigma reaches S_END with
    one more step (to 0) after it: its last step is first order (lower_order_final), which caps
    the output at order 2, while the states between are UniP-2 + UniC-2 (order 3)."""
    fn = sampler._SOLVER_FNS[solver]
    errs, errs_inner = [], []
    with jax.enable_x64(True):
        x = np.random.default_rng(0).standard_normal(16)
        want = _gauss_exact(x, S0, S_END)
        run = jax.jit(lambda x, sig: fn(_gauss_velocity, x, sig))
        for n in NS:
            sig = np.linspace(S0, S_END, n + 1)
            errs.append(np.abs(np.asarray(run(jnp.asarray(x), jnp.asarray(sig))) - want).max())
            if solver == "unipc":
                _, seen = _run_recording(fn, _gauss_velocity, jnp.asarray(x), jnp.asarray(np.append(sig, 0.0)))
                assert len(seen) == n + 1 and seen[-1].dtype == np.float64
                errs_inner.append(np.abs(seen[-1] - want).max())
    return errs, errs_inner


@pytest.mark.parametrize("solver,band", [("euler", (0.8, 1.3)), ("heun", (1.7, 2.5)), ("unipc", (1.7, 2.5))])
def test_order_of_accuracy(solver, band):
    errs, errs_inner = _orders(solver)
    pairwise = [float(np.log2(a / b)) for a, b in zip(errs[:-1], errs[1:])]
    order = _fitted_order(errs)
    assert band[0] <= order <= band[1], f"{solver}: order {order:.2f} (pairwise {pairwise}, errs {errs})"
    assert all(band[0] - 0.2 <= p <= band[1] + 0.2 for p in pairwise), (solver, pairwise)
    if solver == "unipc":
        inner = _fitted_order(errs_inner)
        assert inner >= 2.5, f"unipc before its last step: order {inner:.2f} (errs {errs_inner})"


# ---------------------------------------------------------------- guidance in sample()


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def tiny_model():
    """A tiny text encoder + DiT in a VideoModel without its VAE (tests.helpers.tiny_text_dit)."""
    graphdef, state, dit_cfg = tiny_text_dit()
    rng = np.random.default_rng(0)
    noise = jnp.asarray(rng.standard_normal((2, 1, 4, 4, dit_cfg.in_channels)), jnp.float32)
    ids = jnp.asarray(rng.integers(2, 64, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
    neg_ids = jnp.asarray(rng.integers(2, 64, (2, 6)), jnp.int32)
    neg_mask = jnp.asarray([[1] * 3 + [0] * 3, [1] * 5 + [0]], jnp.int32)
    return graphdef, state, noise, ids, mask, neg_ids, neg_mask


def test_guidance_zero_is_the_unconditional_prediction(tiny_model):
    gd, st, noise, ids, mask, nids, nmask = tiny_model
    kw = dict(steps=3, shift=3.0, solver="unipc", decode=False)
    g0, _ = sampler.sample(gd, st, noise, ids, mask, nids, nmask, guidance=0.0, **kw)
    neg, _ = sampler.sample(gd, st, noise, nids, nmask, nids, nmask, guidance=1.0, **kw)
    pos, _ = sampler.sample(gd, st, noise, ids, mask, nids, nmask, guidance=1.0, **kw)
    g0, neg, pos = (np.asarray(a) for a in (g0, neg, pos))
    assert np.isfinite(g0).all()
    np.testing.assert_allclose(g0, neg, rtol=0, atol=1e-5)
    assert np.abs(g0 - pos).max() > 1e-2, "the prompt must change the sample for this test to mean anything"
