"""`python -m sorajax.data.prepare`: a folder of videos/images/captions -> a TFDS array_record
dataset + report.json (docs/DATA.md), and training configs/videos.py on it.

One folder (tiny mp4/webm/gif/png/jpg files, some bad) is prepared once per module with two
worker processes; the other tests copy its output or prepare small variants in process."""
import json
import os
import shutil
import sys

import imageio.v2 as iio
import numpy as np
import pytest
from PIL import Image

from sorajax import config_lib, latents
from sorajax.data import builders, decode, prepare
from sorajax.errors import UserError
from tests.helpers import ROOT, cli_env, run_cli

FPS = 10  # target fps of the module's dataset; --clip-stride 4 makes overlapping 9-frame clips
# file -> (reason or None, clips at 10 fps / stride 4, caption, where the caption comes from)
EXPECTED = {
    "clips/walk.mp4": (None, 3, "a person walking", "sidecar"),  # 2 s -> 20 frames: starts 0, 4, 8
    "swim.webm": (None, 1, "a fish swimming", "captions.jsonl"),  # 1.2 s -> 12 frames
    "spin.gif": (None, 2, "a spinning top", "captions.csv"),  # 15 x 100 ms -> 15 frames
    "still.png": (None, 1, "a green wall", "sidecar"),  # an image: one still clip
    "photo.jpg": (None, 1, "a photo of a cat, indoors", "captions.csv"),
    "broken.mp4": ("unreadable", 0, None, None),
    "broken.webm": ("unreadable", 0, None, None),
    "nocap.mp4": ("no caption", 0, None, None),
    "short.mp4": ("too short", 0, None, None),  # 0.5 s -> 5 frames < 9
    "tiny.png": ("too small", 0, None, None),  # 16x16 < 32x32
    "dup.mp4": ("duplicate", 0, None, None),  # the bytes of clips/walk.mp4
    "notes.md": ("unsupported", 0, None, None),
}


def _gray_video(n, h, w, step=5):
    """Frame i is uniformly grey i * step: its value tells which source frame a clip shows."""
    return np.broadcast_to((np.arange(n) * step).astype(np.uint8)[:, None, None, None],
                           (n, h, w, 3)).copy()


def make_folder(d):
    """The test folder: every input kind, every skip reason, captions in all three forms."""
    os.makedirs(d / "clips")
    rng = np.random.default_rng(0)
    iio.mimwrite(d / "clips" / "walk.mp4", _gray_video(48, 48, 64), fps=24, macro_block_size=1)
    (d / "clips" / "walk.txt").write_text("a person walking\n")
    shutil.copy(d / "clips" / "walk.mp4", d / "dup.mp4")
    (d / "dup.txt").write_text("the same file again")
    iio.mimwrite(d / "swim.webm", rng.integers(0, 255, (12, 40, 40, 3), np.uint8), fps=10,
                 codec="libvpx-vp9", macro_block_size=1, output_params=["-loglevel", "error"])
    gif = [Image.fromarray(f) for f in rng.integers(0, 255, (15, 36, 48, 3), np.uint8)]
    gif[0].save(d / "spin.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)
    still = np.zeros((48, 64, 3), np.uint8)  # red | green | blue: the 48x48 centre is green
    still[:, :8, 0], still[:, 8:56, 1], still[:, 56:, 2] = 255, 255, 255
    Image.fromarray(still).save(d / "still.png")
    (d / "still.txt").write_text("  a green\nwall ")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(d / "photo.jpg")
    (d / "broken.mp4").write_bytes(rng.bytes(3000))
    (d / "broken.txt").write_text("noise")
    (d / "broken.webm").write_bytes(rng.bytes(2000))
    iio.mimwrite(d / "nocap.mp4", _gray_video(10, 32, 32), fps=10, macro_block_size=1)
    iio.mimwrite(d / "short.mp4", _gray_video(5, 32, 32), fps=10, macro_block_size=1)
    (d / "short.txt").write_text("too short")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(d / "tiny.png")
    (d / "tiny.txt").write_text("too small")
    (d / "notes.md").write_text("not a video")
    (d / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"file": "clips/walk.mp4", "caption": "loses to the sidecar"},
        {"file": "swim.webm", "caption": "a fish swimming"},
        {"file": "broken.webm", "caption": "noise"},
        {"file": "gone.mp4", "caption": "no such file"}]) + "\n")
    (d / "captions.csv").write_text('file,caption\nswim.webm,loses to jsonl\nspin.gif,a spinning top\n'
                                    'photo.jpg,"a photo of a cat, indoors"\n')
    return d


def run(capfd, argv):
    """prepare's main in process -> (exit code, stdout, stderr)."""
    capfd.readouterr()
    try:
        rc = prepare.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capfd.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(src, out, report) of the folder prepared with 2 worker processes."""
    import subprocess

    d = tmp_path_factory.mktemp("prep")
    src, out = make_folder(d / "src"), d / "out"
    # Through the command line (in process would be cheaper, but this run also checks that the
    # worker processes never import JAX: decode.py asserts it at exit, a failing worker fails it).
    r = subprocess.run([sys.executable, "-m", "sorajax.data.prepare", "--src", str(src), "--out", str(out),
                        "--fps", str(FPS), "--clip-stride", "4", "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "report.json") as f:
        return src, out, json.loads(f.read()), r.stdout


def _data_cfg(out, arg="runlocal"):
    cfg = config_lib.load_config(str(ROOT / "configs" / f"videos.py:{arg}"))
    cfg.data.dir = str(out)
    return cfg


def test_report_names_every_file_with_its_fate(prepared):
    src, out, report, stdout = prepared
    rows = {f["file"]: f for f in report["files"]}
    assert set(rows) == set(EXPECTED)
    for name, (reason, clips, caption, where) in EXPECTED.items():
        r = rows[name]
        assert r["clips"] == clips, (name, r)
        if reason is None:
            assert r["status"] == "used" and r["caption"] == caption and r["caption_from"] == where, r
            assert r["split"] == "train" and r["width"] >= 36 and r["height"] >= 36
        else:
            assert r["status"] == "skipped" and r["reason"] == reason, (name, r)
    assert rows["clips/walk.mp4"]["fps"] == 24 and rows["clips/walk.mp4"]["duration_s"] == 2.0
    assert rows["dup.mp4"]["detail"] == "same content as clips/walk.mp4"
    c = report["counts"]
    assert c == {"files": 12, "used": 5, "skipped": 7, "clips": 8, "skipped_by_reason": {
        "unreadable": 2, "no caption": 1, "too short": 1, "too small": 1, "duplicate": 1,
        "unsupported": 1}}
    assert report["dataset"]["splits"] == {"train": 8}
    assert report["unmatched_captions"] == ["gone.mp4"]
    assert "12 files: 5 used, 7 skipped (unreadable: 2, no caption: 1, too short: 1, too small: 1, " \
           "duplicate: 1, unsupported: 1); 8 clips written (train 8)" in stdout
    assert sorted(report["run"]["decoded"]) == sorted(n for n, e in EXPECTED.items()
                                                      if e[0] not in ("no caption", "unsupported"))


def test_dataset_reads_back_through_builders_and_tfds(prepared):
    import tensorflow_datasets as tfds

    from sorajax.data import pipeline

    src, out, report, _ = prepared
    data = _data_cfg(out).data
    ds = builders.source(data, "train", build=True)
    assert len(ds) == 8
    exs = [builders.decode_example(ds[i]) for i in range(len(ds))]
    for ex in exs:
        assert ex["frames"].shape == (9, 32, 32, 3) and ex["frames"].dtype == np.uint8
    assert [(e["meta"]["file"], e["meta"]["clip"]) for e in exs] == [
        ("clips/walk.mp4", 0), ("clips/walk.mp4", 1), ("clips/walk.mp4", 2), ("photo.jpg", 0),
        ("spin.gif", 0), ("spin.gif", 1), ("still.png", 0), ("swim.webm", 0)]
    assert builders.captions(ds)[0] == "a person walking" and exs[6]["caption"] == "a green wall"
    # fps resampling + clip stride: clip c frame k shows source frame floor((4c + k) * 24 / 10),
    # whose grey level is 5x its index (h264 is within a few levels on flat frames).
    for c in range(3):
        got = exs[c]["frames"].astype(int).mean(axis=(1, 2, 3))
        want = 5 * np.floor((4 * c + np.arange(9)) * 2.4 + 1e-6)
        np.testing.assert_allclose(got, want, atol=4)
    assert exs[1]["meta"]["start_s"] == 0.4
    # Centre crop: the red and blue bands of still.png are outside the 48x48 centre; 9 equal frames.
    still = exs[6]["frames"].astype(int)
    assert (still[..., 1] == 255).all() and still[..., [0, 2]].max() == 0
    # The training pipeline reads it unchanged; plain TFDS reads it by name without our class.
    batch = next(iter(pipeline.make_dataset(ds, batch_size=4, seed=0, shard_index=0, shard_count=1)))
    assert batch["frames"].shape == (4, 9, 32, 32, 3) and batch["frames"].dtype == np.float32
    name = report["dataset"]["name"]
    assert tfds.builder_from_directory(os.path.join(out, report["dataset"]["path"])).info.splits[
        "train"].num_examples == 8
    assert len(tfds.data_source(f"video_folder/{name}", data_dir=str(out), split="train")) == 8


def test_rerun_redoes_only_the_missing_work(prepared, tmp_path, capfd):
    """A killed run (here: a finished intermediate deleted, a leftover temporary file) resumes:
    only that file is decoded again, and the dataset comes out the same."""
    src, out0, report0, _ = prepared
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    key = prepare.work_key(str(src), "spin.gif", report0["settings"])
    os.remove(out / ".work" / f"{key}.json")
    (out / ".work" / f".{key}.clips.tmp123").write_bytes(b"half")
    rc, stdout, err = run(capfd, ["--src", src, "--out", out, "--fps", FPS, "--clip-stride", 4,
                                  "--workers", 1])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["run"] == {"decoded": ["spin.gif"], "reused": 9}
    assert "decoded 1 file(s), 9 reused" in stdout
    assert report["dataset"] == report0["dataset"] and report["files"] == report0["files"]
    assert not [n for n in os.listdir(out / ".work") if ".tmp" in n]
    a = builders.source(_data_cfg(out0).data, "train", build=False)
    b = builders.source(_data_cfg(out).data, "train", build=False)
    assert all(np.array_equal(a[i]["frames"], b[i]["frames"]) for i in range(len(a)))
    # A validation split reuses every decoded file (the split is not part of the work key).
    rc, _, err = run(capfd, ["--src", src, "--out", out, "--fps", FPS, "--clip-stride", 4,
                             "--workers", 1, "--val-fraction", 0.5])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["decoded"] == []
    val = {f["file"] for f in report["files"] if f.get("split") == "validation"}
    assert val == {n for n, e in EXPECTED.items() if e[0] is None and prepare.split_of(n, 0.5) ==
                   "validation"}
    assert sum(report["dataset"]["splits"].values()) == 8


def test_bad_folders_exit_2_one_line_nothing_left(tmp_path, capfd):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"\0" * 500)
    (bad / "a.txt").write_text("caption")
    (bad / "b.png").write_bytes(b"not a png")
    (bad / "captions.csv").write_text("file,caption\nb.png,an image\n")
    for src, words in ((tmp_path / "empty", "no videos or images"),
                       (bad, "every file was skipped: 2 files: 0 used, 2 skipped (unreadable: 2)"),
                       (tmp_path / "nope", "not a directory")):
        rc, _, err = run(capfd, ["--src", src, "--out", tmp_path / "data"])
        lines = [l for l in err.splitlines() if l.strip() and "decode" not in l]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert words in lines[0], lines[0]
        assert not (tmp_path / "data").exists()
    rc, _, err = run(capfd, ["--src", bad, "--out", tmp_path / "data", "--frames", "8"])
    assert rc == 2 and "1 + 4k" in err and not (tmp_path / "data").exists()


def test_training_refuses_a_folder_of_another_shape(prepared, capfd):
    from sorajax import train

    _, out, _, _ = prepared
    for extra, words in ((["--config.data.height=64"], "its clips are 9x32x32"),
                         ([], "not a prepared dataset"),
                         # a data.dir the world source would silently ignore
                         (["--config.data.source=world"], "is read only with data.source='folder'")):
        d = out if extra else out / "video_folder"
        capfd.readouterr()
        rc = train.main(["--config", str(ROOT / "configs" / "videos.py:runlocal"), "--workdir",
                         str(out.parent / "never"), f"--config.data.dir={d}", *extra])
        err = capfd.readouterr().err
        assert rc == 2 and words in err.strip().splitlines()[-1], err
    assert not (out.parent / "never").exists()


# ==============================================================================================
# Native shapes (--aspect-ratios / a --config with data.aspect_ratios, docs/SHAPES.md).
# ==============================================================================================
# Width/height 1, 2 or 0.5 at about 32x32 pixels, sides multiples of 8; 5- or 9-frame clips.
NATIVE = ["--fps", 10, "--aspect-ratios", "1,2,0.5", "--durations", "5,9", "--size-multiple", 8,
          "--workers", 1]
# file -> ((frames, height, width) of its clips, clips, its own width/height)
NATIVE_EXPECTED = {
    "land.mp4": ((9, 16, 32), 1, 2.0),  # 64x32 (w x h), 12 frames: the longest duration, 1 clip
    "port.mp4": ((5, 32, 16), 1, 0.5),  # 32x64, 7 frames: 9 do not fit, 5 do
    "square.mp4": ((9, 32, 32), 2, 1.0),  # 48x48, 20 frames: two 9-frame clips
    "wide.png": ((1, 16, 32), 1, 60 / 36),  # 60x36 (1.67, nearest 2): a 1-frame clip
}


def _native_folder(d):
    """The native-shape test folder: NATIVE_EXPECTED plus a video too short for any duration."""
    os.makedirs(d)
    iio.mimwrite(d / "land.mp4", _gray_video(12, 32, 64), fps=10, macro_block_size=1)
    iio.mimwrite(d / "port.mp4", _gray_video(7, 64, 32), fps=10, macro_block_size=1)
    iio.mimwrite(d / "square.mp4", _gray_video(20, 48, 48), fps=10, macro_block_size=1)
    iio.mimwrite(d / "short.mp4", _gray_video(3, 48, 48), fps=10, macro_block_size=1)  # < 5 frames
    wide = np.zeros((36, 60, 3), np.uint8)  # 36 rows cover 16/32 x 60 = 30: 3 cut at top and bottom
    wide[:3], wide[3:33, :, 1], wide[33:] = 255, 255, 255
    Image.fromarray(wide).save(d / "wide.png")
    for name in ("land", "port", "square", "short", "wide"):
        (d / f"{name}.txt").write_text(f"a {name} clip")
    return d


def _native_data_cfg(out, **native):
    """A folder config's data section with NATIVE's settings (or `native` overrides)."""
    cfg = _data_cfg(out)
    with cfg.unlocked():
        cfg.data.update(**dict(dict(aspect_ratios=(1.0, 2.0, 0.5), durations=(5, 9), size_multiple=8),
                               **native))
    return cfg.data


@pytest.fixture(scope="module")
def native_prepared(tmp_path_factory):
    """(src, out, report) of the native-shape folder prepared in process."""
    d = tmp_path_factory.mktemp("native")
    src, out = _native_folder(d / "src"), d / "out"
    assert prepare.main([str(a) for a in ["--src", src, "--out", out, *NATIVE]]) == 0
    return src, out, json.loads((out / "report.json").read_text())


def test_native_shapes_keep_each_files_aspect_ratio_and_longest_duration(native_prepared):
    """Each file's clips are the native size of the configured aspect ratio nearest its own (at
    32x32 pixels) and the longest duration it allows; the image is one frame; the dataset stores
    every clip at its shape and folder_source gives the shapes (clip_shapes) without decoding."""
    from sorajax.data import shapes

    _, out, report = native_prepared
    rows = {f["file"]: f for f in report["files"]}
    assert rows["short.mp4"]["reason"] == "too short" and "fewer than 5 frames" in rows["short.mp4"]["detail"]
    for name, (shape, clips, own) in NATIVE_EXPECTED.items():
        nearest = min((1.0, 2.0, 0.5), key=lambda a: abs(np.log(own / a)))
        assert shape[1:] == shapes.native_size(nearest, 32 * 32, 8), name
        assert rows[name]["shape"] == list(shape) and rows[name]["clips"] == clips, rows[name]
    assert report["counts"]["clips_by_shape"] == {"1x16x32": 1, "5x32x16": 1, "9x16x32": 1, "9x32x32": 2}
    assert report["dataset"]["native"] == {"aspect_ratios": [1.0, 2.0, 0.5], "durations": [5, 9],
                                           "size_multiple": 8}

    src = builders.folder_source(_native_data_cfg(out), "train")
    assert isinstance(src, builders.ShapedSource)
    exs = [builders.decode_example(src[i]) for i in range(len(src))]
    assert [e["frames"].shape[:3] for e in exs] == src.clip_shapes
    assert [(e["meta"]["file"], e["frames"].shape[:3]) for e in exs] == [
        (name, shape) for name, (shape, clips, _) in sorted(NATIVE_EXPECTED.items()) for _ in range(clips)]
    by_file = {(e["meta"]["file"], e["meta"]["clip"]): e for e in exs}
    # Frame k of a clip is source frame k (grey 5k: 10 fps in and out); square's second clip starts at 9.
    for (name, clip), first in (("land.mp4", 0), 0), (("port.mp4", 0), 0), (("square.mp4", 1), 9):
        f = by_file[(name, clip)]["frames"]
        np.testing.assert_allclose(f.astype(int).mean(axis=(1, 2, 3)), 5 * (first + np.arange(len(f))), atol=4)
    assert by_file[("square.mp4", 1)]["meta"]["start_s"] == 0.9
    # The image: scaled to cover 16x32 and centre-cropped only to its ratio (the 3 white rows at
    # the top and bottom fall outside), one frame.
    img = by_file[("wide.png", 0)]["frames"].astype(int)
    assert img.shape == (1, 16, 32, 3) and (img[..., 1] == 255).all() and img[..., [0, 2]].max() == 0


def test_native_rerun_decodes_nothing_other_settings_decode_again(native_prepared, tmp_path, capfd):
    src, out0, report0 = native_prepared
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    rc, stdout, err = run(capfd, ["--src", src, "--out", out, *NATIVE])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["run"] == {"decoded": [], "reused": 5} and report["dataset"] == report0["dataset"]
    assert "clips by shape (frames x height x width): 1x16x32 1, 5x32x16 1, 9x16x32 1, 9x32x32 2" in stdout
    # Other native settings are other work keys: every file is decoded again.
    rc, _, err = run(capfd, ["--src", src, "--out", out, *NATIVE[:5], "5", *NATIVE[6:]])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["decoded"] == sorted([*NATIVE_EXPECTED, "short.mp4"])
    assert report["counts"]["clips_by_shape"] == {"1x16x32": 1, "5x16x32": 2, "5x32x16": 1, "5x32x32": 4}
    # The fixed shape (no --aspect-ratios) too, and it is the one shape as before.
    rc, _, err = run(capfd, ["--src", src, "--out", out, "--fps", 10, "--workers", 1, "--frames", 5])
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert len(report["run"]["decoded"]) == 5 and "clips_by_shape" not in report["counts"]
    assert "native" not in report["dataset"] and not any("shape" in f for f in report["files"])
    ds = builders.source(_fixed_cfg(out, 5), "train", build=False)
    assert not isinstance(ds, builders.ShapedSource) and ds[0]["frames"].shape == (5, 32, 32, 3)


def _fixed_cfg(out, frames):
    cfg = _data_cfg(out)
    with cfg.unlocked():
        cfg.data.frames = frames
    return cfg.data


def test_native_folder_must_match_the_training_config(native_prepared, tmp_path, capfd):
    """folder_source refuses a native folder to a config with other native settings or one shape
    (and a one-shape folder to a native config); `--config` takes the settings from the config."""
    src, out, _ = native_prepared
    for data, words in ((_native_data_cfg(out, durations=(9,)), "but the config asks (aspect_ratios=[1.0, 2.0, 0.5], durations=[9]"),
                        (_fixed_cfg(out, 9), "but the config asks every clip 9x32x32"),
                        (_native_data_cfg(out, height=64), "height=64")):
        with pytest.raises(UserError, match="prepared with native shapes") as e:
            builders.folder_source(data, "train")
        assert words in str(e.value), e.value
    # --config configs/native.py:runlocal: width/height 1 or 1.5 at 32x48 pixels, 9 frames.
    cfg = config_lib.load_config(str(ROOT / "configs" / "native.py:runlocal"))
    out2 = tmp_path / "out2"
    rc, _, err = run(capfd, ["--src", src, "--out", out2, "--fps", 10, "--workers", 1,
                             "--config", ROOT / "configs" / "native.py:runlocal"])
    assert rc == 0, err
    with cfg.unlocked():
        cfg.data.update(source="folder", dir=str(out2))
    ds = builders.folder_source(cfg.data, "train")
    assert [tuple(ds[i]["frames"].shape[:3]) for i in range(len(ds))] == ds.clip_shapes == [
        (9, 32, 48), (9, 32, 32), (9, 32, 32), (1, 32, 48)]  # land, square x2, wide (port: too short)
    with pytest.raises(UserError, match="every clip is 9x32x32 .* but the config asks native shapes"):
        builders.folder_source(_native_data_cfg(_prepared_fixed(src, tmp_path / "fixed", capfd)), "train")


def _prepared_fixed(src, out, capfd):
    rc, _, err = run(capfd, ["--src", src, "--out", out, "--fps", 10, "--workers", 1])
    assert rc == 0, err
    return out


def test_native_flags_help_and_bad_values_exit_2_one_line(tmp_path, capfd):
    rc, out, _ = run(capfd, ["--help"])
    assert rc == 0 and "--aspect-ratios" in out and "--durations" in out and "native" in out
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"never decoded")
    for args, words in ((["--aspect-ratios", "1", "--durations", "10"], "--durations 10: the causal VAE takes 1 + 4k"),
                        (["--aspect-ratios", "1,0"], "--aspect-ratios 1,0: must be comma-separated width/height ratios > 0"),
                        (["--durations", "9"], "--durations: read only with native shapes: add --aspect-ratios"),
                        (["--config", "configs/native.py", "--aspect-ratios", "1"],
                         "--config and --aspect-ratios: give one or the other")):
        rc, _, err = run(capfd, ["--src", src, "--out", tmp_path / "data", *args])
        lines = [l for l in err.splitlines() if l.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
        assert not (tmp_path / "data").exists()


# A 1-layer DiT and text encoder: the same code paths as configs/videos.py:runlocal, a third of
# its compile time (the suite's budget is 10 minutes on 2 cores).
SMALL = ["--config.dit.overrides={'num_layers': 1, 'num_attention_heads': 2, 'attention_head_dim': 32, 'ffn_dim': 128}",
         "--config.text.overrides={'num_layers': 1, 'd_model': 64, 'd_kv': 16, 'num_heads': 4, 'd_ff': 128}",
         "--config.dit_train.sample_at_end=False"]


def test_videos_runlocal_trains_both_stages_on_the_folder(prepared, tmp_path):
    """`python -m sorajax.train --config configs/videos.py:runlocal --config.data.dir=DATA_DIR`:
    2 steps per stage (batch 8 = the folder's 8 clips), the vocabulary and the latent cache from
    the folder's captions. A subprocess with one CPU device, the model made smaller (SMALL); the
    end-of-training samples' prompts (the folder's captions) are checked without sampling."""
    _, out, _, _ = prepared
    wd = tmp_path / "run"
    r = run_cli(["-m", "sorajax.train", "--config", "configs/videos.py:runlocal", "--workdir", str(wd),
                 f"--config.data.dir={out}", *SMALL], env=cli_env(1))
    assert r.returncode == 0, r.stderr[-3000:]
    for stage_dir in (wd / "vae", wd):
        rows = [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    cache = latents.LatentCache(str(wd / "latents"))
    caps = [cache[i]["caption"] for i in range(len(cache))]
    assert caps[0] == "a person walking" and len(caps) == 8
    assert (wd / "tokenizer" / "spiece.model").exists()
    cfg = config_lib.load_config(str(ROOT / "configs" / "videos.py:runlocal"))
    with cfg.unlocked():
        cfg.data.dir = str(out)
    prompts = builders.sample_prompts(cfg.data, 4)
    assert prompts[0] == "a person walking" and len(set(prompts)) == len(prompts) and set(prompts) <= set(caps)


def test_resize_crop_and_resample_units():
    # Never-upscaling resize keeps a same-size frame as is.
    f = np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8)
    np.testing.assert_array_equal(decode.resize_crop(f, 32, 32), f)
    # 4 frames of 0.25 s at 2 fps: shown at 0, 0.5 s -> frames 0, 2; at 8 fps each twice.
    src = [(i / 4, (i + 1) / 4, i) for i in range(4)]
    assert [i for i, _ in decode.resample(src, 2)] == [0, 2]
    assert [i for i, _ in decode.resample(src, 8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [c.tolist() for c in decode.cut_clips(iter(np.arange(12)), 5, 3)] == [
        [0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [6, 7, 8, 9, 10]]
    assert [c.tolist() for c in decode.cut_clips(iter(np.arange(12)), 3, 5)] == [[0, 1, 2], [5, 6, 7]]


def test_cache_latents_two_processes_killed_and_resumed_then_trains(prepared, wan_ckpt, tmp_path):
    """The folder -> `python -m sorajax.cache_latents` with the imported tiny Wan checkpoint's
    VAE, 2 processes x 4 devices (mesh data=2 x context=4: each process encodes its rows,
    context-parallel over its devices), chunks of 2 clips. SIGKILLed once the first chunk is
    complete, then resumed: the finished chunk is kept (not rewritten), the rest encoded; every
    cached clip equals the VAE's encoding of that clip (bf16) with its caption. Then 10 DiT steps
    from the cache (data.source='latents') with finite losses."""
    import signal
    import subprocess
    import time

    import jax.numpy as jnp

    from sorajax import inference
    from sorajax.data.pipeline import decode_example
    from tests.helpers import free_port, process_env, run_all

    _, data, _, _ = prepared
    lat = tmp_path / "latents"
    cfg_args = ["--config", f"configs/wan2_1_finetune.py:{wan_ckpt}", "--config.data.source=folder",
                "--config.data.width=32"]

    def cmds():
        port = free_port()
        return [([sys.executable, "-m", "sorajax.cache_latents", *cfg_args, "--data", str(data),
                  "--out", str(lat), "--batch-size", "2", "--shard-clips", "2",
                  "--config.mesh.data=2", "--config.mesh.context=4"],
                 process_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
                             JAX_PROCESS_ID=i)) for i in range(2)]

    # 1. Start, and SIGKILL both processes once chunk 0 is complete (both parts' .json written).
    first = [lat / "parts" / f"c00000-p{i:03d}-of-002.json" for i in range(2)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True) for c, e in cmds()]
    deadline = time.time() + 300
    while not all(p.exists() for p in first) and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert all(p.exists() for p in first), "chunk 0 was never completed"
    assert not (lat / "cache.json").exists(), "the build finished before it could be killed"
    kept = {f: os.stat(lat / "parts" / f).st_mtime_ns for f in os.listdir(lat / "parts") if f.startswith("c00000")}

    # 2. Resume: the same command.
    outs = run_all(cmds(), tmp_path, "cache")
    assert "1 done, encoding 3" in outs[0] or "done, encoding" in outs[0], outs[0][-2000:]
    assert {f: os.stat(lat / "parts" / f).st_mtime_ns for f in kept} == kept  # chunk 0 not redone
    assert not [f for f in os.listdir(lat / "parts") if f.startswith(".")]  # the killed run's temporaries
    cache = latents.LatentCache(str(lat))
    assert len(cache) == 8 and cache.meta["dtype"] == "bfloat16" and len(cache.meta["parts"]) == 8

    # Every clip's cached latents are the VAE's encoding of that clip, with that clip's caption.
    src = builders.folder_source(_data_cfg(data).data, "train")
    model = inference.load_model(str(wan_ckpt))[1]
    x = np.stack([decode_example(src[i])["frames"] for i in range(8)])
    want = np.asarray(model.vae.encode(jnp.asarray(x))[0])
    got = np.stack([cache[i]["latents"] for i in range(8)])
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    assert [cache[i]["caption"] for i in range(8)] == [builders.decode_text(src[i]["caption"]) for i in range(8)]

    # 3. Train the DiT 10 steps from the cache (the imported model, VAE and text encoder frozen).
    wd = tmp_path / "run"
    r = run_cli(["-m", "sorajax.train", "--config", f"configs/wan2_1_finetune.py:{wan_ckpt}",
                 "--workdir", str(wd), "--config.data.source=latents", f"--config.data.dir={lat}",
                 "--config.data.width=32", "--config.dit_train.steps=10", "--config.dit_train.log_every=1",
                 "--config.dit_train.ckpt_every=10"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, 11)) and all(np.isfinite(x["loss"]) for x in rows)


def test_cache_latents_bad_input_is_one_line_and_writes_nothing(prepared, tmp_path):
    _, data, _, _ = prepared
    for args, words in ((["--config", "configs/videos.py:runlocal"], "no VAE to encode with"),
                        (["--config", "configs/videos.py:runlocal", "--workdir", str(tmp_path / "none")],
                         "no VAE checkpoint"),
                        (["--config", "configs/pods/wan14b_v5p256.py", "--config.data.frames=9",
                          "--config.data.height=32", "--config.data.width=32"], "no such checkpoint directory")):
        r = run_cli(["-m", "sorajax.cache_latents", *args, "--data", str(data), "--out", str(tmp_path / "lat")])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert words in r.stderr.strip().splitlines()[-1], r.stderr
        assert not (tmp_path / "lat").exists()
