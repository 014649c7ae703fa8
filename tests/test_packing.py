"""Packed (NaViT-style) training: the packer, the packed arrays, and the proof that packing is
exact -- a packed DiT forward equals the clips' forwards one by one, and the packed loss and its
gradients equal the mean of the per-clip ones (sorajax/packing.py)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sorajax import conditioning, packing, stages
from sorajax.models import dit as dit_lib
from tests.helpers import tiny_text_dit

# (t, h, w) latent shapes of a world mix: square, landscape and portrait clips of two durations
# and 1-frame images, as the toy VAE (4x temporal, 8x spatial) makes them from 9/13-frame clips.
SHAPES = [(3, 4, 4), (4, 4, 4), (3, 4, 6), (4, 4, 6), (3, 6, 4), (4, 6, 4), (1, 4, 4), (1, 4, 6), (1, 6, 4)]
PATCH = (1, 2, 2)


def _mix(n, seed=0, image_share=0.25):
    rng = np.random.default_rng(seed)
    videos, images = SHAPES[:6], SHAPES[6:]
    return [images[rng.integers(3)] if rng.random() < image_share else videos[rng.integers(6)]
            for _ in range(n)]


def test_packer_is_deterministic_fits_and_covers_every_example():
    shapes = _mix(200)
    sizes = [packing.clip_tokens(s, PATCH) for s in shapes]
    budget = packing.Budget(rows=4, tokens=96, max_clips=8)
    a = packing.PackPlan(packing.Packer(sizes, budget, seed=3))
    b = packing.PackPlan(packing.Packer(sizes, budget, seed=3))
    c = packing.PackPlan(packing.Packer(sizes, budget, seed=4))
    assert b[40] == a[40] and b[0] == a[0]  # random access: batch 40 first, then 0, same plan
    assert a[5] != c[5]
    seen = []
    for i in range(30):
        batch = a[i]
        assert len(batch) == budget.rows
        for row in batch:
            assert 1 <= len(row) <= budget.max_clips
            assert sum(sizes[j] for j in row) <= budget.tokens
            seen += row
    # The first epoch's 200 examples all come out within the first batches (no starvation).
    first = seen[:250]
    assert set(range(200)) <= set(first), sorted(set(range(200)) - set(first))[:5]


def test_packing_efficiency_on_the_world_mix():
    sizes = [packing.clip_tokens(s, PATCH) for s in _mix(500, seed=1)]
    for tokens, clips in ((96, 8), (192, 16)):
        plan = packing.PackPlan(packing.Packer(sizes, packing.Budget(rows=4, tokens=tokens, max_clips=clips), seed=0))
        eff = plan.efficiency(50)
        assert eff >= 0.95, (tokens, eff)
    with pytest.raises(ValueError, match="does not fit"):
        packing.Packer([10, 200], packing.Budget(1, 100, 4), seed=0)


def _examples(shapes, z, L, seed=0):
    rng = np.random.default_rng(seed)
    return [{"latents": rng.normal(size=(*s, z)).astype(np.float32),
             "ids": rng.integers(1, 60, L).astype(np.int32),
             "mask": (np.arange(L) < rng.integers(2, L + 1)).astype(np.int32)} for s in shapes]


def test_bucket_plan_one_shape_per_batch_and_tokens_about_constant():
    shapes = _mix(300, seed=4)
    tokens_of = {s: packing.clip_tokens(s, PATCH) for s in set(shapes)}
    batch_of = packing.bucket_batch_sizes(tokens_of, 4 * 24, multiple=2)
    assert batch_of[(1, 4, 4)] == 24 and batch_of[(4, 4, 6)] == 4 and batch_of[(3, 4, 6)] == 4  # 96 // 18 = 5 -> 4
    plan = packing.BucketPlan(shapes, batch_of, seed=1)
    again = packing.BucketPlan(shapes, batch_of, seed=1)
    assert again[30] == plan[30] and again[2] == plan[2]
    seen = []
    for i in range(60):
        key, idx = plan[i]
        assert {shapes[j] for j in idx} == {key} and len(idx) == batch_of[key]
        assert 0.75 * 96 <= len(idx) * tokens_of[key] <= 96
        seen += idx
    assert len({plan[i][0] for i in range(20)}) >= 5  # buckets interleave, not one after another
    assert len(seen) > 300 and len(set(seen)) > 250  # the epochs cover the clips
    with pytest.raises(ValueError, match="fewer than its batch"):
        packing.BucketPlan([(1, 4, 4)] * 3, {(1, 4, 4): 4}, seed=0)


def test_pack_layout():
    exs = _examples([(3, 4, 6), (1, 6, 4), (2, 4, 4)], z=8, L=6)
    out = packing.pack([exs[:2], exs[2:]], 30, 3, PATCH, np.zeros(6, np.int32), np.zeros(6, np.int32))
    assert out["tokens"].shape == (2, 30, 32)
    np.testing.assert_array_equal(out["clip_tokens"], [[18, 6, 0], [8, 0, 0]])
    np.testing.assert_array_equal(out["clip_frames"], [[3, 1, 0], [2, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"][0], [1] * 18 + [2] * 6 + [0] * 6)
    np.testing.assert_array_equal(out["positions"][0, 18:24], dit_lib.grid_positions(1, 3, 2))
    np.testing.assert_array_equal(out["start_tokens"][0, :24], [True] * 6 + [False] * 12 + [True] * 6)
    back = dit_lib.unpatchify(jnp.asarray(out["tokens"][0:1, :18]), (3, 2, 3), PATCH)
    np.testing.assert_array_equal(np.asarray(back)[0], exs[0]["latents"])
    np.testing.assert_array_equal(out["text_segment_ids"][1], np.repeat([1, 2, 3], 6))
    np.testing.assert_array_equal(out["ids"][1, 1], np.zeros(6))  # an empty slot: the empty caption


def test_sample_masks_with_per_clip_lengths():
    lengths = jnp.asarray([1, 2, 3, 5] * 64)
    m = np.asarray(conditioning.sample_masks(jax.random.key(0), 256, 5, (0.2, 0.2, 0.2, 0.2, 0.1), lengths=lengths))
    n = np.asarray(lengths)[:, None]
    i = np.arange(5)[None]
    assert not (m & (i >= n)).any()  # nothing past a clip's end is given
    assert not m[np.asarray(lengths) == 1].any()  # images are never conditioned
    assert ((~m) & (i < n)).any(axis=1).all()  # every clip generates at least one frame
    assert m[np.asarray(lengths) == 5].any(axis=1).mean() > 0.6  # and masks are drawn at all


def _packed_case(attention="xla"):
    graphdef, state, cfg = tiny_text_dit(attention=attention)
    model = nnx.merge(graphdef, state)
    z, L = cfg.in_channels, 6
    shapes = [(3, 4, 6), (1, 6, 4), (2, 4, 4)]
    exs = _examples(shapes, z, L)
    rows = [[0, 1], [2]]
    batch = packing.pack([[exs[i] for i in r] for r in rows], 30, 2, PATCH, np.zeros(L, np.int32),
                         np.zeros(L, np.int32))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return graphdef, state, model, exs, rows, batch


def _context(model, batch):
    R, K, L = batch["ids"].shape
    ctx = model.encode_text(batch["ids"].reshape(R * K, L), batch["mask"].reshape(R * K, L))
    return ctx.reshape(R, K * L, -1)


@pytest.mark.parametrize("attention", ["xla", "flash"])
def test_packed_forward_equals_clips_alone(attention):
    graphdef, state, _, exs, rows, batch = _packed_case(attention)
    sig = jnp.asarray([[0.3, 0.8], [0.5, 0.1]])

    @jax.jit
    def packed(st, batch):
        m = nnx.merge(graphdef, st)
        return m.velocity_packed(batch["tokens"], packing.per_token(sig, batch["segment_ids"]), batch["positions"],
                                 batch["segment_ids"], _context(m, batch), batch["text_segment_ids"],
                                 batch["start_tokens"])

    @jax.jit
    def alone(st, x, s, ids, mask):
        m = nnx.merge(graphdef, st)
        return m.velocity(x, s, m.encode_text(ids, mask))  # start=None: the clip's first latent

    @jax.jit
    def packed_levels(st, batch):  # the training step's form: K noise levels and an index per token
        m = nnx.merge(graphdef, st)
        level = packing.slot_of_tokens(batch["segment_ids"], sig.shape[1])
        return m.velocity_packed(batch["tokens"], (sig, level), batch["positions"], batch["segment_ids"],
                                 _context(m, batch), batch["text_segment_ids"], batch["start_tokens"])

    v = packed(state, batch)
    np.testing.assert_allclose(np.asarray(packed_levels(state, batch)), np.asarray(v), atol=1e-5, rtol=1e-5)
    for r, row in enumerate(rows):
        at = 0
        for k, i in enumerate(row):
            x = jnp.asarray(exs[i]["latents"])[None]
            out = alone(state, x, sig[r, k][None], jnp.asarray(exs[i]["ids"])[None], jnp.asarray(exs[i]["mask"])[None])
            want = dit_lib.patchify(out, PATCH)[0]
            n = want.shape[0]
            np.testing.assert_allclose(np.asarray(v[r, at:at + n]), np.asarray(want), atol=1e-5, rtol=1e-5)
            at += n
    assert np.isfinite(np.asarray(v)).all()  # padding too


def test_packed_loss_and_grads_equal_the_mean_of_per_clip_ones():
    graphdef, state, model, exs, rows, batch = _packed_case()
    sig = jnp.asarray([[0.3, 0.8], [0.5, 0.1]])
    noise = jax.random.normal(jax.random.key(5), batch["tokens"].shape)
    # Clip 0 (3 latent frames) is given its first frame; the others are generated whole.
    given = (batch["segment_ids"] == 1) & (batch["positions"][..., 0] == 0)
    given = given.at[1].set(False)
    fmasks = {0: jnp.asarray([[True, False, False]]), 1: jnp.asarray([[False]]), 2: jnp.asarray([[False, False]])}

    def packed(st):
        m = nnx.merge(graphdef, st)
        return packing.packed_loss(m, batch, _context(m, batch), sig, noise, given)[0]

    def alone(st):
        m = nnx.merge(graphdef, st)
        losses = []
        for r, row in enumerate(rows):
            at = 0
            for k, i in enumerate(row):
                x0 = jnp.asarray(exs[i]["latents"])[None]
                n = packing.clip_tokens(x0.shape[1:4], PATCH)
                t, h, w = x0.shape[1], x0.shape[2] // 2, x0.shape[3] // 2
                nz = dit_lib.unpatchify(noise[r:r + 1, at:at + n], (t, h, w), PATCH)
                ctx = m.encode_text(jnp.asarray(exs[i]["ids"])[None], jnp.asarray(exs[i]["mask"])[None])
                losses.append(stages.conditioned_flow_loss(m, x0, nz, sig[r, k][None], fmasks[i], ctx, PATCH))
                at += n
        return jnp.mean(jnp.stack(losses))

    lp, gp = jax.jit(jax.value_and_grad(packed))(state)
    la, ga = jax.jit(jax.value_and_grad(alone))(state)
    np.testing.assert_allclose(float(lp), float(la), rtol=1e-5)
    chex.assert_trees_all_close(gp, ga, rtol=1e-4, atol=1e-6)


def test_packed_flow_loss_runs_with_masks_and_reports_efficiency():
    graphdef, state, model, exs, rows, batch = _packed_case()

    class F:
        logit_mean, logit_std, shift = 0.0, 1.0, 1.0

    loss, aux = packing.packed_flow_loss(model, batch, jax.random.key(0), flow_cfg=F, text_dropout=0.1,
                                         empty_ids=np.zeros(6, np.int32), empty_mask=np.zeros(6, np.int32),
                                         cond_rates=(0.5, 0.2, 0.1, 0.1, 0.05), max_frames=3)
    assert np.isfinite(float(loss)) and float(aux["clips"]) >= 2
    np.testing.assert_allclose(float(aux["packing_efficiency"]), 32 / 60)


def test_packed_iterator_resumes_from_its_saved_position():
    from sorajax.data import pipeline

    exs = _examples(_mix(40, seed=2), z=4, L=5, seed=1)
    sizes = [packing.clip_tokens(e["latents"].shape, PATCH) for e in exs]

    def make():
        plan = packing.PackPlan(packing.Packer(sizes, packing.Budget(rows=4, tokens=96, max_clips=8), seed=7))
        return pipeline.make_packed_iterator(
            exs, plan, rows=[1, 3], transform=lambda e: e,
            pack_fn=lambda rows: packing.pack(rows, 96, 8, PATCH, np.zeros(5, np.int32), np.zeros(5, np.int32)))

    it = make()
    for _ in range(3):
        next(it)
    state = pipeline.get_state(it)
    want = [next(it) for _ in range(4)]  # batches 3..6 of an uninterrupted iterator
    again = make()
    pipeline.set_state(again, state)
    for w in want:
        got = next(again)
        assert got["tokens"].shape == (2, 96, 16)  # this process's rows 1 and 3 only
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])
    assert not np.array_equal(want[0]["segment_ids"], want[1]["segment_ids"])  # the batches differ


def test_native_runlocal_trains_packed_mixed_shapes_with_one_compile(tmp_path):
    """configs/native.py:runlocal end to end (world clips of mixed shapes and images, the VAE on
    crops, the latent cache by shape, packed DiT steps): 100 DiT steps compile the step once and
    the trainer logs the packing efficiency."""
    import json
    import os

    from tests.helpers import cli_env, run_cli

    r = run_cli(["-m", "sorajax.train", "--config", "configs/native.py:runlocal", "--workdir", str(tmp_path / "run"),
                 f"--config.data.data_dir={tmp_path / 'data'}", "--config.vae_train.steps=2",
                 "--config.dit_train.steps=100", "--config.dit_train.log_every=25", "--config.dit_train.ckpt_every=100",
                 "--config.dit_train.sample_at_end=False", "--config.dit_train.batch_size=2",
                 '--config.dit.overrides={"num_layers": 1}'], env=cli_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    dit = [x for x in rows if x["stage"] == "dit"]
    assert [x["step"] for x in dit] == [25, 50, 75, 100]
    assert all(x["step_traces"] == 1 for x in dit), [x["step_traces"] for x in dit]
    assert dit[-1]["packing_efficiency_mean"] >= 0.95  # real tokens / budget over the 100 steps
    assert all(0.5 < x["packing_efficiency"] <= 1 for x in dit)
    cache = json.load(open(tmp_path / "run" / "latents" / "cache.json"))
    assert cache["native"] and cache["shape"] is None
    shapes = {tuple(s) for p in cache["parts"]
              for s in json.load(open(tmp_path / "run" / "latents" / "parts" / f"{p}.json"))["shapes"]}
    assert {s[0] for s in shapes} == {1, 3} and len({s[1:3] for s in shapes}) == 2, shapes  # images + videos, 2 sizes

    # Bucketing, the simple alternative, with the same VAE: one compile per bucket (shape); about
    # 1 x 72 tokens per batch (4 images of 16 tokens, 3 of 24, 1 clip of 48 or 72).
    import shutil

    b = tmp_path / "bucket"
    shutil.copytree(tmp_path / "run", b)
    shutil.rmtree(b / "checkpoints")
    os.remove(b / "metrics.jsonl")
    r = run_cli(["-m", "sorajax.train", "--config", "configs/native.py:runlocal", "--workdir", str(b),
                 f"--config.data.data_dir={tmp_path / 'data'}", "--config.vae_train.steps=2",
                 "--config.dit_train.steps=100", "--config.dit_train.log_every=25", "--config.dit_train.ckpt_every=100",
                 "--config.dit_train.sample_at_end=False", "--config.dit_train.batch_size=1",
                 "--config.dit_train.packing=bucket", '--config.dit.overrides={"num_layers": 1}'], env=cli_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[vae] already trained" in r.stdout
    dit = [json.loads(x) for x in open(b / "metrics.jsonl")]
    assert [x["step"] for x in dit] == [25, 50, 75, 100]
    assert dit[-1]["step_traces"] == len(shapes) == 4  # one compiled step per bucket (shape), no more
