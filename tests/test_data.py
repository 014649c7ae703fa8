"""Synthetic world, its TFDS dataset and the Grain pipeline."""
import json
import sys

import numpy as np
import pytest

from sorajax.data import builders, pipeline, world

# ----------------------------------------------------------------------------------------------
# World
# ----------------------------------------------------------------------------------------------


def test_generate_clip_is_deterministic():
    cfg = world.WorldConfig()
    a, b = world.generate_clip(7, cfg), world.generate_clip(7, cfg)
    np.testing.assert_array_equal(a["frames"], b["frames"])
    assert a["caption"] == b["caption"] and a["meta"] == b["meta"]
    c = world.generate_clip(8, cfg)
    assert not np.array_equal(a["frames"], c["frames"])


@pytest.mark.parametrize("shape", [(1, 16, 16), (5, 24, 40), (17, 64, 48), (9, 32, 32)])
def test_any_clip_shape(shape):
    t, h, w = shape
    clip = world.generate_clip(3, world.WorldConfig(frames=t, height=h, width=w))
    assert clip["frames"].shape == (t, h, w, 3) and clip["frames"].dtype == np.uint8
    meta = clip["meta"]
    assert (meta["frames"], meta["height"], meta["width"]) == shape
    for o in meta["objects"]:
        assert len(o["trajectory"]) == t and len(o["visible"]) == t


def test_holdout_pairs_never_appear_in_generated_clips():
    """data.holdout: the held-out colour-shape pairs never occur in a generated clip, while the
    colour and the shape each still do; no holdout draws exactly the clips it drew before."""
    held = ("yellow circle", "magenta square", "red triangle")
    cfg = world.WorldConfig(max_objects=2, holdout=held)
    pairs = {f"{o['color']} {o['shape']}" for s in range(600)
             for o in world.generate_clip(s, cfg)["meta"]["objects"]}
    assert not pairs & set(held)
    assert {"yellow square", "red circle", "magenta triangle", "green circle", "blue square"} <= pairs
    free = world.WorldConfig(max_objects=2)
    all_pairs = {f"{o['color']} {o['shape']}" for s in range(600)
                 for o in world.generate_clip(s, free)["meta"]["objects"]}
    assert set(held) <= all_pairs  # without the holdout they do occur
    assert world.held_out({"objects": [{"color": "red", "shape": "triangle"}]}, held)
    assert not world.held_out({"objects": [{"color": "red", "shape": "circle"}]}, held)
    for bad in (("red",), ("red hexagon",), ("red circle", "red square", "red triangle")):
        with pytest.raises(ValueError, match="holdout"):
            world.WorldConfig(holdout=bad)
    # an empty holdout keeps the dataset names (and so the data) of configs from before it
    kw = dict(frames=3, height=8, width=8, num_train=4, num_eval=2)
    assert builders.make_config(**kw).name == builders.make_config(**kw, holdout=()).name
    assert builders.make_config(**kw).name != builders.make_config(**kw, holdout=held).name


def test_captions_match_meta():
    cfg = world.WorldConfig(occluder_prob=0.5, two_tone_prob=0.5)
    seen_occ = seen_two = 0
    for seed in range(60):
        clip = world.generate_clip(seed, cfg)
        meta, cap = clip["meta"], clip["caption"]
        json.dumps(meta)  # JSON-serialisable ground truth
        assert cap == world.caption_from_meta(meta)
        assert cfg.min_objects <= len(meta["objects"]) <= cfg.max_objects
        for o in meta["objects"]:
            verb = "stays still" if o["motion"] == "still" else f"moves {o['motion']}"
            assert f"a {o['size']} {o['color']} {o['shape']} {verb}" in cap
        assert ("behind a gray wall" in cap) == (meta["occluder"] is not None)
        bg = meta["background"]["colors"]
        assert cap.endswith(f"on a {' and '.join(bg)} background")
        seen_occ += meta["occluder"] is not None
        seen_two += len(bg) == 2
    assert seen_occ and seen_two


def test_caption_examples():
    spec = {"objects": [{"shape": "circle", "color": "red", "size": "large", "motion": "right"}],
            "background": "black", "occluder": True}
    assert (world.caption_from_meta(spec)
            == "a large red circle moves right behind a gray wall on a black background")
    spec = {"objects": [
        {"shape": "square", "color": "blue", "size": "large", "motion": "up"},
        {"shape": "triangle", "color": "green", "size": "small", "motion": "still"}],
        "background": ["black"], "occluder": False}
    assert (world.caption_from_meta(spec) == "a large blue square moves up and a small green "
            "triangle stays still on a black background")


def test_render_matches_ground_truth():
    cfg = world.WorldConfig()
    spec = {"objects": [{"shape": "circle", "color": "red", "size": "large", "motion": "down-right"}],
            "background": "navy", "occluder": False}
    clip = world.render_from_spec(spec, 5, cfg)
    red = np.all(clip["frames"] == world.COLORS["red"], axis=-1)  # (T, H, W)
    traj = np.asarray(clip["meta"]["objects"][0]["trajectory"])
    for t in range(cfg.frames):
        ys, xs = np.nonzero(red[t])
        assert abs(xs.mean() - traj[t, 0]) < 0.6 and abs(ys.mean() - traj[t, 1]) < 0.6
    assert traj[-1, 0] > traj[0, 0] and traj[-1, 1] > traj[0, 1]
    bg = ~red
    assert np.all(clip["frames"][bg] == world.BACKGROUNDS["navy"])


def test_bouncing_keeps_objects_in_frame():
    cfg = world.WorldConfig(frames=40, height=24, width=32, avoid_bounce=False, still_prob=0.0,
                            speed_range=(0.1, 0.2), occluder_prob=0.0)
    bounced = 0
    for seed in range(10):
        meta = world.generate_clip(seed, cfg)["meta"]
        for o in meta["objects"]:
            traj = np.asarray(o["trajectory"])
            r = o["radius"]
            assert traj[:, 0].min() >= r and traj[:, 0].max() <= cfg.width - 1 - r
            assert traj[:, 1].min() >= r and traj[:, 1].max() <= cfg.height - 1 - r
            assert min(o["visible"]) == 1.0  # never clipped by the frame edge
            bounced += o["bounced"]
    assert bounced > 0


def test_short_clips_do_not_bounce():
    cfg = world.WorldConfig()  # 9 x 32 x 32: the evaluation size
    for seed in range(150):
        for o in world.generate_clip(seed, cfg)["meta"]["objects"]:
            assert not o["bounced"]


def test_occluder_is_drawn_on_top():
    cfg = world.WorldConfig(frames=9, height=32, width=32)
    spec = {"objects": [{"shape": "square", "color": "yellow", "size": "large", "motion": "right",
                         "start": [7.0, 16.0], "speed": 2.0}],
            "background": "black", "occluder": {"x0": 14, "x1": 19}}
    clip = world.render_from_spec(spec, 0, cfg)
    wall = clip["frames"][:, :, 14:19]
    assert np.all(wall == world.OCCLUDER_COLOR)
    vis = clip["meta"]["objects"][0]["visible"]
    assert min(vis) < 1.0 and max(vis) == 1.0
    assert "behind a gray wall" in clip["caption"]


# ----------------------------------------------------------------------------------------------
# TFDS + Grain
# ----------------------------------------------------------------------------------------------

SMALL = dict(frames=5, height=16, width=16, num_train=32, num_eval=8, seed=3)


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    builders.build_world(str(d), **SMALL)
    return str(d)


def test_tfds_build_and_read_back(data_dir):
    src = builders.load_source(data_dir, "train", **SMALL)
    assert len(src) == 32
    assert len(builders.load_source(data_dir, "validation", **SMALL)) == 8
    ex = builders.decode_example(src[4])
    assert ex["frames"].shape == (5, 16, 16, 3) and ex["frames"].dtype == np.uint8
    assert int(ex["seed"]) == builders.clip_seed(3, "train", 4)
    cfg = world.WorldConfig(frames=5, height=16, width=16)
    clip = world.generate_clip(int(ex["seed"]), cfg)
    np.testing.assert_array_equal(ex["frames"], clip["frames"])
    assert ex["caption"] == clip["caption"] == world.caption_from_meta(ex["meta"])
    # The only config in the dir is found without settings; a rebuild is a no-op.
    assert len(builders.load_source(data_dir, "train")) == 32
    builders.build_world(data_dir, **SMALL)
    assert "tensorflow" not in sys.modules


def test_tfds_configs_coexist(tmp_path):
    a = builders.build_world(str(tmp_path), frames=3, height=8, width=8, num_train=4, num_eval=2)
    b = builders.build_world(str(tmp_path), frames=2, height=8, width=12, num_train=4, num_eval=2,
                             max_objects=1, occluder_prob=0.0)
    assert a.builder_config.name != b.builder_config.name
    sa = builders.load_source(str(tmp_path), "train", config_name=a.builder_config.name)
    sb = builders.load_source(str(tmp_path), "train", config_name=b.builder_config.name)
    assert sa[0]["frames"].shape == (3, 8, 8, 3) and sb[0]["frames"].shape == (2, 8, 12, 3)
    with pytest.raises(ValueError):
        builders.load_source(str(tmp_path), "train")  # ambiguous


def _seeds(batches):
    return [int(s) for b in batches for s in b["seed"]]


def test_iterator_shapes_and_range(data_dir):
    src = builders.load_source(data_dir, "train")
    it = pipeline.make_iterator(
        src, batch_size=8, seed=0, shard_index=0, shard_count=1,
        transform=lambda ex: dict(ex, ids=np.full(4, len(ex["caption"]), np.int32)))
    b = next(it)
    assert b["frames"].shape == (8, 5, 16, 16, 3) and b["frames"].dtype == np.float32
    assert b["frames"].min() >= -1.0 and b["frames"].max() <= 1.0
    assert b["frames"].min() < -0.9 and b["frames"].max() > 0.5  # really uses the range
    assert len(b["caption"]) == 8 and all(isinstance(c, str) for c in b["caption"])
    assert b["ids"].shape == (8, 4)
    assert [int(i[0]) for i in b["ids"]] == [len(c) for c in b["caption"]]


def test_epochs_reshuffle(data_dir):
    src = builders.load_source(data_dir, "train")
    it = pipeline.make_iterator(src, batch_size=8, seed=1, shard_index=0, shard_count=1)
    e1, e2 = _seeds([next(it) for _ in range(4)]), _seeds([next(it) for _ in range(4)])
    assert sorted(e1) == sorted(e2) and len(set(e1)) == 32 and e1 != e2
    finite = pipeline.make_iterator(src, batch_size=8, seed=1, shard_index=0, shard_count=1,
                                    num_epochs=1)
    assert _seeds(list(finite)) == e1


def test_shards_are_disjoint(data_dir):
    src = builders.load_source(data_dir, "train")
    shards = []
    for i in range(4):
        it = pipeline.make_iterator(src, batch_size=8, seed=0, shard_index=i, shard_count=4,
                                    num_epochs=1)
        batches = list(it)
        assert all(b["frames"].shape[0] == 2 for b in batches) and len(batches) == 4
        shards.append(set(_seeds(batches)))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not shards[i] & shards[j]
    assert len(set.union(*shards)) == 32
    with pytest.raises(ValueError):
        pipeline.make_iterator(src, batch_size=6, seed=0, shard_index=0, shard_count=4)


def test_iterator_state_restore(data_dir):
    src = builders.load_source(data_dir, "train")
    kw = dict(batch_size=8, seed=5, shard_index=0, shard_count=1)
    it = pipeline.make_iterator(src, **kw)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(pipeline.get_state(it)))  # survives a JSON round trip
    want = [next(it) for _ in range(4)]  # crosses the epoch boundary
    it2 = pipeline.make_iterator(src, **kw)
    pipeline.set_state(it2, state)
    got = [next(it2) for _ in range(4)]
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a["frames"], b["frames"])
        assert list(a["caption"]) == list(b["caption"])
