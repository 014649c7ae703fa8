"""Config checks before anything is built or compiled: one `UserError` line naming the field,
its value and what is allowed. Used by the trainer, the sampler and the AOT planner (which must
not import the trainer)."""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from sorajax import conditioning, config_base, sampler, sharding
from sorajax.data import world as world_lib
from sorajax.data import shapes
from sorajax.errors import UserError
from sorajax.models import dit as dit_lib
from sorajax.models import video
from sorajax.models.vae import latent_shape


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(v)


def _need(ok, field, value, allowed):
    if not ok:
        raise UserError(f"{field}={value!r}: {allowed}")


def _dataset_summary(d, *, file: str, what: str, make: str, read) -> tuple[tuple, int]:
    """((frames, height, width), training clips) of the dataset at data.dir, from its summary
    file (`read(json) -> (shape, clips)`); one UserError line naming `make` when it is missing,
    unreadable or of another clip shape than data.frames/height/width."""
    _need(isinstance(d.dir, str) and d.dir, "data.dir", d.dir,
          f"data.source={d.source!r} trains on {what}: pass --config.data.dir=DIR ({make} writes one)")
    path = os.path.join(d.dir, file)
    try:
        with open(path) as f:
            shape, clips = read(json.load(f))
        shape, clips = tuple(int(v) for v in shape), int(clips)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"data.dir={d.dir!r}: not {what} ({path}: "
                        f"{getattr(e, 'strerror', None) or type(e).__name__}); make it with {make}") from None
    want = (d.frames, d.height, d.width)
    _need(shape == want, "data.dir", d.dir,
          f"its clips are {'x'.join(map(str, shape))} (frames x height x width) but the config's "
          f"data.frames/height/width are {'x'.join(map(str, want))}; make it again with {make} "
          f"at {want[0]}x{want[1]}x{want[2]} (--frames/--height/--width or --config), or change the config")
    return shape, clips


def _folder_dataset(d) -> dict:
    """data.source='folder': the prepared DATA_DIR's summary (report.json "dataset", written by
    `python -m sorajax.data.prepare`), checked against data.frames/height/width."""
    def read(report):
        ds = report["dataset"]
        return [ds[k] for k in ("frames", "height", "width")], ds["splits"]["train"]
    _, n = _dataset_summary(d, file="report.json", what="a prepared dataset", read=read,
                            make=f"python -m sorajax.data.prepare --src VIDEOS_DIR --out {d.dir or 'DATA_DIR'}")
    return {"train_clips": n}


def _latent_cache(config) -> dict:
    """data.source='latents': the cache at data.dir (python -m sorajax.cache_latents), checked
    against data.frames/height/width."""
    d = config.data

    def read(meta):
        fd = meta["fingerprint"]["data"]
        return [fd[k] for k in ("frames", "height", "width")], meta["num_clips"]
    _, n = _dataset_summary(d, file="cache.json", what="a complete latent cache", read=read,
                            make=f"python -m sorajax.cache_latents --out {d.dir or 'LATENTS_DIR'}")
    return {"train_clips": n}


def _validate_stage(config, stage: str, rt: int, num_train: int) -> None:
    name = config_base.STAGE_SECTIONS[stage]
    t, d = config[name], config.data
    _need(is_int(t.steps) and t.steps >= 0, f"{name}.steps", t.steps, "must be an integer >= 0")
    for k in ("batch_size", "log_every", "ckpt_every", "grad_accum", "keep_checkpoints",
              "max_nonfinite_in_a_row"):
        _need(is_int(t[k]) and t[k] >= 1, f"{name}.{k}", t[k], "must be an integer >= 1")
    what = f"data.num_train={num_train}" if d.source == "world" else \
        f"the {num_train} training clips in data.dir={d.dir!r}"
    _need(num_train is None or t.batch_size <= num_train, f"{name}.batch_size", t.batch_size,
          f"must be <= {what} (incomplete batches are dropped)")
    _need(is_num(t.lr) and t.lr >= 0, f"{name}.lr", t.lr, "must be a finite number >= 0")
    _need(is_int(t.warmup_steps) and t.warmup_steps >= 0, f"{name}.warmup_steps", t.warmup_steps,
          "must be an integer >= 0")
    for k, hi in (("b1", "1)"), ("b2", "1)"), ("ema_decay", "1]")):
        _need(is_num(t[k]) and 0 <= t[k] and (t[k] < 1 or hi == "1]" and t[k] == 1),
              f"{name}.{k}", t[k], f"must be in [0, {hi}")
    _need(is_num(t.weight_decay) and t.weight_decay >= 0, f"{name}.weight_decay", t.weight_decay,
          "must be a finite number >= 0")
    _need(is_num(t.grad_clip) and t.grad_clip > 0, f"{name}.grad_clip", t.grad_clip, "must be > 0")
    inj = t.inject_nonfinite_steps
    _need(isinstance(inj, (tuple, list)) and all(is_int(x) for x in inj),
          f"{name}.inject_nonfinite_steps", inj, "must be a tuple of step numbers (testing knob)")
    n = t.clip_frames
    _need(is_int(n) and n >= 0 and (n == 0 or ((n - 1) % rt == 0 and n <= d.frames)),
          f"{name}.clip_frames", n, f"must be 0 (all frames) or 1 + {rt}k <= data.frames={d.frames}")
    if stage == "vae":
        for k in ("kl_weight", "fg_weight"):
            _need(is_num(t[k]) and t[k] >= 0, f"{name}.{k}", t[k], "must be a finite number >= 0")
    else:
        _need(is_num(t.text_dropout) and 0 <= t.text_dropout <= 1, f"{name}.text_dropout",
              t.text_dropout, "must be in [0, 1]")
        _need(is_num(t.motion_weight) and t.motion_weight >= 0, f"{name}.motion_weight", t.motion_weight,
              "must be a number >= 0")
        _need(is_int(t.eval_every) and t.eval_every >= 0, f"{name}.eval_every", t.eval_every,
              "must be an integer >= 0 (0 = no in-training evaluation)")
        n_val = len(world_lib.VALIDATION_PROMPTS)
        _need(is_int(t.eval_prompts) and 1 <= t.eval_prompts <= n_val, f"{name}.eval_prompts",
              t.eval_prompts, f"must be an integer in [1, {n_val}] (the validation prompts)")
        _need(not t.eval_every or d.source == "world", f"{name}.eval_every", t.eval_every,
              "in-training evaluation scores the synthetic world's prompts against its ground truth: "
              "it needs data.source='world' (set it to 0 for other data)")
        for k in conditioning.KINDS:
            _need(is_num(t.cond_rates[k]) and 0 <= t.cond_rates[k] <= 1, f"{name}.cond_rates.{k}",
                  t.cond_rates[k], "must be in [0, 1]")
        total = sum(conditioning.rates(t))
        _need(total <= 1.0 + 1e-9, f"{name}.cond_rates", dict(t.cond_rates),
              f"sum to {total:g}: at most 1 (the rest is plain text-to-video)")
        n = t.clip_frames
        _need(not n or n == d.frames or video.model_configs(config)[1].start_embedding, f"{name}.clip_frames", n,
              f"windows cut from {d.frames}-frame clips start mid-clip or at a clip's one-frame first latent: "
              "the DiT must be told which (dit.overrides.start_embedding=True)")
        pt = video.model_configs(config)[1].patch_size[0]
        _need(total == 0 or pt == 1, f"{name}.cond_rates", dict(t.cond_rates),
              f"conditioning masks give whole latent frames: they need a DiT temporal patch of 1, not {pt}")
        _need(t.packing in ("none", "pack", "bucket"), f"{name}.packing", t.packing,
              "must be 'pack' (clips of any shape packed into token budgets), 'bucket' (one shape per "
              "batch) or 'none' (one shape)")
        for k, lo in (("pack_tokens", 0), ("pack_clips", 1)):
            _need(is_int(t[k]) and t[k] >= lo, f"{name}.{k}", t[k], f"must be an integer >= {lo}")
        if t.packing != "none":
            _need(d.source == "latents" or config.vae.precompute_latents, f"{name}.packing", t.packing,
                  "needs precomputed latents: set vae.precompute_latents=True or data.source='latents'")
            _need(not t.clip_frames, f"{name}.clip_frames", t.clip_frames,
                  f"packing={t.packing!r} trains on whole clips (data.durations sets their lengths): set it to 0")
            _need(not t.motion_weight, f"{name}.motion_weight", t.motion_weight,
                  f"weighs one clip's latents per row; packing={t.packing!r} does not: set it to 0")
            _need(not video.model_configs(config)[1].text_pool, "dit.overrides.text_pool", True,
                  f"pools one caption per row, and packing={t.packing!r} puts several clips in a row: "
                  "turn one of them off")
        else:
            _need(shapes.native_settings(d) is None, "data.aspect_ratios", tuple(d.aspect_ratios),
                  f"clips of different shapes train packed: set {name}.packing='pack' or 'bucket' "
                  "(or aspect_ratios=())")


def _validate_native(d, rt: int, multiple: int) -> None:
    """data.aspect_ratios / durations / image_share / size_multiple (native shapes)."""
    _need(is_int(d.size_multiple) and d.size_multiple >= 1 and d.size_multiple % multiple == 0,
          "data.size_multiple", d.size_multiple,
          f"must be a multiple of {multiple} (VAE spatial compression x DiT patch)")
    _need(isinstance(d.aspect_ratios, (tuple, list)) and all(is_num(a) and a > 0 for a in d.aspect_ratios),
          "data.aspect_ratios", d.aspect_ratios, "must be a tuple of width/height ratios > 0")
    _need(isinstance(d.durations, (tuple, list)) and all(is_int(f) and f >= 1 and (f - 1) % rt == 0
                                                        for f in d.durations),
          "data.durations", d.durations, f"must be a tuple of frame counts 1 + {rt}k")
    _need(is_num(d.image_share) and 0 <= d.image_share <= 1, "data.image_share", d.image_share, "must be in [0, 1]")
    _need(isinstance(d.resolutions, (tuple, list)) and all(
        isinstance(r, (tuple, list)) and len(r) == 2 and all(is_int(v) and v >= multiple for v in r)
        for r in d.resolutions), "data.resolutions", d.resolutions,
        f"must be a tuple of (height, width) pixel budgets, each side >= {multiple}, e.g. ((720, 1280), (480, 832))")
    _need(not tuple(d.resolutions) or tuple(d.aspect_ratios), "data.resolutions", d.resolutions,
          "is read only with native shapes: set data.aspect_ratios too")


def validate(config, data: bool = True) -> None:
    """Checks a config before anything is built or compiled (UserError, one line). `data=False`
    skips the checks that read the dataset (the AOT planner plans for data on the pod)."""
    stages = config.stages
    _need(isinstance(stages, (tuple, list)) and len(stages) > 0
          and all(s in config_base.STAGE_SECTIONS for s in stages), "stages", stages,
          f"must be a non-empty tuple of {' and/or '.join(map(repr, config_base.STAGE_SECTIONS))}, "
          "e.g. ('vae', 'dit')")
    _need(is_int(config.seed) and config.seed >= 0, "seed", config.seed, "must be an integer >= 0")
    d = config.data
    for k in ("frames", "height", "width", "num_train"):
        _need(is_int(d[k]) and d[k] >= 1, f"data.{k}", d[k], "must be an integer >= 1")
    _need(d.source in ("world", "folder", "latents"), "data.source", d.source,
          "must be 'world' (the synthetic world), 'folder' (a prepared data.dir) or 'latents' "
          "(a latent cache in data.dir)")
    _need(config.vae.cache_dtype in ("bfloat16", "float32"), "vae.cache_dtype", config.vae.cache_dtype,
          "must be 'bfloat16' or 'float32'")
    _need(d.source != "world" or not d.dir, "data.dir", d.dir,
          "is read only with data.source='folder' (a prepared DATA_DIR) or 'latents' (a latent "
          "cache); add --config.data.source=folder (or latents), or drop data.dir for the world")
    if d.source == "world":  # the world's own settings (objects, holdout pairs, ...)
        try:
            world_lib.WorldConfig(**{k: d[k] for k in world_lib.CONFIG_FIELDS}, holdout=tuple(d.holdout))
        except (ValueError, TypeError) as e:
            raise UserError(f"config data: {e}") from None
    _need(d.source != "latents" or "vae" not in stages, "stages", stages,
          "data.source='latents' holds no pixels to train a VAE on: train the 'dit' stage only")
    num_train = (None if not data else _folder_dataset(d)["train_clips"] if d.source == "folder" else
                 _latent_cache(config)["train_clips"] if d.source == "latents" else d.num_train)
    vae_cfg, dit_cfg, _ = video.model_configs(config)  # UserError on unknown variants/overrides
    rt, rs = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    _need((d.frames - 1) % rt == 0, "data.frames", d.frames,
          f"the causal VAE takes 1 + {rt}k frames ({', '.join(str(1 + rt * i) for i in range(4))}, ...)")
    pt, ph, pw = dit_cfg.patch_size if "dit" in stages else (1, 1, 1)
    for k, p in (("height", ph), ("width", pw)):
        _need(d[k] % (rs * p) == 0, f"data.{k}", d[k],
              f"must be divisible by {rs * p} (VAE spatial compression {rs} x DiT patch {p})")
    _need((1 + (d.frames - 1) // rt) % pt == 0, "data.frames", d.frames,
          f"gives {1 + (d.frames - 1) // rt} latent frames, not divisible by the DiT temporal patch {pt}")
    _validate_native(d, rt, rs * max(ph, pw))
    # Native shapes: the world draws them; a prepared folder keeps each video's own (prepare); a
    # latent cache holds whatever shapes it was cached at (the settings then describe them, for
    # the AOT planner's packed budget and sample's messages).
    for stage in stages:
        _validate_stage(config, stage, rt, num_train)
    if "dit" in stages:
        _need(is_int(config.text.max_length) and config.text.max_length >= 2, "text.max_length",
              config.text.max_length, "must be an integer >= 2 (tokens and </s>)")
        f = config.flow
        _need(is_num(f.shift) and f.shift > 0, "flow.shift", f.shift, "must be > 0")
        _need(is_num(f.logit_std) and f.logit_std > 0, "flow.logit_std", f.logit_std, "must be > 0")
        _need(is_num(f.logit_mean), "flow.logit_mean", f.logit_mean, "must be a finite number")
        s = config.sample  # checked here so end-of-training sampling cannot fail on them
        _need(is_int(s.steps) and s.steps >= 1, "sample.steps", s.steps, "must be an integer >= 1")
        _need(is_num(s.guidance), "sample.guidance", s.guidance,
              "must be a finite number (1 = conditional only, 0 = unconditional)")
        _need(is_num(s.shift) and s.shift > 0, "sample.shift", s.shift, "must be > 0")
        _need(is_num(s.step_cache) and s.step_cache >= 0, "sample.step_cache", s.step_cache,
              "must be a number >= 0 (0 = off)")
        _need(s.solver in sampler.SOLVERS, "sample.solver", s.solver,
              f"must be one of {', '.join(sampler.SOLVERS)}")
    for k, v in config.mesh.items():
        _need(is_int(v) and (v >= 1 or v == -1), f"mesh.{k}", v, "must be a positive integer or -1 (fill)")
    rules = config.sharding_rules
    try:
        sharding.normalize_rules(rules)  # UserError on unknown names
    except (TypeError, ValueError) as e:
        raise UserError(f"sharding_rules={rules!r}: must be None or a list of (logical axis, mesh axis "
                        f"| tuple of mesh axes | None) pairs ({e})") from None
    if "dit" in stages and not config.init_from:
        tok = config.text.tokenizer
        if tok:
            _need(os.path.exists(tok), "text.tokenizer", tok,
                  "must be an existing spiece.model / tokenizer.json, or a folder holding one")
        else:  # a vocabulary is trained on the captions
            v = config.text.vocab_size
            _need(is_int(v) and v >= 1, "text.vocab_size", v, "must be an integer >= 1 (an upper "
                  "bound; sentencepiece needs at least the captions' characters + 3)")


def check_context_split(vae_cfg, dit_cfg, frames: int, height: int, width: int, mesh, rules,
                        what: str) -> None:
    """Context parallelism never switches itself off: a DiT token count that the mesh's context
    devices cannot split is an error, not a silent full attention on every device."""
    cp = sharding.axis_size(mesh, sharding.normalize_rules(rules), "length")
    if cp <= 1:
        return
    n = dit_lib.num_tokens(dit_cfg, latent_shape(vae_cfg, frames, height, width)[:3])
    if n % cp:
        raise UserError(
            f"{what}: {frames}x{height}x{width} gives {n} DiT tokens, which the {cp} context-parallel "
            f"devices cannot split (need a multiple of {cp}); change the frames/size or mesh.context")
    heads = int(dit_cfg.num_attention_heads)
    if dit_cfg.context_parallel == "all_to_all" and heads % cp:
        raise UserError(
            f"dit context_parallel='all_to_all' trades the {cp} context devices' tokens for heads: "
            f"the {heads} heads must divide by {cp}; use context_parallel='ring' or a mesh.context dividing {heads}")


def validate_mesh(config, mesh) -> None:
    """Checks the batch sizes and the context split against the mesh (before any compile)."""
    rules = sharding.normalize_rules(config.sharding_rules)
    dp = sharding.data_parallel_size(mesh, rules)
    nproc = jax.process_count()
    shape = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    for stage in config.stages:
        name = config_base.STAGE_SECTIONS[stage]
        b, accum = int(config[name].batch_size), int(config[name].grad_accum)
        if b % (dp * accum) or b % nproc:
            raise UserError(
                f"{name}.batch_size={b}: must be a multiple of {dp * accum} (the {dp} data-parallel "
                f"devices of the mesh ({shape}) x grad_accum={accum})"
                + (f" and of the {nproc} processes" if nproc > 1 else ""))
    if "dit" in config.stages and config.dit_train.packing == "pack":
        # Packed rows are the sequences that context parallelism splits, not the clips in them.
        cp, n = sharding.axis_size(mesh, rules, "length"), int(config.dit_train.pack_tokens)
        if n and n % cp:
            raise UserError(f"dit_train.pack_tokens={n}: must be a multiple of {cp}, the context-parallel "
                            f"devices of the mesh ({shape}) that split each packed row")
    elif "dit" in config.stages:
        vae_cfg, dit_cfg, _ = video.model_configs(config)
        d = config.data
        check_context_split(vae_cfg, dit_cfg, video.window_frames(config), d.height, d.width, mesh, rules,
                            "dit_train.clip_frames (or data.frames)/data.height/data.width")
