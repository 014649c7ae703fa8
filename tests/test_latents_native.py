"""The latent cache with clips of mixed shapes (native-shape training): a source with
`clip_shapes` is encoded in batches of one shape, every clip's latents are its own encoding, the
statistics cover every shape, a killed build resumes to the same records, and a fixed-shape
source keeps the old layout."""
import glob
import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from sorajax import latents, sharding
from sorajax.data.pipeline import decode_example
from sorajax.errors import UserError
from tests.helpers import toy_config

TINY_VAE = dict(base_dim=4, z_dim=4, dim_mult=(1, 2), temporal_downsample=(True,))  # /2 in t, h, w
# Clip i's pixel shape (T, H, W): four shapes interleaved, 1-frame images included. Ordered by
# (shape, index) and cut in batches of 2 they make 7 batches, 3 of them padded:
#   (1,32,32): [9+pad]  (5,48,32): [2 6]  (9,32,32): [0 3] [5 8] [10+pad]  (9,32,48): [1 4] [7+pad]
# and 2 batches a chunk (shard_clips=4) makes 4 chunks, two of them spanning shapes.
SHAPES = [(9, 32, 32), (9, 32, 48), (5, 48, 32), (9, 32, 32), (9, 32, 48), (9, 32, 32),
          (5, 48, 32), (9, 32, 48), (9, 32, 32), (1, 32, 32), (9, 32, 32)]
BATCH, SHARD = 2, 4


def _latent_shape(t, h, w):
    return ((t - 1) // 2 + 1, h // 2, w // 2, TINY_VAE["z_dim"])


class Clips:
    """A random-access source of raw examples; `clip_shapes` when given (a native source)."""

    def __init__(self, shapes, seed=0, native=True):
        rng = np.random.default_rng(seed)
        self.examples = [{"frames": rng.integers(0, 255, (*s, 3), dtype=np.uint8),
                          "caption": f"clip {seed}-{i} {s}".encode()} for i, s in enumerate(shapes)]
        if native:
            self.clip_shapes = [tuple(s) for s in shapes]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return dict(self.examples[i])


@pytest.fixture(scope="module")
def env():
    cfg = toy_config()
    with cfg.unlocked():
        cfg.vae.overrides = TINY_VAE
    from sorajax.models import video
    from sorajax.models.vae import WanVAE

    vae_cfg, _, _ = video.model_configs(cfg)
    vae = nnx.split(WanVAE(vae_cfg, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
    loads = []

    def build(src, out, **kw):
        def load_vae():
            loads.append(out)
            return vae

        return latents.build(cfg, src, mesh, str(out), vae_provenance="vae@test", load_vae=load_vae,
                             batch_size=BATCH, shard_clips=SHARD, dtype="float32", **kw)

    return dict(vae=vae, build=build, loads=loads)


@pytest.fixture(scope="module")
def native(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "latents"
    src = Clips(SHAPES)
    return dict(src=src, out=out, cache=env["build"](src, out))


def _records(out):
    """{part name: [raw record, ...]} of a cache directory."""
    recs = {}
    for path in sorted(glob.glob(os.path.join(out, "parts", "*.arrayrecord"))):
        ds = grain.sources.ArrayRecordDataSource([path])
        recs[os.path.basename(path)] = [ds[k] for k in range(len(ds))]
    return recs


def test_plan_batches_hold_one_shape_and_chunks_span_shapes():
    order, bounds = latents._plan(len(SHAPES), BATCH, np.asarray(SHAPES))
    batches = [[int(i) for i in order[b0:b1]] for b0, b1 in bounds]
    assert batches == [[9], [2, 6], [0, 3], [5, 8], [10], [1, 4], [7]]
    # The fixed-shape plan is today's: index order cut every `batch`, the last batch short.
    order, bounds = latents._plan(5, 2, None)
    assert [list(order[b0:b1]) for b0, b1 in bounds] == [[0, 1], [2, 3], [4]]


def test_native_cache_holds_every_clip_encoded_alone(env, native):
    cache, src, out = native["cache"], native["src"], native["out"]
    meta = json.load(open(out / "cache.json"))
    assert meta["shape"] is None and meta["native"] is True and meta["fingerprint"]["native"] is True
    assert cache.shape is None and len(cache) == len(SHAPES)
    assert cache.clip_shapes == [_latent_shape(*s) for s in SHAPES]
    # 4 chunks (see SHAPES), each a part whose json lists its clips' latent shapes.
    parts = sorted(glob.glob(str(out / "parts" / "*.json")))
    assert [os.path.basename(p) for p in parts] == [f"c{c:05d}-p000-of-001.json" for c in range(4)]
    assert [json.load(open(p))["indices"] for p in parts] == [[9, 2, 6], [0, 3, 5, 8], [10, 1, 4], [7]]
    for p in parts:
        part = json.load(open(p))
        assert part["shapes"] == [list(_latent_shape(*SHAPES[i])) for i in part["indices"]]
    for recs in _records(out).values():  # every record's head carries its latent shape
        for rec in recs:
            head, lat = latents._parse(rec, None, np.float32)
            assert head["shape"] == list(_latent_shape(*SHAPES[head["i"]])) == list(lat.shape)

    graphdef, state = env["vae"]
    encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x)[0])
    got = [cache[i] for i in range(len(cache))]
    for i, ex in enumerate(got):
        assert ex["caption"] == f"clip 0-{i} {SHAPES[i]}"
        want = np.asarray(encode(state, decode_example(src[i])["frames"][None]))[0]
        assert ex["latents"].shape == _latent_shape(*SHAPES[i])
        np.testing.assert_allclose(ex["latents"], want, rtol=1e-5, atol=1e-5, err_msg=f"clip {i}")
    # Per-channel statistics over every latent position of every clip, whatever its shape.
    flat = np.concatenate([ex["latents"].reshape(-1, 4) for ex in got]).astype(np.float64)
    np.testing.assert_allclose(cache.mean, flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache.std, flat.std(0) + 1e-6, rtol=1e-5, atol=1e-6)


def test_killed_native_build_resumes_to_the_same_records(env, native, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(native["out"], out)
    before, meta = _records(out), json.load(open(out / "cache.json"))
    part_json = {p: open(p).read() for p in glob.glob(str(out / "parts" / "*.json"))}
    # Killed while writing chunk 2 (padded, spanning two shapes): no part json, no cache.json.
    os.remove(out / "parts" / "c00002-p000-of-001.json")
    os.remove(out / "cache.json")
    kept = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "parts" / "*.arrayrecord"))
            if "c00002" not in p}
    n_loads = len(env["loads"])
    cache = env["build"](Clips(SHAPES), out)
    assert len(env["loads"]) == n_loads + 1
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # only chunk 2 was redone
    assert _records(out) == before
    assert {p: open(p).read() for p in part_json} == part_json
    assert json.load(open(out / "cache.json")) == meta
    assert cache.clip_shapes == native["cache"].clip_shapes
    for i in range(len(cache)):
        np.testing.assert_array_equal(cache[i]["latents"], native["cache"][i]["latents"])


def test_fixed_shape_source_keeps_the_old_layout(env, tmp_path):
    out = tmp_path / "latents"
    cache = env["build"](Clips([(9, 32, 32)] * 5, seed=1, native=False), out)
    meta = json.load(open(out / "cache.json"))
    assert meta["shape"] == [5, 16, 16, 4] and "native" not in meta and "native" not in meta["fingerprint"]
    assert set(meta) == {"key", "fingerprint", "num_clips", "shape", "dtype", "parts", "mean", "std"}
    assert cache.shape == (5, 16, 16, 4) and cache.clip_shapes == [(5, 16, 16, 4)] * 5
    parts = sorted(glob.glob(str(out / "parts" / "*.json")))
    assert [json.load(open(p))["indices"] for p in parts] == [[0, 1, 2, 3], [4]]
    assert all(set(json.load(open(p))) == {"indices", "count", "shape", "sum", "sum_sq"} for p in parts)
    for recs in _records(out).values():
        for rec in recs:
            head, lat = latents._parse(rec, cache.shape, np.float32)
            assert set(head) == {"i", "caption"} and lat.shape == cache.shape
    assert [cache[i]["caption"] for i in range(5)] == [f"clip 1-{i} (9, 32, 32)" for i in range(5)]


def test_clip_shapes_that_disagree_with_the_frames_are_refused(env, tmp_path):
    src = Clips([(1, 32, 32), (1, 32, 32)])
    src.clip_shapes[1] = (1, 32, 48)
    with pytest.raises(UserError, match="clip 1 has frames of shape"):
        env["build"](src, tmp_path / "latents")
    src.clip_shapes = src.clip_shapes[:1]
    with pytest.raises(UserError, match="2 clips but 1 clip_shapes"):
        env["build"](src, tmp_path / "latents")
