"""TFDS builders (array_record, no TensorFlow needed): the synthetic world and video folders.

Frames are stored as a zlib-encoded uint8 `Tensor` (TFDS's Video/Image features need
TensorFlow); captions as `Text` (decodes to bytes through `tfds.data_source`); the ground
truth as a JSON string. Each clip shape/count/seed/world setting is its own BuilderConfig whose
name encodes it, so several coexist in one data_dir:

    DATA_DIR/world/f9_32x32_n2000-64_s0_obj1-3_occ30_<hash>/1.0.0/world-train.array_record-*

Clip seeds are derived from (seed, split, index), so train and validation never share a clip and
example i of a split is always the same clip (TFDS shuffling is disabled: order = index).

A video folder (`python -m sorajax.data.prepare`, docs/DATA.md) has the same layout ("frames",
"caption", and "meta": JSON of the source file and clip index), one config per DATA_DIR:

    DATA_DIR/video_folder/f9_32x32_fps8_<content hash>/1.0.0/video_folder-train.array_record-*

A folder prepared with native shapes (..._fps8_native_<content hash>) keeps each file's own clip
shape; its metadata.json (TFDS `info.metadata`) holds the settings and every clip's shape.

`source(data_cfg, split, build=)` picks the one a config's `data.source` names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging

from sorajax.data import shapes
from sorajax.data import world as world_lib
from sorajax.errors import UserError

SPLIT_IDS = {"train": 0, "validation": 1}


@dataclasses.dataclass
class WorldBuilderConfig(tfds.core.BuilderConfig):
    frames: int = 9
    height: int = 32
    width: int = 32
    num_train: int = 2000
    num_eval: int = 64
    seed: int = 0
    world_json: str = "{}"  # extra WorldConfig kwargs (sorted JSON), part of the name via a hash
    native_json: str = ""  # native-shape settings (shapes.native_settings, sorted JSON); "" = none

    def world_config(self) -> world_lib.WorldConfig:
        kw = json.loads(self.world_json)
        return world_lib.WorldConfig.from_dict(
            dict(kw, frames=self.frames, height=self.height, width=self.width))

    @property
    def native(self) -> dict | None:
        return json.loads(self.native_json) if self.native_json else None

    def clip_shape(self, split: str, index: int) -> tuple[int, int, int]:
        """(frames, height, width) of clip `index` of `split`."""
        if not self.native_json:
            return self.frames, self.height, self.width
        return shapes.world_clip_shape(clip_seed(self.seed, split, index), self.native, self.height, self.width)


def make_config(*, frames: int, height: int, width: int, num_train: int, num_eval: int,
                seed: int = 0, native: dict | None = None, **world_kwargs) -> WorldBuilderConfig:
    """A BuilderConfig whose name encodes every setting (readable parts + a hash of the rest)."""
    # Validate (and normalise) the world kwargs by building a WorldConfig.
    wc = world_lib.WorldConfig.from_dict(
        dict(world_kwargs, frames=frames, height=height, width=width))
    full = wc.to_dict()
    # (an empty holdout is left out, so datasets built before it existed keep their names)
    world_json = json.dumps({k: v for k, v in sorted(full.items())
                             if k not in ("frames", "height", "width") and not (k == "holdout" and not v)},
                            sort_keys=True)
    digest = hashlib.sha1(world_json.encode()).hexdigest()[:8]
    native_json = json.dumps(native, sort_keys=True) if native else ""
    name = (f"f{frames}_{height}x{width}_n{num_train}-{num_eval}_s{seed}"
            f"_obj{wc.min_objects}-{wc.max_objects}_occ{int(round(100 * wc.occluder_prob))}"
            f"_{digest}" + (f"_native{hashlib.sha1(native_json.encode()).hexdigest()[:8]}" if native else ""))
    return WorldBuilderConfig(
        name=name, description=f"synthetic world clips {frames}x{height}x{width}" + (" (native shapes)" if native else ""),
        frames=frames, height=height, width=width, num_train=num_train, num_eval=num_eval,
        seed=seed, world_json=world_json, native_json=native_json)


def clip_seed(seed: int, split: str, index: int) -> int:
    """The world seed of example `index` of `split` (uint32, disjoint streams per split)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, SPLIT_IDS[split], int(index)])
    return int(ss.generate_state(1, np.uint32)[0])


def clip_features(c, **extra) -> tfds.features.FeaturesDict:
    """The features every sorajax clip dataset has, so one pipeline reads them all: uint8 frames
    (zlib) of the config's clip shape (any shape with native shapes), the caption, a JSON `meta`
    string; plus `extra`."""
    shape = (None, None, None, 3) if getattr(c, "native_json", "") else (c.frames, c.height, c.width, 3)
    return tfds.features.FeaturesDict({
        "frames": tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="zlib"),
        "caption": tfds.features.Text(),
        "meta": tfds.features.Text(),
        **extra,
    })


class World(tfds.core.GeneratorBasedBuilder):
    """Synthetic world clips with captions and JSON ground truth."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = WorldBuilderConfig
    BUILDER_CONFIGS = []  # configs are made on demand by make_config

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        # DatasetInfo directly (not dataset_info_from_configs, which reads metadata files next
        # to the builder's module).
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedurally rendered captioned clips with ground truth (sorajax).",
            features=clip_features(c, seed=np.int64),  # meta: JSON ground truth
            disable_shuffling=True,  # example i of a split == clip_seed(seed, split, i)
            homepage="https://example.invalid/sorajax",
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "validation": self._generate_examples("validation", c.num_eval)}

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        wc = c.world_config()
        for i in range(num):
            s = clip_seed(c.seed, split, i)
            f, h, w = c.clip_shape(split, i)
            clip = world_lib.generate_clip(s, dataclasses.replace(wc, frames=f, height=h, width=w))
            yield i, {"frames": clip["frames"], "caption": clip["caption"],
                      "meta": world_lib.meta_to_json(clip["meta"]), "seed": s}


def world_builder(data_dir: str, *, config_name: str | None = None, **config_kwargs) -> World:
    """The World builder for settings `config_kwargs` (see make_config) or an existing
    `config_name` under data_dir, or the only config under data_dir when neither is given."""
    data_dir = os.fspath(data_dir)
    if config_kwargs:
        config = make_config(**config_kwargs)
    else:
        if config_name is None:
            root = os.path.join(data_dir, "world")
            names = sorted(os.listdir(root)) if os.path.isdir(root) else []
            names = [n for n in names if os.path.isdir(os.path.join(root, n, str(World.VERSION)))]
            if len(names) != 1:
                raise ValueError(f"{root}: expected exactly one world config, found {names}; "
                                 "pass config_name= or the world settings")
            config_name = names[0]
        path = os.path.join(data_dir, "world", config_name, str(World.VERSION))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no world dataset at {path}")
        return tfds.builder_from_directory(path)
    # TFDS warns "Using custom data configuration" for every on-demand config: expected here.
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return World(data_dir=data_dir, config=config, file_format="array_record")
    finally:
        absl_logging.set_verbosity(level)


def build_world(data_dir: str, *, frames: int, height: int, width: int, num_train: int,
                num_eval: int, seed: int = 0, **world_kwargs) -> World:
    """Builds the world dataset under data_dir unless it is already there; returns the builder.
    world_kwargs are WorldConfig fields (min_objects, max_objects, occluder_prob, ...)."""
    builder = world_builder(data_dir, frames=frames, height=height, width=width,
                            num_train=num_train, num_eval=num_eval, seed=seed, **world_kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def load_source(data_dir: str, split: str = "train", *, build: bool = False,
                config_name: str | None = None, **config_kwargs):
    """A random-access `tfds.data_source` over a world split. Identify the dataset by its
    settings (frames=, height=, ... as for build_world; built first if `build`), by
    `config_name`, or leave both out when data_dir holds a single world config.
    Elements: {"frames": uint8 (T, H, W, 3), "caption": bytes, "meta": bytes (JSON), "seed": int}.
    """
    if build and config_kwargs:
        builder = build_world(data_dir, **config_kwargs)
    else:
        builder = world_builder(data_dir, config_name=config_name, **config_kwargs)
        if config_kwargs and not builder.is_prepared():
            raise FileNotFoundError(f"world dataset {builder.builder_config.name} not built "
                                    f"under {data_dir}; call build_world or pass build=True")
    return builder.as_data_source(split=split)


def decode_text(value) -> str:
    """A text feature as read back (`tfds.features.Text` gives bytes through `tfds.data_source`;
    in-memory sources hold str) -> str. The one caption decoder."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(ex: dict[str, Any]) -> dict[str, Any]:
    """Bytes → str for the text fields, meta JSON → dict under "meta"."""
    out = dict(ex)
    for k in ("caption", "meta"):
        if k in out:
            out[k] = decode_text(out[k])
    if "meta" in out:
        out["meta"] = json.loads(out["meta"])
    return out


def world_kwargs(data_cfg) -> dict[str, Any]:
    """build_world/load_source keyword arguments from a config's `data` section."""
    d = data_cfg
    kw = dict(frames=d.frames, height=d.height, width=d.width, num_train=d.num_train,
              num_eval=d.num_eval, seed=d.seed, **{k: d[k] for k in world_lib.CONFIG_FIELDS})
    if d.holdout:
        kw["holdout"] = tuple(str(x) for x in d.holdout)
    native = shapes.native_settings(d)
    return dict(kw, native=native) if native else kw


class ShapedSource:
    """A random-access source whose clips differ in shape, with `clip_shapes`: the (frames,
    height, width) of every clip, known without decoding it (the latent cache groups its encode
    batches by shape; the packer sizes its rows by them)."""

    def __init__(self, source, clip_shapes):
        self.source, self.clip_shapes = source, [tuple(int(v) for v in s) for s in clip_shapes]
        if len(self.clip_shapes) != len(source):
            raise ValueError(f"{len(self.clip_shapes)} shapes for {len(source)} clips")

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]


def world_source(data_cfg, split: str, *, build: bool):
    """The world split a config's `data` section names; `build` (process 0 of a run) builds it
    first when missing. An unwritable data_dir is one UserError line, not a traceback."""
    kw = world_kwargs(data_cfg)
    if build:
        try:
            build_world(data_cfg.data_dir, **kw)
        except OSError as e:
            raise UserError(f"data.data_dir={data_cfg.data_dir!r}: cannot build the dataset there "
                            f"({e.strerror or e})") from None
    src = load_source(data_cfg.data_dir, split, **kw)
    if "native" not in kw:
        return src
    cfg = make_config(**kw)
    return ShapedSource(src, [cfg.clip_shape(split, i) for i in range(len(src))])


def captions(source) -> list[str]:
    """Every caption of a random-access source, in order."""
    return [decode_text(source[i]["caption"]) for i in range(len(source))]


# ==============================================================================================
# Video folders (sorajax/data/prepare.py writes them; training reads them like the world).
# ==============================================================================================
FOLDER_ROOT = "video_folder"  # DATA_DIR/video_folder/<config>/<version>


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
    frames: int = 9
    height: int = 32
    width: int = 32
    fps: float = 8.0
    native_json: str = ""  # folder_native settings (sorted JSON); "" = every clip frames x height x width


def folder_native(data_cfg) -> dict | None:
    """The native-shape settings a prepared folder is cut by (shapes.native_settings without
    image_share: a folder's images are its own), or None for one clip shape."""
    native = shapes.native_settings(data_cfg)
    return None if native is None else {k: v for k, v in native.items() if k != "image_share"}


def folder_config(*, frames: int, height: int, width: int, fps: float, digest: str,
                  native: dict | None = None):
    """The config of a prepared folder; its name holds the clip shape (the pixel budget with
    `native` shapes) and a content digest (which the DiT latent cache keys on)."""
    f = f"{fps:g}".replace(".", "p")
    return VideoFolderConfig(name=f"f{frames}_{height}x{width}_fps{f}_" + ("native_" if native else "") + digest,
                             description=(f"video folder clips {frames}x{height}x{width}" if not native else
                                          f"video folder clips at native shapes of about {height}x{width}")
                             + f" at {fps:g} fps",
                             frames=frames, height=height, width=width, fps=float(fps),
                             native_json=json.dumps(native, sort_keys=True) if native else "")


class VideoFolder(tfds.core.GeneratorBasedBuilder):
    """Clips of a user's videos and images with captions (written by sorajax.data.prepare from
    its per-file intermediates; read back with `tfds.builder_from_directory`, no class needed)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIG_CLASS = VideoFolderConfig
    BUILDER_CONFIGS = []

    def __init__(self, *, items: dict[str, list[dict]] | None = None, **kwargs):
        # items: split -> [{"clips_path", "count", "caption", "file", "kind", "stride"[, "shape"]}, ...]
        self._items = items or {}
        super().__init__(**kwargs)

    def _shape(self, item) -> tuple[int, int, int]:
        c = self.builder_config
        return tuple(item["shape"]) if c.native_json else (c.frames, c.height, c.width)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        metadata = None
        if c.native_json:  # read back by folder_source: the clips' shapes without decoding them
            metadata = tfds.core.MetadataDict(
                native=json.loads(c.native_json), frames=c.frames, height=c.height, width=c.width,
                clip_shapes={s: [[it["count"], *self._shape(it)] for it in items]
                             for s, items in self._items.items()})
        return tfds.core.DatasetInfo(
            builder=self,
            description="Clips cut from a folder of videos and images, with captions (sorajax).",
            features=clip_features(c),  # meta: JSON file, clip, start_s, kind
            disable_shuffling=True,  # file order (sorted paths), then clip order
            homepage="https://example.invalid/sorajax",
            metadata=metadata,
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(items) for split, items in self._items.items()}

    def _generate_examples(self, items):
        c = self.builder_config
        key = 0
        for it in items:
            clips = np.memmap(it["clips_path"], np.uint8, "r", shape=(it["count"], *self._shape(it), 3))
            for j in range(it["count"]):
                start = None if it["kind"] == "image" else round(j * it["stride"] / c.fps, 3)
                meta = json.dumps({"file": it["file"], "clip": j, "start_s": start, "kind": it["kind"]})
                yield key, {"frames": np.asarray(clips[j]), "caption": it["caption"], "meta": meta}
                key += 1
            del clips


def folder_path(data_dir: str) -> str:
    """DATA_DIR/video_folder/<config>/<version> of the one prepared dataset under data_dir
    (UserError naming the problem otherwise)."""
    root = os.path.join(os.fspath(data_dir), FOLDER_ROOT)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    names = [n for n in names if os.path.isdir(os.path.join(root, n, str(VideoFolder.VERSION)))]
    if len(names) != 1:
        what = f"found {len(names)} datasets" if names else "no prepared dataset"
        raise UserError(f"data.dir={data_dir!r}: {what} under {root!r}; prepare one with "
                        f"`python -m sorajax.data.prepare --src VIDEOS_DIR --out {data_dir}`")
    return os.path.join(root, names[0], str(VideoFolder.VERSION))


def folder_source(data_cfg, split: str):
    """The prepared folder split at data_cfg.dir, refused (UserError) unless its clips are the
    config's data.frames x height x width, or with native shapes (data.aspect_ratios) unless it
    was prepared with the config's native settings; then a ShapedSource (every clip's shape from
    the dataset's metadata)."""
    if not data_cfg.dir:
        raise UserError("data.dir='': data.source='folder' reads a prepared DATA_DIR; pass "
                        "--config.data.dir=DATA_DIR (python -m sorajax.data.prepare writes one)")
    builder = tfds.builder_from_directory(folder_path(data_cfg.dir))
    shape = tuple(builder.info.features["frames"].shape)
    native = folder_native(data_cfg)
    fixed = (data_cfg.frames, data_cfg.height, data_cfg.width)
    # Every setting a native folder's shapes depend on (the pixel budget: height x width).
    want = dict(native, height=data_cfg.height, width=data_cfg.width) if native else None
    meta = builder.info.metadata
    if shape[0] is None:
        got = dict(meta["native"], height=meta["height"], width=meta["width"])
        if got != want:
            raise UserError(f"data.dir={data_cfg.dir!r}: prepared with native shapes {_settings(got)} "
                            f"but the config asks {_settings(want) if want else 'every clip ' + 'x'.join(map(str, fixed))}; "
                            "prepare again with --config (the training config), or change data.aspect_ratios/"
                            "durations/size_multiple/height/width")
    elif native:
        raise UserError(f"data.dir={data_cfg.dir!r}: every clip is {'x'.join(map(str, shape[:3]))} (frames x "
                        f"height x width) but the config asks native shapes {_settings(want)}; prepare again "
                        "with --config (the training config), or set data.aspect_ratios=()")
    elif shape != (*fixed, 3):
        raise UserError(f"data.dir={data_cfg.dir!r}: clips are {shape[0]}x{shape[1]}x{shape[2]} "
                        f"(frames x height x width) but the config asks {'x'.join(map(str, fixed))}; "
                        "prepare again with --frames/--height/--width or set data.frames/height/width")
    if split not in builder.info.splits:
        raise UserError(f"data.dir={data_cfg.dir!r}: no {split!r} split (has "
                        f"{', '.join(builder.info.splits)}); prepare with --val-fraction > 0 for one")
    src = builder.as_data_source(split=split)
    if not native:
        return src
    return ShapedSource(src, [s for n, *s in meta["clip_shapes"][split] for _ in range(n)])


def _settings(s: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in sorted(s.items())) + ")"


def source(data_cfg, split: str, *, build: bool):
    """The split a config's `data` section names: the synthetic world (built first when `build`
    and missing) or a prepared video folder (data.source='folder', data.dir)."""
    if data_cfg.source == "folder":
        return folder_source(data_cfg, split)
    return world_source(data_cfg, split, build=build)


def sample_prompts(data_cfg, n: int) -> list[str]:
    """n prompts for end-of-training samples: the world's evaluation prompts, or the first
    distinct captions of a folder's training split."""
    if data_cfg.source != "folder":
        return [p.caption for p in world_lib.EVAL_PROMPTS[:n]]
    return first_captions(folder_source(data_cfg, "train"), n)


def first_captions(src, n: int) -> list[str]:
    """The first n distinct captions of a random-access source."""
    out = []
    for i in range(len(src)):
        c = decode_text(src[i]["caption"])
        if c not in out:
            out.append(c)
            if len(out) == n:
                break
    return out
