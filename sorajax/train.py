"""Training: `python -m sorajax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.K=V ...]`.

`train_and_evaluate(config, workdir)` runs the config's stages in order:
  "vae": the causal video VAE on pixels (reconstruction + KL), into DIR/vae;
  "dit": the DiT (and a toy text encoder) with rectified flow on the frozen VAE's latents, into DIR.
Each stage: mesh from the config, sharded init (abstract state -> shardings -> jit(init)), one
jitted train step with explicit in/out shardings and donated state, Orbax checkpoints under
STAGE_DIR/checkpoints (async), DIR/metrics.jsonl, TensorBoard events, resume where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sorajax import checkpoint as ckpt_lib
from sorajax import config_lib, flow, sharding
from sorajax.errors import UserError

log = logging.getLogger("sorajax.train")


# ==============================================================================================
# Data.
# ==============================================================================================
def world_source(config, split: str):
    from sorajax.data import builders

    d = config.data
    builders.build_world(
        d.data_dir, frames=d.frames, height=d.height, width=d.width, num_train=d.num_train,
        num_eval=d.num_eval, seed=d.seed, min_objects=d.min_objects, max_objects=d.max_objects,
        occluder_prob=d.occluder_prob, two_tone_prob=d.two_tone_prob)
    return builders.load_source(
        d.data_dir, split, frames=d.frames, height=d.height, width=d.width, num_train=d.num_train,
        num_eval=d.num_eval, seed=d.seed, min_objects=d.min_objects, max_objects=d.max_objects,
        occluder_prob=d.occluder_prob, two_tone_prob=d.two_tone_prob)


def all_captions(source) -> list[str]:
    out = []
    for i in range(len(source)):
        c = source[i]["caption"]
        out.append(c.decode() if isinstance(c, bytes) else str(c))
    return out


# ==============================================================================================
# Stages: model, trainable filter, loss.
# ==============================================================================================
class Stage:
    name: str
    workdir: str
    tcfg: ml_collections.ConfigDict

    def build(self, rngs):  # -> nnx.Module
        raise NotImplementedError

    def trainable(self):  # NNX filter
        return nnx.Param

    def loss(self, model, batch, key):  # -> (loss, aux dict)
        raise NotImplementedError

    def local_batch(self, batch):
        return batch


class VAEStage(Stage):
    name = "vae"

    def __init__(self, config, workdir):
        from sorajax.models import video

        self.config = config
        self.workdir = os.path.join(workdir, "vae")
        self.tcfg = config.vae_train
        self.vae_cfg, _, _ = video.model_configs(config)

    def build(self, rngs):
        from sorajax.models.vae import WanVAE

        return WanVAE(self.vae_cfg, rngs=rngs)

    def local_batch(self, batch):
        """Optionally trains on the first `clip_frames` frames: a causal VAE trained on 1 + r
        frames already sees the cached-chunk path every later chunk takes, at a fraction of the
        cost."""
        n = int(self.tcfg.get("clip_frames", 0) or 0)
        if n and batch["frames"].shape[1] > n:
            batch = dict(batch, frames=batch["frames"][:, :n])
        return batch

    def loss(self, model, batch, key):
        x = batch["frames"]  # (B, T, H, W, 3) in [-1, 1]
        mean, logvar = model.encode(x)  # (B, t, h, w, z)
        if self.tcfg.get("sample_posterior", True):
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        else:  # deterministic autoencoder (toy runs: learns far faster on CPU budgets)
            z = mean
        rec = model.decode(z, clip=False)  # (B, T, H, W, 3)
        # Foreground emphasis: pixels far from the clip's background colour (its per-channel
        # median) weigh 1 + fg_weight. Small objects are a few percent of the pixels, and their
        # colour is what text conditioning needs the latents to keep.
        fgw = float(self.tcfg.get("fg_weight", 0.0))
        if fgw:
            bg = jnp.median(x.reshape(x.shape[0], -1, x.shape[-1]), axis=1)  # (B, 3)
            dist = jnp.max(jnp.abs(x - bg[:, None, None, None, :]), axis=-1, keepdims=True)
            w = 1.0 + fgw * (dist > 0.1).astype(x.dtype)  # (B, T, H, W, 1)
            w = w / jnp.mean(w)
        else:
            w = 1.0
        l1 = jnp.mean(w * jnp.abs(rec - x))
        l2 = jnp.mean(w * jnp.square(rec - x))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        loss = l1 + l2 + self.tcfg.kl_weight * kl
        return loss, {"l1": l1, "l2": l2, "kl": kl}


class DiTStage(Stage):
    name = "dit"

    def __init__(self, config, workdir, tokenizer, latents=None):
        from sorajax.models import video

        self.latents = latents  # (N, t, h, w, z) normalized VAE latents of the train split, or None
        self.config = config
        self.workdir = workdir
        self.tcfg = config.train
        self.tokenizer = tokenizer
        vocab = tokenizer.vocab_size if config.text.get("vocab_from_tokenizer", True) else None
        self.cfgs = video.model_configs(config, vocab_size=vocab)
        empty_ids, empty_mask = tokenizer.encode([""], config.text.max_length)[:2]
        self.empty_ids = np.asarray(empty_ids)[0]
        self.empty_mask = np.asarray(empty_mask)[0]

    def wrap_source(self, source, trainer, mesh):
        """The VAE is frozen in this stage: the training clips were encoded once
        (encode_training_latents) instead of in every step."""
        if self.latents is None:
            return source
        return LatentSource(source, self.latents)

    def build(self, rngs):
        from sorajax.models.video import VideoModel

        return VideoModel(*self.cfgs, rngs=rngs)

    def trainable(self):
        from sorajax.models.video import trainable_filter

        return trainable_filter(self.config)

    def loss(self, model, batch, key):
        k_drop, k_sigma, k_noise = jax.random.split(key, 3)
        if "latents" in batch:  # precomputed by the frozen VAE (see wrap_source)
            x0 = batch["latents"]  # (B, t, h, w, z)
        else:
            x0 = jax.lax.stop_gradient(model.encode_video(batch["frames"]))  # (B, t, h, w, z)
        b = x0.shape[0]
        ids, mask = batch["ids"], batch["mask"]  # (B, L)
        # Text dropout: the unconditional branch of classifier-free guidance sees "".
        drop = jax.random.bernoulli(k_drop, self.tcfg.text_dropout, (b, 1))
        ids = jnp.where(drop, jnp.asarray(self.empty_ids)[None], ids)
        mask = jnp.where(drop, jnp.asarray(self.empty_mask)[None], mask)
        ctx = model.encode_text(ids, mask)  # (B, L, D)
        f = self.config.flow
        sigma = flow.sample_sigmas(k_sigma, (b,), logit_mean=f.logit_mean, logit_std=f.logit_std,
                                   shift=f.shift)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        xt = flow.add_noise(x0, noise, sigma)
        v = model.velocity(xt, sigma, ctx)
        loss = flow.flow_loss(v, flow.velocity_target(x0, noise))
        return loss, {}


# ==============================================================================================
# Train state, optimizer, the jitted step.
# ==============================================================================================
def make_optimizer(tcfg):
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tcfg.lr, warmup_steps=tcfg.warmup_steps,
        decay_steps=max(tcfg.steps, tcfg.warmup_steps + 1), end_value=tcfg.lr * 0.05)
    tx = optax.chain(
        optax.clip_by_global_norm(tcfg.get("grad_clip", 1.0)),
        optax.adamw(sched, b1=tcfg.get("b1", 0.9), b2=tcfg.get("b2", 0.99),
                    weight_decay=tcfg.get("weight_decay", 0.0)),
    )
    return tx, sched


def _path_shardings(tree, param_shardings_by_path, mesh):
    """Shardings for an optimizer/EMA tree: a leaf whose key path ends with a parameter's key
    path gets that parameter's sharding (Adam's mu/nu, EMA); other leaves are replicated."""
    def one(path, leaf):
        keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        for n in range(len(keys)):
            s = param_shardings_by_path.get(keys[n:])
            if s is not None and getattr(leaf, "shape", None) == s[1]:
                return s[0]
        return sharding.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


class Trainer:
    """Builds the sharded state of one stage and its jitted step."""

    def __init__(self, stage: Stage, config, mesh):
        self.stage, self.config, self.mesh = stage, config, mesh
        self.rules = sharding.normalize_rules(config.get("sharding_rules"))
        self.tx, self.schedule = make_optimizer(stage.tcfg)
        abstract_model = nnx.eval_shape(lambda: stage.build(nnx.Rngs(0)))
        self.graphdef, abs_params, abs_frozen = nnx.split(abstract_model, stage.trainable(), ...)
        self.param_shardings = sharding.state_shardings(abs_params, mesh, self.rules)
        self.frozen_shardings = sharding.state_shardings(abs_frozen, mesh, self.rules)
        # key path -> (sharding, shape) for the trained parameters.
        by_path = {}
        for (path, s), (_, a) in zip(jax.tree_util.tree_leaves_with_path(self.param_shardings),
                                     jax.tree_util.tree_leaves_with_path(abs_params)):
            keys = tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
            by_path[keys] = (s, a.shape)
        self.abstract = jax.eval_shape(self._init_fn)
        rep = sharding.replicated(mesh)
        self.shardings = {
            "params": self.param_shardings,
            "frozen": self.frozen_shardings,
            "opt": _path_shardings(self.abstract["opt"], by_path, mesh),
            "ema": self.param_shardings,
            "train": jax.tree.map(lambda _: rep, self.abstract["train"]),
        }
        self._step = None

    # -- init ----------------------------------------------------------------------------------
    def _init_fn(self):
        # rbg keys: XLA:CPU compiles threefry-based initialisers ~10x slower for many shapes.
        model = self.stage.build(nnx.Rngs(jax.random.key(self.config.seed, impl="rbg")))
        _, params, frozen = nnx.split(model, self.stage.trainable(), ...)
        return {
            "params": params,
            "frozen": frozen,
            "opt": self.tx.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "train": {
                "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(self.config.seed + 1)),
                "nonfinite_in_a_row": jnp.zeros((), jnp.int32),
                "nonfinite_total": jnp.zeros((), jnp.int32),
            },
        }

    def init(self):
        return jax.jit(self._init_fn, out_shardings=self.shardings)()

    def abstract_target(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)

    # -- step ----------------------------------------------------------------------------------
    def _step_fn(self, state, batch):
        step = state["train"]["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["train"]["rng"]), step)

        def loss_fn(params):
            model = nnx.merge(self.graphdef, params, state["frozen"])
            return self.stage.loss(model, batch, key)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grad_norm = optax.global_norm(grads)
        updates, new_opt = self.tx.update(grads, state["opt"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        # EMA with warm-up, min(decay, (1 + step) / (10 + step)): a plain 0.999 decay would still
        # hold 22% of the random init after 1500 steps.
        d_max = self.stage.tcfg.get("ema_decay", 0.0)
        stepf = step.astype(jnp.float32)
        d = jnp.minimum(d_max, (1.0 + stepf) / (10.0 + stepf))
        new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], new_params)
        # Guarded numerics: a non-finite loss or gradient skips the update (state unchanged).
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        tr = state["train"]
        new_state = {
            "params": keep(new_params, state["params"]),
            "frozen": state["frozen"],
            "opt": keep(new_opt, state["opt"]),
            "ema": keep(new_ema, state["ema"]),
            "train": {
                "step": step + 1,
                "rng": tr["rng"],
                "nonfinite_in_a_row": jnp.where(ok, 0, tr["nonfinite_in_a_row"] + 1),
                "nonfinite_total": tr["nonfinite_total"] + (~ok).astype(jnp.int32),
            },
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.schedule(step),
                   "skipped": (~ok).astype(jnp.int32), **aux}
        return new_state, metrics

    def step_fn(self):
        if self._step is None:
            rep = sharding.replicated(self.mesh)
            self._step = jax.jit(
                self._step_fn,
                in_shardings=(self.shardings, None),
                out_shardings=(self.shardings, rep),
                donate_argnums=(0,),
            )
        return self._step


# ==============================================================================================
# The loop.
# ==============================================================================================
class _Stop:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit 0."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        print(f"\nreceived signal {signum}: finishing this step, saving a checkpoint, then exiting",
              flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def _truncate_metrics(path, upto_step):
    """On resume, drop logged lines after the restored step so metrics.jsonl has no repeats."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= upto_step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def run_stage(stage: Stage, config, mesh, *, transform=None, meta=None, init_from=None,
              on_end=None) -> dict:
    """Trains one stage to tcfg.steps (resuming if checkpoints exist). Returns the final state."""
    from tqdm import tqdm

    from sorajax.data import pipeline

    tcfg = stage.tcfg
    os.makedirs(stage.workdir, exist_ok=True)
    trainer = Trainer(stage, config, mesh)
    ckpt = ckpt_lib.Checkpointer(os.path.join(stage.workdir, "checkpoints"),
                                 max_to_keep=config.train.get("keep_checkpoints", 3))
    dp = sharding.data_parallel_size(mesh, trainer.rules)
    if tcfg.batch_size % dp:
        raise UserError(f"{stage.name} batch_size={tcfg.batch_size} does not divide over the "
                        f"{dp} data-parallel devices of the mesh")
    nproc = jax.process_count()
    if tcfg.batch_size % nproc:
        raise UserError(f"{stage.name} batch_size={tcfg.batch_size} does not divide over {nproc} processes")
    source = world_source(config, "train")
    if hasattr(stage, "wrap_source"):
        source = stage.wrap_source(source, trainer, mesh)
    it = pipeline.make_iterator(source, batch_size=tcfg.batch_size,
                                seed=config.seed + (0 if stage.name == "vae" else 17),
                                transform=transform)

    abstract = trainer.abstract_target()
    restored = ckpt.restore_latest_good({
        "model": {"params": abstract["params"], "frozen": abstract["frozen"]},
        "ema": abstract["ema"], "opt": abstract["opt"], "train": abstract["train"], "data": None})
    if restored is not None:
        step0, items = restored
        state = {"params": items["model"]["params"], "frozen": items["model"]["frozen"],
                 "opt": items["opt"], "ema": items["ema"], "train": items["train"]}
        pipeline.set_state(it, items["data"]["iterator"])
        print(f"[{stage.name}] resumed from {ckpt.directory}/{step0}", flush=True)
    else:
        step0 = 0
        state = trainer.init()
        if init_from is not None:
            state = init_from(state, trainer)
    metrics_path = os.path.join(stage.workdir, "metrics.jsonl")
    _truncate_metrics(metrics_path, step0)

    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(stage.workdir, "tensorboard"))
    step_fn = trainer.step_fn()

    def save(step, force=False):
        model = {"params": state["params"], "frozen": state["frozen"]}
        ckpt.save(step, {"model": model, "ema": state["ema"], "opt": state["opt"],
                         "train": state["train"], "data": {"iterator": pipeline.get_state(it)},
                         "meta": dict(meta or {}, stage=stage.name, step=int(step))}, force=force)

    total = int(tcfg.steps)
    max_bad = int(config.train.get("max_nonfinite_in_a_row", 20))
    t_last, s_last = time.time(), step0
    step = step0
    pending = None
    bar = tqdm(total=total, initial=step0, desc=f"train {stage.name}", unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=1.0)
    with _Stop() as stop:
        while step < total:
            local = next(it)
            batch = sharding.global_batch(stage.local_batch(local), mesh, trainer.rules)
            state, m = step_fn(state, batch)
            step += 1
            pending = m
            log_now = step % tcfg.log_every == 0 or step == total
            if log_now:
                host = {k: float(v) for k, v in jax.device_get(pending).items()}
                now = time.time()
                sps = (step - s_last) / max(now - t_last, 1e-9)
                t_last, s_last = now, step
                row = {"step": step, "stage": stage.name, **host, "steps_per_sec": sps}
                bad_run = int(jax.device_get(state["train"]["nonfinite_in_a_row"]))
                if jax.process_index() == 0:
                    _append_jsonl(metrics_path, row)
                    for k, v in host.items():
                        writer.add_scalar(f"{stage.name}/{k}", v, step)
                bar.set_postfix(loss=f"{host['loss']:.4f}", sps=f"{sps:.2f}")
                if bad_run >= max_bad:
                    bar.close()
                    ckpt.close()
                    raise FloatingPointError(
                        f"{stage.name}: {bad_run} non-finite losses/gradients in a row at step {step}; "
                        f"stopped (last good checkpoint kept in {ckpt.directory})")
            bar.update(1)
            if step % tcfg.ckpt_every == 0 or step == total:
                save(step)
            if stop.requested:
                if step % tcfg.ckpt_every and step != total:
                    save(step, force=True)
                ckpt.close()
                bar.close()
                print(f"[{stage.name}] stopped at step {step}; checkpoint saved in {ckpt.directory}",
                      flush=True)
                raise SystemExit(0)
    bar.close()
    ckpt.close()
    if on_end is not None and jax.process_index() == 0 and tcfg.get("sample_at_end", True):
        on_end(state, trainer, writer, step)
    if writer is not None:
        writer.close()
    return {"state": state, "trainer": trainer}


class LatentSource:
    """Random-access source of {"latents", "caption"} for the DiT stage: the VAE latents of each
    world clip with its caption, both held in memory (no per-step frame decoding)."""

    def __init__(self, base, latents):
        self.lat = latents
        self.captions = []
        for i in range(len(base)):
            c = base[i]["caption"]
            self.captions.append(c.decode() if isinstance(c, bytes) else str(c))

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"latents": np.asarray(self.lat[i], np.float32), "caption": self.captions[i]}


def _stage_done(stage_dir, steps) -> bool:
    d = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(d):
        return False
    steps_done = [int(x) for x in os.listdir(d) if x.isdigit()]
    return bool(steps_done) and max(steps_done) >= steps


# ==============================================================================================
# Entry.
# ==============================================================================================
def validate(config):
    d = config.data
    if (d.frames - 1) % 4:
        raise UserError(f"data.frames={d.frames}: the causal VAE takes 1 + 4k frames (1, 5, 9, 13, ...)")
    for k in ("height", "width"):
        v = d[k]
        if v % 16:
            raise UserError(f"data.{k}={v}: must be divisible by 16 (VAE stride x patch)")
    for s in config.stages:
        if s not in ("vae", "dit"):
            raise UserError(f"stages: unknown stage {s!r}; known: vae, dit")


def _write_config(config, workdir):
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            f.write(config_lib.to_json(config))
        os.replace(tmp, os.path.join(workdir, "config.json"))


def train_and_evaluate(config, workdir: str):
    """Runs every stage of `config` in `workdir`; returns the DiT stage's final state."""
    from sorajax import tokenizer as tok_lib

    validate(config)
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    out = None
    if "vae" in config.stages:
        vstage = VAEStage(config, workdir)
        if not _stage_done(vstage.workdir, config.vae_train.steps):
            run_stage(vstage, config, mesh)
        else:
            print(f"[vae] already trained ({vstage.workdir}); skipping", flush=True)
    if "dit" in config.stages:
        tok_path = ensure_tokenizer(config, workdir)
        tokenizer = tok_lib.Tokenizer.load(tok_path)
        latents = None
        if config.vae.get("precompute_latents", True):
            latents = encode_training_latents(config, workdir, mesh, world_source(config, "train"))
            if config.vae.get("normalize_latents", False):
                # Per-channel statistics of this VAE's latents become its latents_mean/std (as
                # Wan ships them), so the DiT sees unit-scale data and the sampler denormalizes.
                mean = tuple(float(v) for v in latents.mean(axis=(0, 1, 2, 3)))
                std = tuple(float(v) for v in latents.std(axis=(0, 1, 2, 3)) + 1e-6)
                with config.unlocked():
                    config.vae.overrides = dict(config.vae.overrides or {}, latents_mean=mean, latents_std=std)
                    config.vae.normalize_latents = False  # done: the stats now live in the config
                _write_config(config, workdir)
            m, s = (np.asarray(config.vae.overrides[k], np.float32)
                    if config.vae.overrides and k in config.vae.overrides else None
                    for k in ("latents_mean", "latents_std"))
            if m is not None and s is not None:
                latents = (latents - m) / s
        stage = DiTStage(config, workdir, tokenizer, latents)
        L = config.text.max_length

        def transform(example):  # per example, before batching
            cap = example["caption"]
            ids, mask = tokenizer.encode([cap.decode() if isinstance(cap, bytes) else str(cap)], L)[:2]
            example["ids"] = np.asarray(ids, np.int32)[0]
            example["mask"] = np.asarray(mask, np.int32)[0]
            return example

        meta = {"tokenizer": os.path.relpath(tok_path, workdir), "config": config.to_dict()}
        out = run_stage(stage, config, mesh, transform=transform, meta=meta,
                        init_from=lambda st, tr: init_dit_state(st, tr, config, workdir, mesh),
                        on_end=lambda st, tr, w, s: end_of_training_samples(config, workdir, st, tr, w, s))
    return out


def ensure_tokenizer(config, workdir) -> str:
    """The toy run trains a sentencepiece vocabulary on the training captions (once)."""
    from sorajax import tokenizer as tok_lib

    if config.get("init_from"):  # fine-tuning: the imported model's tokenizer, kept with the run
        dst = os.path.join(workdir, "tokenizer")
        if not os.path.isdir(dst):
            shutil.copytree(os.path.join(config.init_from, "tokenizer"), dst + ".tmp", dirs_exist_ok=True)
            os.replace(dst + ".tmp", dst)
        return dst
    if config.text.get("tokenizer"):
        return config.text.tokenizer
    path = os.path.join(workdir, "tokenizer", "spiece.model")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        caps = all_captions(world_source(config, "train"))
        tok_lib.train_tokenizer(caps, path, config.text.vocab_size)
    return path


def encode_training_latents(config, workdir, mesh, source):
    """VAE latent means of every training clip, (N, t, h, w, z) float32, cached on disk in
    WORKDIR/latents/ (the VAE is frozen once its stage is done)."""
    from tqdm import tqdm

    from sorajax.data.pipeline import decode_example

    path = os.path.join(workdir, "latents", f"train_{len(source)}.npy")
    if os.path.exists(path):
        return np.load(path)
    graphdef, state = load_vae_state(config, workdir, mesh)
    enc = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x)[0])
    n, bs, out = len(source), 32, []
    for i in tqdm(range(0, n, bs), desc="encode latents", unit="batch", disable=jax.process_index() != 0):
        ex = [decode_example(source[j])["frames"] for j in range(i, min(i + bs, n))]
        x = np.stack(ex + [ex[-1]] * (bs - len(ex)))  # fixed batch shape: one compile
        out.append(np.asarray(enc(state, x))[:len(ex)])
    lat = np.concatenate(out).astype(np.float32)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npy"
        np.save(tmp, lat)
        os.replace(tmp, path)
    return lat


def load_init_model(config, mesh):
    """The model of `config.init_from` (a converted or trained checkpoint dir), for fine-tuning."""
    from sorajax.sample import load_model

    return load_model(config.init_from, use_ema=True, mesh_cfg=config.mesh, flag="init_from")[1]


def load_vae_state(config, workdir, mesh):
    """(graphdef, state) of the frozen VAE: from `init_from` when fine-tuning, else from the
    VAE stage's newest good checkpoint."""
    if config.get("init_from"):
        return nnx.split(load_init_model(config, mesh).vae)
    vstage = VAEStage(config, workdir)
    ck = ckpt_lib.Checkpointer(os.path.join(vstage.workdir, "checkpoints"))
    vtrainer = Trainer(vstage, config, mesh)
    absv = vtrainer.abstract_target()
    got = ck.restore_latest_good({"model": {"params": absv["params"], "frozen": absv["frozen"]}})
    ck.close()
    if got is None:
        raise UserError(f"no VAE checkpoint in {vstage.workdir}: run the 'vae' stage first")
    vae_model = nnx.merge(vtrainer.graphdef, got[1]["model"]["params"], got[1]["model"]["frozen"])
    return nnx.split(vae_model)


def init_dit_state(state, trainer, config, workdir, mesh):
    """DiT stage init: every weight from `init_from` (fine-tuning an imported or trained model),
    or else the trained VAE's weights into the frozen part of a fresh state."""
    if not config.get("init_from"):
        return load_vae_into(state, trainer, config, workdir, mesh)
    model = load_init_model(config, mesh)
    _, params, frozen = nnx.split(model, trainer.stage.trainable(), ...)
    put = lambda new, old: jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new, old)
    state["params"] = put(params, state["params"])
    state["frozen"] = put(frozen, state["frozen"])
    state["ema"] = jax.tree.map(jnp.copy, state["params"])
    return state


def load_vae_into(state, trainer, config, workdir, mesh):
    """Copies the trained VAE's parameters into the frozen part of the DiT stage's state."""
    _, vae_state = load_vae_state(config, workdir, mesh)
    frozen = state["frozen"]
    frozen["vae"] = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding),
                                 vae_state, frozen["vae"])
    state["frozen"] = frozen
    return state


def end_of_training_samples(config, workdir, state, trainer, writer, step):
    """Samples a few evaluation prompts with the EMA weights into DIR/samples + TensorBoard."""
    try:
        from sorajax import sample as sample_lib

        pipe = sample_lib.load_pipeline(workdir=workdir)
        prompts = sample_lib.default_prompts()[:4]
        out = pipe.generate(prompts, seed=0)
        frames = out["frames"]  # (N, T, H, W, 3) in [0, 1]
        from sorajax import video_io

        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        video_io.write(os.path.join(workdir, "samples", f"step_{step}.gif"), frames, prompts)
        if writer is not None:
            vid = np.transpose((frames * 255).astype(np.uint8), (0, 1, 4, 2, 3))  # (N, T, C, H, W)
            writer.add_video("samples", vid, step, fps=4)
            writer.add_image("samples_sheet", video_io.contact_sheet(frames, prompts), step,
                             dataformats="HWC")
    except Exception as e:  # sampling at the end must never lose a finished run
        print(f"warning: end-of-training sampling failed: {type(e).__name__}: {e}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m sorajax.train",
        description="Train (or resume) a sorajax model from a config. Writes WORKDIR/metrics.jsonl, "
                    "TensorBoard events under WORKDIR/tensorboard, Orbax checkpoints under "
                    "WORKDIR/checkpoints (and WORKDIR/vae/... for the VAE stage). Re-running the same "
                    "command resumes from the last complete checkpoint.",
        epilog="Override any config field with --config.KEY=VALUE, e.g. --config.train.steps=100.")
    p.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:ARG (e.g. :runlocal)")
    p.add_argument("--workdir", required=True, help="run directory (created if missing)")
    args, rest = p.parse_known_args(argv)
    return args, rest


def _check_workdir(workdir):
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {workdir!r} cannot be created: {e.strerror}") from e
    if not os.access(workdir, os.W_OK):
        raise UserError(f"--workdir {workdir!r} is not writable")


def main(argv=None):
    from sorajax import cli

    return cli.run(_main, argv)


def _main(argv):
    args, rest = parse_args(argv)
    config = config_lib.apply_overrides(config_lib.load_config(args.config), rest)
    validate(config)
    existed = os.path.isdir(args.workdir)
    _check_workdir(args.workdir)
    try:
        train_and_evaluate(config, args.workdir)
    except UserError:
        if not existed and not os.listdir(args.workdir):
            shutil.rmtree(args.workdir, ignore_errors=True)
        raise
    print(f"done: run in {os.path.abspath(args.workdir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
