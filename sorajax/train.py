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
    kw = dict(frames=d.frames, height=d.height, width=d.width, num_train=d.num_train,
              num_eval=d.num_eval, seed=d.seed, min_objects=d.min_objects, max_objects=d.max_objects,
              occluder_prob=d.occluder_prob, two_tone_prob=d.two_tone_prob)
    if jax.process_index() == 0:  # multi-process: only process 0 builds (train_and_evaluate syncs)
        try:
            builders.build_world(d.data_dir, **kw)
        except OSError as e:  # an unwritable or odd data_dir: one line, not a traceback
            raise UserError(f"data.data_dir={d.data_dir!r}: cannot build the dataset there "
                            f"({e.strerror or e})") from None
    return builders.load_source(d.data_dir, split, **kw)


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

        def loss_fn(params, batch, key):
            model = nnx.merge(self.graphdef, params, state["frozen"])
            return self.stage.loss(model, batch, key)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        accum = int(self.stage.tcfg.get("grad_accum", 1) or 1)
        if accum == 1:
            (loss, aux), grads = grad_fn(state["params"], batch, key)
        else:
            # Gradient accumulation: micro-batch i takes rows i, i+k, i+2k... so that each
            # device's rows stay on that device (no resharding); mean of k micro-steps.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                i, mb = xs
                out = grad_fn(state["params"], mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, out), None

            zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro), key))
            total, _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro))
            (loss, aux), grads = jax.tree.map(lambda x: x / accum, total)
        # Fault injection (tests only; empty by default, and then not even traced): the gradients
        # of the listed steps (numbered as in metrics.jsonl, 1-based) are multiplied by NaN.
        inject = tuple(int(s) for s in (self.stage.tcfg.get("inject_nonfinite_steps", ()) or ()))
        if inject:
            bad = jnp.isin(step + 1, jnp.asarray(inject, jnp.int32))
            grads = jax.tree.map(lambda g: g * jnp.where(bad, jnp.nan, 1.0).astype(g.dtype), grads)
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
                   "skipped": (~ok).astype(jnp.int32),
                   "nonfinite_in_a_row": new_state["train"]["nonfinite_in_a_row"],
                   "nonfinite_total": new_state["train"]["nonfinite_total"], **aux}
        return new_state, metrics

    def step_fn(self):
        if self._step is None:
            rep = sharding.replicated(self.mesh)
            def traced(state, batch):  # activation shardings follow the config's rules
                with sharding.activation_rules(self.mesh, self.rules):
                    return self._step_fn(state, batch)

            self._step = jax.jit(
                traced,
                in_shardings=(self.shardings, None),
                out_shardings=(self.shardings, rep),
                donate_argnums=(0,),
            )
        return self._step


# ==============================================================================================
# The loop.
# ==============================================================================================
class _Stop:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit 0.

    Multi-process: the processes must stop at the same step (the save is collective), but a
    signal reaches each at a different moment; `agree()`, called by all once per step, makes
    `requested` true everywhere as soon as any process has been signalled."""

    def __init__(self):
        self.signalled = False
        self._agreed = False
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signalled if jax.process_count() == 1 else self._agreed

    def agree(self):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray(self.signalled, np.int32))
            self._agreed = bool(np.any(flags))

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signalled = True
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
            try:  # a line cut short by a kill -9 is dropped; a kept line always ends the line
                if json.loads(line).get("step", 0) <= upto_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, AttributeError):
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
    # Batch sizes were checked against the mesh and processes in validate_mesh (before compiling).
    source = world_source(config, "train")
    if hasattr(stage, "wrap_source"):
        source = stage.wrap_source(source, trainer, mesh)
    # Every process walks the same global batches and reads only the rows its devices hold, so
    # the data at each step does not depend on the process count or the mesh (and neither does
    # the iterator state saved with checkpoints).
    rows = sharding.process_batch_rows(mesh, trainer.rules, tcfg.batch_size)
    it = pipeline.make_iterator(source, batch_size=tcfg.batch_size,
                                seed=config.seed + (0 if stage.name == "vae" else 17),
                                transform=transform, rows=rows)

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
    if jax.process_index() == 0:
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

    def nonfinite_stop(bad_run, step):
        bar.close()
        ckpt.wait()  # a save in flight finishes: it holds the last good state
        last = ckpt.latest_step()
        ckpt.close()
        kept = f"{ckpt.directory}/{last}" if last is not None else f"none written yet in {ckpt.directory}"
        raise FloatingPointError(
            f"{stage.name}: {bad_run} non-finite losses/gradients in a row at step {step} "
            f"(train.max_nonfinite_in_a_row={max_bad}); stopped; last good checkpoint: {kept}")

    with _Stop() as stop:
        while step < total:
            local = next(it)
            batch = sharding.global_batch(stage.local_batch(local), mesh, trainer.rules,
                                          batch_size=tcfg.batch_size)
            state, m = step_fn(state, batch)
            step += 1
            stop.agree()
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
                    nonfinite_stop(bad_run, step)
            bar.update(1)
            if step % tcfg.ckpt_every == 0 or step == total or stop.requested:
                # No checkpoint inside a run of skipped (non-finite) steps: the one written before
                # the run began is the last good one that a stop keeps (the skipped steps left the
                # weights as they were, so nothing is lost). A preemption or the last step saves.
                bad_run = int(jax.device_get(state["train"]["nonfinite_in_a_row"]))
                if bad_run >= max_bad:
                    nonfinite_stop(bad_run, step)
                if bad_run and step != total and not stop.requested:
                    print(f"[{stage.name}] step {step}: {bad_run} non-finite step(s) in a row; "
                          f"not checkpointing until an update succeeds", flush=True)
                else:
                    save(step, force=stop.requested)
            if stop.requested:
                ckpt.close()
                bar.close()
                print(f"[{stage.name}] stopped at step {step}; checkpoint saved in {ckpt.directory}",
                      flush=True)
                raise SystemExit(0)
    bar.close()
    ckpt.close()
    if on_end is not None and tcfg.get("sample_at_end", True):
        if jax.process_count() == 1:
            on_end(state, trainer, writer, step)
        elif jax.process_index() == 0:  # the sampler runs single-process (one host's devices)
            print(f"[{stage.name}] multi-process run: skipping end-of-training samples; run "
                  f"`python -m sorajax.sample --workdir {os.path.dirname(ckpt.directory)} ...` "
                  f"on one host", flush=True)
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
def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(v)


def validate(config):
    """Checks a config before anything is built or compiled. Raises UserError with one line
    naming the field, its value and what is allowed."""
    from sorajax.models import video

    def need(ok, field, value, allowed):
        if not ok:
            raise UserError(f"{field}={value!r}: {allowed}")

    stages = config.get("stages")
    need(isinstance(stages, (tuple, list)) and len(stages) > 0
         and all(s in ("vae", "dit") for s in stages), "stages", stages,
         "must be a non-empty tuple of 'vae' and/or 'dit', e.g. ('vae', 'dit')")
    need(_is_int(config.get("seed")) and config.seed >= 0, "seed", config.get("seed"),
         "must be an integer >= 0")
    d = config.data
    for k in ("frames", "height", "width", "num_train"):
        need(_is_int(d.get(k)) and d[k] >= 1, f"data.{k}", d.get(k), "must be an integer >= 1")
    vae_cfg, dit_cfg, _ = video.model_configs(config)  # UserError on unknown variants/overrides
    rt, rs = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    need((d.frames - 1) % rt == 0, "data.frames", d.frames,
         f"the causal VAE takes 1 + {rt}k frames ({', '.join(str(1 + rt * i) for i in range(4))}, ...)")
    pt, ph, pw = dit_cfg.patch_size if "dit" in stages else (1, 1, 1)
    for k, p in (("height", ph), ("width", pw)):
        need(d[k] % (rs * p) == 0, f"data.{k}", d[k],
             f"must be divisible by {rs * p} (VAE spatial compression {rs} x DiT patch {p})")
    need((1 + (d.frames - 1) // rt) % pt == 0, "data.frames", d.frames,
         f"gives {1 + (d.frames - 1) // rt} latent frames, not divisible by the DiT temporal patch {pt}")
    for stage in stages:
        name = "vae_train" if stage == "vae" else "train"
        t = config[name]
        need(_is_int(t.get("steps")) and t.steps >= 0, f"{name}.steps", t.get("steps"), "must be an integer >= 0")
        for k in ("batch_size", "log_every", "ckpt_every"):
            need(_is_int(t.get(k)) and t[k] >= 1, f"{name}.{k}", t.get(k), "must be an integer >= 1")
        need(_is_int(t.get("grad_accum", 1)) and t.get("grad_accum", 1) >= 1, f"{name}.grad_accum",
             t.get("grad_accum"), "must be an integer >= 1")
        need(t.batch_size <= d.num_train, f"{name}.batch_size", t.batch_size,
             f"must be <= data.num_train={d.num_train} (incomplete batches are dropped)")
        need(_is_num(t.get("lr")) and t.lr >= 0, f"{name}.lr", t.get("lr"), "must be a finite number >= 0")
        need(_is_int(t.get("warmup_steps", 0)) and t.get("warmup_steps", 0) >= 0, f"{name}.warmup_steps",
             t.get("warmup_steps"), "must be an integer >= 0")
        for k, hi in (("b1", "1)"), ("b2", "1)"), ("ema_decay", "1]"), ("text_dropout", "1]")):
            if k in t:
                need(_is_num(t[k]) and 0 <= t[k] and (t[k] < 1 or hi == "1]" and t[k] == 1),
                     f"{name}.{k}", t[k], f"must be in [0, {hi}")
        for k in ("weight_decay", "kl_weight", "fg_weight"):
            if k in t:
                need(_is_num(t[k]) and t[k] >= 0, f"{name}.{k}", t[k], "must be a finite number >= 0")
        if "grad_clip" in t:
            need(_is_num(t.grad_clip) and t.grad_clip > 0, f"{name}.grad_clip", t.grad_clip, "must be > 0")
        inj = t.get("inject_nonfinite_steps", ()) or ()
        need(isinstance(inj, (tuple, list)) and all(_is_int(x) for x in inj),
             f"{name}.inject_nonfinite_steps", inj, "must be a tuple of step numbers (testing knob)")
        if stage == "vae":
            n = t.get("clip_frames", 0) or 0
            need(_is_int(n) and n >= 0 and (n == 0 or ((n - 1) % rt == 0 and n <= d.frames)),
                 "vae_train.clip_frames", n, f"must be 0 (all frames) or 1 + {rt}k <= data.frames={d.frames}")
    tr = config.train
    for k in ("max_nonfinite_in_a_row", "keep_checkpoints"):
        if k in tr:
            need(_is_int(tr[k]) and tr[k] >= 1, f"train.{k}", tr[k], "must be an integer >= 1")
    if "dit" in stages:
        need(_is_int(config.text.get("max_length")) and config.text.max_length >= 2, "text.max_length",
             config.text.get("max_length"), "must be an integer >= 2 (tokens and </s>)")
        f = config.flow
        need(_is_num(f.get("shift")) and f.shift > 0, "flow.shift", f.get("shift"), "must be > 0")
        need(_is_num(f.get("logit_std")) and f.logit_std > 0, "flow.logit_std", f.get("logit_std"), "must be > 0")
        need(_is_num(f.get("logit_mean")), "flow.logit_mean", f.get("logit_mean"), "must be a finite number")
    for k, v in config.mesh.items():
        need(_is_int(v) and (v >= 1 or v == -1), f"mesh.{k}", v, "must be a positive integer or -1 (fill)")
    rules = config.get("sharding_rules")
    try:
        sharding.normalize_rules(rules)  # UserError on unknown names
    except (TypeError, ValueError) as e:
        raise UserError(f"sharding_rules={rules!r}: must be None or a list of (logical axis, mesh axis "
                        f"| tuple of mesh axes | None) pairs ({e})") from None
    tok = config.text.get("tokenizer") if "dit" in stages and not config.get("init_from") else None
    if tok:
        need(isinstance(tok, str) and os.path.exists(tok), "text.tokenizer", tok,
             "must be an existing spiece.model / tokenizer.json, or a folder holding one")
    elif "dit" in stages and not config.get("init_from"):  # a vocabulary is trained on the captions
        v = config.text.get("vocab_size")
        need(_is_int(v) and v >= 1, "text.vocab_size", v, "must be an integer >= 1 (an upper bound; "
             "sentencepiece needs at least the captions' characters + 3)")


def validate_mesh(config, mesh):
    """Checks the batch sizes against the mesh (before any compile): one line, UserError."""
    rules = sharding.normalize_rules(config.get("sharding_rules"))
    dp = sharding.data_parallel_size(mesh, rules)
    nproc = jax.process_count()
    shape = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
    for stage in config.stages:
        name = "vae_train" if stage == "vae" else "train"
        b = int(config[name].batch_size)
        accum = int(config[name].get("grad_accum", 1) or 1)
        if b % (dp * accum) or b % nproc:
            raise UserError(
                f"{name}.batch_size={b}: must be a multiple of {dp * accum} (the {dp} data-parallel "
                f"devices of the mesh ({shape}) x grad_accum={accum})"
                + (f" and of the {nproc} processes" if nproc > 1 else ""))


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
    mesh = sharding.make_mesh(config.mesh)  # UserError when the axis sizes do not fit the devices
    validate_mesh(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    if jax.process_count() > 1:  # process 0 builds the dataset; the others wait, then read it
        if jax.process_index() == 0:
            world_source(config, "train")
        sharding.sync("sorajax:world_built")
    out = None
    if "vae" in config.stages:
        vstage = VAEStage(config, workdir)
        if not _stage_done(vstage.workdir, config.vae_train.steps):
            run_stage(vstage, config, mesh)
        else:
            print(f"[vae] already trained ({vstage.workdir}); skipping", flush=True)
    if "dit" in config.stages:
        tok_path = ensure_tokenizer(config, workdir)
        try:
            tokenizer = tok_lib.Tokenizer.load(tok_path)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"tokenizer {tok_path!r} cannot be loaded: {e}") from None
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

    # Multi-process: process 0 writes, every process waits at the barrier, then all read it.
    if config.get("init_from"):  # fine-tuning: the imported model's tokenizer, kept with the run
        dst = os.path.join(workdir, "tokenizer")
        if jax.process_index() == 0 and not os.path.isdir(dst):
            shutil.copytree(os.path.join(config.init_from, "tokenizer"), dst + ".tmp", dirs_exist_ok=True)
            os.replace(dst + ".tmp", dst)
        sharding.sync("sorajax:tokenizer")
        return dst
    if config.text.get("tokenizer"):
        return config.text.tokenizer
    path = os.path.join(workdir, "tokenizer", "spiece.model")
    if jax.process_index() == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        caps = all_captions(world_source(config, "train"))
        try:
            tok_lib.train_tokenizer(caps, path, config.text.vocab_size)
        except RuntimeError as e:  # sentencepiece: e.g. fewer pieces than the captions' characters
            why = (str(e).split("] ", 1)[-1].strip().splitlines() or [str(e).strip()])[0]
            raise UserError(f"text.vocab_size={config.text.vocab_size}: sentencepiece cannot train "
                            f"this vocabulary ({why})") from None
    sharding.sync("sorajax:tokenizer")
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
    rules = sharding.normalize_rules(config.get("sharding_rules"))

    def encode(st, x):  # traced under the rules: the VAE's activations are row-sharded (context)
        with sharding.activation_rules(mesh, rules):
            return nnx.merge(graphdef, st).encode(x)[0]

    # Replicated output: readable by every process of a multi-process run.
    enc = jax.jit(encode, out_shardings=sharding.replicated(mesh))
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


def _has_checkpoints(workdir) -> bool:
    for d, dirs, _ in os.walk(workdir):
        if os.path.basename(d) == "checkpoints" and any(x.isdigit() for x in dirs):
            return True
    return False


def _check_workdir(workdir):
    if "://" in workdir:  # os.makedirs("gs://b/r") would make a local ./gs:/b/r and lose the run
        raise UserError(f"--workdir {workdir!r}: URLs are not supported; mount the bucket (e.g. gcsfuse) "
                        "and pass the mounted path (docs/RELIABILITY.md)")
    if not workdir.strip():
        raise UserError("--workdir '': give a directory")
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
        # Bad input found before any checkpoint: the workdir this command created (config.json,
        # empty logs) goes too. A run that checkpointed keeps everything.
        if not existed and jax.process_index() == 0 and not _has_checkpoints(args.workdir):
            shutil.rmtree(args.workdir, ignore_errors=True)
        raise
    print(f"done: run in {os.path.abspath(args.workdir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
