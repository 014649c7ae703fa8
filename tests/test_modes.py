"""Conditioning for the generation modes: the training masks (sorajax/conditioning.py), the
masked flow loss (stages.conditioned_flow_loss) and the sampler's given frames and SDEdit start
(sorajax/sampler.py). The modes end to end on a trained run: tests/test_cli.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sorajax import conditioning, flow, sampler, stages
from sorajax.models.video import timesteps
from tests.helpers import tiny_text_dit, toy_config


def test_each_mask_kind_gives_its_frames():
    t, key = 5, jax.random.key(0)
    want = {"first": [1, 0, 0, 0, 0], "first_last": [1, 0, 0, 0, 1]}
    for i, kind in enumerate(conditioning.KINDS):
        rates = tuple(1.0 if j == i else 0.0 for j in range(len(conditioning.KINDS)))
        m = np.asarray(conditioning.sample_masks(key, 256, t, rates))
        assert not m.all(axis=1).any()  # something is always generated
        if kind in want:
            assert (m == np.asarray(want[kind], bool)).all(), kind
        elif kind == "first_k":  # a prefix of length 1..t-1, each length seen
            k = m.sum(1)
            assert all((m[j, :k[j]]).all() and not m[j, k[j]:].any() for j in range(256))
            assert set(k) == set(range(1, t))
        elif kind == "last_k":
            k = m.sum(1)
            assert all((m[j, t - k[j]:]).all() and not m[j, :t - k[j]].any() for j in range(256))
            assert set(k) == set(range(1, t))
        else:  # keyframes: independent frames at KEYFRAME_RATE
            assert abs(m.mean() - conditioning.KEYFRAME_RATE) < 0.05
    # Mixed rates: each kind at its rate ("none" the rest); a 1-frame clip (an image) never given.
    m = np.asarray(conditioning.sample_masks(key, 4000, t, (0.3, 0, 0, 0, 0)))
    assert abs(m[:, 0].mean() - 0.3) < 0.03 and not m[:, 1:].any()
    assert not np.asarray(conditioning.sample_masks(key, 64, 1, (0.5, 0.5, 0, 0, 0))).any()


@pytest.fixture(scope="module")
def tiny():
    """A tiny DiT + text encoder (no VAE: the latent-space tests never decode)."""
    graphdef, state, dit_cfg = tiny_text_dit()
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(2, 64, (2, 6)), jnp.int32)
    mask = jnp.ones((2, 6), jnp.int32)
    return graphdef, state, dit_cfg, ids, mask


def test_masked_loss_ignores_the_noise_of_given_frames(tiny):
    """Given frames enter the model clean and leave the loss: d loss / d noise is exactly 0 on
    them and not on the generated frames. With no frame given it is the plain flow loss."""
    graphdef, state, dit_cfg, ids, mask = tiny
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((2, 3, 4, 4, dit_cfg.in_channels)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    sigma = jnp.asarray([0.3, 0.8], jnp.float32)
    fmask = jnp.asarray([[True, False, False], [False, True, True]])

    def loss(nz, fm):
        model = nnx.merge(graphdef, state)
        ctx = model.encode_text(ids, mask)
        return stages.conditioned_flow_loss(model, x0, nz, sigma, fm, ctx, dit_cfg.patch_size)

    g = np.asarray(jax.grad(loss)(noise, fmask))
    per_frame = np.abs(g).reshape(2, 3, -1).max(-1)
    assert (per_frame[np.asarray(fmask)] == 0).all()
    assert (per_frame[~np.asarray(fmask)] > 1e-6).all()

    model = nnx.merge(graphdef, state)
    ctx = model.encode_text(ids, mask)
    plain = flow.flow_loss(model.velocity(flow.add_noise(x0, noise, sigma), sigma, ctx),
                           flow.velocity_target(x0, noise))
    np.testing.assert_allclose(float(loss(noise, jnp.zeros((2, 3), bool))), float(plain), rtol=1e-5)


@pytest.mark.parametrize("solver", sampler.SOLVERS)
def test_sampler_keeps_given_frames_one_program_for_every_mask(tiny, solver):
    graphdef, state, dit_cfg, ids, mask = tiny
    rng = np.random.default_rng(2)
    shape = (2, 3, 4, 4, dit_cfg.in_channels)
    noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    cond = rng.standard_normal(shape).astype(np.float32)
    kw = dict(steps=4, shift=2.0, guidance=2.0, solver=solver, decode=False)
    free, _ = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, **kw)
    before = sampler.TRACE_COUNT["sample"]
    outs = []
    for m in ([[1, 0, 0], [1, 0, 0]], [[0, 0, 1], [1, 0, 1]], [[0, 0, 0], [0, 1, 1]]):
        m = np.asarray(m, bool)
        lat, _ = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, cond_latents=cond, cond_mask=m, **kw)
        lat = np.asarray(lat)
        np.testing.assert_array_equal(lat[m], cond[m])  # given frames kept exactly
        outs.append(lat)
    assert sampler.TRACE_COUNT["sample"] - before == 1  # masks are data: one compile
    # The given frames condition the rest: clip 0's generated frames differ from a free sample.
    assert np.abs(outs[0][0, 1:] - np.asarray(free)[0, 1:]).max() > 1e-3
    # No frame given (clip 0 of the last mask) at per-token noise levels = the free sample.
    np.testing.assert_allclose(outs[2][0], np.asarray(free)[0], atol=1e-4)


def test_sdedit_starts_at_the_strength():
    for solver in sampler.SOLVERS:
        for s in (0.3, 0.7, 1.0):
            sig, msig = sampler.tail_schedule(solver, 10, 3.0, s)
            full, _ = sampler.schedule(solver, 10, 3.0)
            assert len(sig) == len(msig) == 11 and sig[-1] == 0
            assert sig[0] <= s + 1e-6 and (s == 1.0 or sig[0] > s - 0.15), (solver, s, sig[0])
            if s == 1.0:
                np.testing.assert_array_equal(sig, full)
    with pytest.raises(ValueError):
        sampler.tail_schedule("euler", 10, 1.0, 0.0)


def test_sdedit_low_strength_stays_near_the_video(tiny):
    graphdef, state, dit_cfg, ids, mask = tiny
    rng = np.random.default_rng(3)
    shape = (2, 3, 4, 4, dit_cfg.in_channels)
    init = rng.standard_normal(shape).astype(np.float32)
    noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kw = dict(steps=4, shift=1.0, guidance=1.0, solver="euler", decode=False, init_latents=init)
    dist = [float(np.abs(np.asarray(sampler.sample(graphdef, state, noise, ids, mask, ids, mask,
                                                   strength=s, **kw)[0]) - init).mean()) for s in (0.05, 0.5, 1.0)]
    assert dist[0] < 0.1 < dist[1] < dist[2], dist


def test_given_frames_are_seen_clean_at_noise_level_zero(tiny):
    """One Euler step from sigma 1 to 0 is x - v(x): the velocity of the generated frames must be
    the model's at the given frames' clean latents with their tokens at timestep 0."""
    graphdef, state, dit_cfg, ids, mask = tiny
    rng = np.random.default_rng(4)
    shape = (2, 3, 4, 4, dit_cfg.in_channels)
    noise = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    cond = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    m = jnp.asarray([[True, False, False], [False, False, True]])
    lat, _ = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, steps=1, shift=1.0, guidance=1.0,
                            solver="euler", decode=False, cond_latents=cond, cond_mask=m)
    model = nnx.merge(graphdef, state)
    x = jnp.where(m[:, :, None, None, None], cond, noise)
    tok_sigma = conditioning.token_sigmas(jnp.ones((2,)), m, 4)  # 2x2 tokens per frame
    v = model.velocity(x, tok_sigma, model.encode_text(ids, mask))
    gen = ~np.asarray(m)
    np.testing.assert_allclose(np.asarray(lat)[gen], np.asarray(noise - v)[gen], atol=1e-5)
    v_all_noisy = model.velocity(x, jnp.ones((2,)), model.encode_text(ids, mask))
    assert np.abs(np.asarray(noise - v_all_noisy)[gen] - np.asarray(lat)[gen]).max() > 1e-3


def test_seam_continuity_passes_the_truth_and_catches_breaks():
    """mode_eval.seam_continuous on the world's own 17-frame clips split at frame 9: the truth
    continues; the second part reversed in time, or taken from another prompt's clip, does not."""
    from sorajax import mode_eval

    ps = mode_eval.mode_prompts("test")
    gt = mode_eval._truth(ps, 17, 32, 32)
    other = np.roll(gt, 1, axis=0)
    cont = lambda a, b: np.mean([mode_eval.seam_continuous(x, y, p.spec) for x, y, p in zip(a, b, ps)])
    assert cont(gt[:, :9], gt[:, 9:]) == 1.0
    assert cont(gt[:, :9], gt[:, 9:][:, ::-1]) == 0.0
    assert cont(gt[:, :9], other[:, 9:]) == 0.0


def test_step_cache_skips_blocks_and_is_off_at_zero(tiny):
    """The step cache: at threshold 0 it runs the blocks at every model call and equals the
    sampler without it exactly; a large threshold runs them once (the first call) and changes
    the result; a middle one skips some calls; every setting is deterministic."""
    graphdef, state, dit_cfg, ids, mask = tiny
    rng = np.random.default_rng(5)
    noise = jnp.asarray(rng.standard_normal((2, 3, 4, 4, dit_cfg.in_channels)), jnp.float32)
    for solver, calls in (("euler", 8), ("heun", 15), ("unipc", 8)):
        kw = dict(steps=8, shift=2.0, guidance=3.0, solver=solver, decode=False, stats=True)
        off, _, st_off = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, **kw)
        assert st_off == {"block_runs": None, "model_calls": calls}
        zero, _, st0 = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, step_cache=1e-12, **kw)
        np.testing.assert_array_equal(np.asarray(zero), np.asarray(off))
        assert st0["block_runs"] == calls
        big, _, st_big = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, step_cache=1e9, **kw)
        assert st_big["block_runs"] == 1 and np.abs(np.asarray(big) - np.asarray(off)).max() > 1e-3
        runs = []
        for thr in (0.1, 0.3, 1.0, 3.0, 10.0):  # fewer block runs as the threshold grows
            mid, _, st_mid = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, step_cache=thr, **kw)
            runs.append(st_mid["block_runs"])
        again, _, _ = sampler.sample(graphdef, state, noise, ids, mask, ids, mask, step_cache=10.0, **kw)
        np.testing.assert_array_equal(np.asarray(mid), np.asarray(again))
        assert runs == sorted(runs, reverse=True) and any(1 < r < calls for r in runs), (solver, runs)


def test_step_cache_extrapolates_the_residual_through_its_last_two_runs(tiny):
    """A skipped call adds the residual of the last block run extrapolated linearly in the noise
    level through the last two runs: r1 + (s - s1) (r1 - r2) / (s1 - s2); with one run so far,
    r1 itself. A call that runs the blocks shifts (r1, s1) into (r2, s2)."""
    graphdef, state, dit_cfg, ids, mask = tiny
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 4, dit_cfg.in_channels)), jnp.float32)
    kv = model.text_kv(model.encode_text(ids, mask))
    d = model.dit
    hid, e = d.embed(x, timesteps(jnp.full((2,), 0.5)))
    probe = d.probe(hid, e)
    r1, r2 = (jnp.asarray(rng.standard_normal(hid.shape), jnp.float32) for _ in range(2))
    sig = jnp.full((2,), 0.5, jnp.float32)
    for runs, want in ((2, r1 + (0.5 - 0.6) / (0.6 - 0.8) * (r1 - r2)), (1, r1)):
        cache = (probe, r1, r2, jnp.float32(0.6), jnp.float32(0.8), jnp.float32(0.0), jnp.int32(3), jnp.int32(runs))
        v, new = model.velocity_cached(x, sig, kv, cache, 1.0)  # probe unchanged: the call reuses
        np.testing.assert_allclose(np.asarray(v), np.asarray(d.head(hid + want, e)), rtol=1e-5, atol=1e-5)
        assert int(new[-1]) == runs and float(new[3]) == pytest.approx(0.6)
    _, ran = model.velocity_cached(x, sig, kv, cache, 0.0)  # threshold 0: the blocks run
    assert float(ran[3]) == pytest.approx(0.5) and float(ran[4]) == pytest.approx(0.6)
    np.testing.assert_array_equal(np.asarray(ran[2]), np.asarray(r1))
    np.testing.assert_allclose(np.asarray(ran[1]), np.asarray(d.run(hid, e, None, kv) - hid), rtol=1e-5, atol=1e-5)


def test_pooled_caption_reaches_every_velocity_path():
    """DiTConfig.text_pool: the pooled caption enters the modulation on every path the trainer
    and sampler take -- context, text_kv computed once, the step cache, the sampler -- with the
    same velocity; it changes the output (the projection is wired in); padding does not move it."""
    from sorajax.models import layers

    graphdef, state, dit_cfg = tiny_text_dit(text_pool=True)
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(2, 64, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)  # row 1 padded
    x = jnp.asarray(rng.standard_normal((2, 3, 4, 4, dit_cfg.in_channels)), jnp.float32)
    sigma = jnp.asarray([0.4, 0.9], jnp.float32)
    ctx = model.encode_text(ids, mask)
    kv = model.text_kv(ctx)
    v = np.asarray(model.velocity(x, sigma, ctx))
    np.testing.assert_allclose(np.asarray(model.velocity(x, sigma, None, text_kv=kv)), v, rtol=1e-5, atol=1e-5)
    v_cached, _ = model.velocity_cached(x, sigma, kv, model.init_step_cache(2, x.shape[1:]), 1e-12)
    np.testing.assert_allclose(np.asarray(v_cached), v, rtol=1e-5, atol=1e-5)
    padded = jnp.concatenate([ctx, jnp.zeros_like(ctx)], axis=1)
    np.testing.assert_allclose(np.asarray(layers.pooled_text(padded)), np.asarray(layers.pooled_text(ctx)),
                               atol=1e-7)
    other = nnx.merge(graphdef, state)
    other.dit.text_pool_proj.kernel[...] = jnp.zeros_like(other.dit.text_pool_proj.kernel[...])
    assert np.abs(np.asarray(other.velocity(x, sigma, ctx)) - v).max() > 1e-3
    kw = dict(steps=4, shift=2.0, guidance=3.0, solver="euler", decode=False)
    off, _ = sampler.sample(graphdef, state, x, ids, mask, ids, mask, **kw)
    cached, _ = sampler.sample(graphdef, state, x, ids, mask, ids, mask, step_cache=1e-12, **kw)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(off))
    with pytest.raises(ValueError, match="packed rows hold several clips"):
        model.dit.forward_packed(None, None, None, None, None, None)


def test_training_windows_come_from_the_clip_and_flag_its_start():
    """dit_train.clip_frames: 9-frame windows (3 latent frames) of 17-frame clips (5): each is
    the clip's latents at some offset, every offset occurs, and `start` is True exactly at 0.
    The DiT's start embedding then changes the output of the window's first latent frame."""
    from sorajax import tokenizer as tok_lib
    from tests.helpers import FIXTURES

    cfg = toy_config()
    tok = tok_lib.Tokenizer.load(str(FIXTURES / "umt5_tiny" / "tokenizer"))
    stage = stages.DiTStage(cfg, "/nonexistent", tok)
    x0 = jnp.broadcast_to(jnp.arange(5, dtype=jnp.float32)[None, :, None, None, None], (64, 5, 2, 2, 1))
    win, start = stage._window(x0 + 10 * jnp.arange(64.0)[:, None, None, None, None], jax.random.key(0))
    win, start = np.asarray(win), np.asarray(start)
    offsets = win[:, 0, 0, 0, 0] - 10 * np.arange(64)
    assert win.shape == (64, 3, 2, 2, 1) and set(offsets) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(win[:, :, 0, 0, 0] - 10 * np.arange(64)[:, None], offsets[:, None] + np.arange(3))
    np.testing.assert_array_equal(start, offsets == 0)

    from sorajax.models import dit as dit_lib

    dcfg = dit_lib.VARIANTS["toy"](num_layers=1)
    model = dit_lib.WanDiT(dcfg, rngs=nnx.Rngs(0))
    model.start_embedding[...] = jax.random.normal(jax.random.key(1), model.start_embedding.shape)
    x = jax.random.normal(jax.random.key(2), (2, 3, 4, 4, dcfg.in_channels))
    ctx = jax.random.normal(jax.random.key(3), (2, 5, dcfg.text_dim))
    on, off = (np.asarray(model(x, jnp.full((2,), 500.0), ctx, start=jnp.asarray([s, s]))) for s in (True, False))
    assert np.abs(on - off).max() > 1e-3


def test_motion_weight_weighs_moving_positions_and_reaches_the_dit_loss(tiny):
    """dit_train.motion_weight: flow.motion_weight is 1 on a still clip and > 1 exactly where an
    object moves (mean 1 + strength per clip); the DiT stage's loss uses it on both of its paths
    (plain text-to-video and conditioning masks): it changes the loss of a moving clip and not
    that of a still one."""
    from sorajax import tokenizer as tok_lib
    from tests.helpers import FIXTURES

    graphdef, state, dit_cfg, _, _ = tiny
    c = dit_cfg.in_channels
    moving = np.zeros((2, 3, 4, 4, c), np.float32)
    for t in range(3):
        moving[:, t, 1, t] = 2.0  # a blob one position to the right per latent frame
    still = np.broadcast_to(moving[:, :1], moving.shape).copy()
    np.testing.assert_array_equal(np.asarray(flow.motion_weight(still, 3.0)), 1.0)
    w = np.asarray(flow.motion_weight(moving, 3.0))[..., 0]
    assert w.shape == (2, 3, 4, 4) and abs(w.mean() - 4.0) < 1e-5
    assert (w[:, 1, 1, :2] > 2).all() and (w[:, 2, 1, 1:3] > 2).all()  # where it left and arrived
    assert (w[:, :, 3] == 1).all() and (w[:, :, :, 3] == 1).all()  # nothing moves there

    model = nnx.merge(graphdef, state)
    tok = tok_lib.Tokenizer.load(str(FIXTURES / "umt5_tiny" / "tokenizer"))
    for rates in ({}, dict(first=0.5)):  # the plain path, then the conditioned one
        losses = {}
        for mw in (0.0, 3.0):
            cfg = toy_config()
            with cfg.unlocked():
                cfg.dit_train.motion_weight = mw
                cfg.dit_train.cond_rates.update(first=0.0, first_k=0.0, last_k=0.0, first_last=0.0, keyframes=0.0)
                cfg.dit_train.cond_rates.update(rates)
            stage = stages.DiTStage(cfg, "/nonexistent", tok)
            ids = jnp.asarray(np.random.default_rng(2).integers(2, 64, (2, cfg.text.max_length)), jnp.int32)
            for name, x in (("moving", moving), ("still", still)):
                batch = dict(latents=jnp.asarray(x), ids=ids, mask=jnp.ones_like(ids))
                losses[name, mw] = float(stage.loss(model, batch, jax.random.key(4))[0])
        np.testing.assert_allclose(losses["still", 3.0], losses["still", 0.0], rtol=1e-5)
        assert abs(losses["moving", 3.0] - losses["moving", 0.0]) > 1e-3 * losses["moving", 0.0], (rates, losses)
