"""Training stages: what one stage trains, on what data, with which loss.

`train.run_stage` drives any `Stage` with one loop (sharded state, jitted step, checkpoints,
metrics). A stage says, through the abstract methods below, which model it builds, which of its
parameters train, its loss, and its data; the optional hooks cover the rest (per-example text
encoding, fresh-run initialisation, work at the end). Stages shipped:

  "vae": the causal video VAE on pixels (reconstruction + KL), into RUN/vae;
  "dit": the DiT (and a toy text encoder) with rectified flow on the frozen VAE's latents, into RUN.

A new stage (e.g. a distillation stage) is a subclass, an entry in STAGES and a section
`NAME_train` declared in sorajax/config_base.py.
"""
from __future__ import annotations

import abc
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sorajax import checkpoint as ckpt_lib
from sorajax import conditioning, config_base, evaluate, flops, flow, inference, latents, packing, sharding, video_io
from sorajax import tokenizer as tok_lib
from sorajax.data import builders, pipeline, shapes
from sorajax.errors import RunFailed, UserError
from sorajax.models import video
from sorajax.models.vae import WanVAE, latent_shape
from sorajax.train_state import Trainer


class Stage(abc.ABC):
    """One training stage. `tcfg` is its config section (config_base.STAGE_SECTIONS)."""

    name: str  # "vae", "dit", ...: the key in config.stages
    data_seed_offset: int = 0  # data order seed = config.seed + this

    def __init__(self, config, run_dir: str):
        self.config = config
        self.run_dir = run_dir
        self.section = config_base.STAGE_SECTIONS[self.name]
        self.tcfg = config[self.section]

    # -- what every stage must say -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def workdir(self) -> str:
        """Where this stage's checkpoints, metrics.jsonl and TensorBoard events go."""

    @abc.abstractmethod
    def build(self, rngs: nnx.Rngs) -> nnx.Module:
        """The model (all of it: trained and frozen parts)."""

    @abc.abstractmethod
    def trainable(self):
        """NNX filter of the parameters this stage trains; the rest of the model is frozen."""

    @abc.abstractmethod
    def loss(self, model, batch: dict, key) -> tuple[jax.Array, dict]:
        """(scalar loss, aux metrics) of a global batch; traced inside the jitted step."""

    @abc.abstractmethod
    def source(self, mesh):
        """Random-access training examples (len() and [i]) for the Grain pipeline."""

    # -- optional hooks --------------------------------------------------------------------------
    def iterator(self, mesh, rows, *, seed: int):
        """The checkpointable iterator of this process's `rows` of every global batch: by
        default, batches of source() examples through transform() (data/pipeline.py)."""
        return pipeline.make_iterator(self.source(mesh), batch_size=self.tcfg.batch_size, seed=seed,
                                      transform=self.transform, rows=rows)

    def transform(self, example: dict) -> dict:
        """Per example, before batching (host side)."""
        return example

    def local_batch(self, batch: dict) -> dict:
        """This process's rows of a batch, before they become a global array."""
        return batch

    def prepare(self, mesh) -> None:
        """Work before the trainer is built (every run, resumed or not, finished or not)."""

    def init_state(self, state: dict, trainer: Trainer, mesh) -> dict:
        """A fresh run's state (not called on resume): e.g. load pretrained or frozen weights."""
        return state

    def loaded_modules(self) -> frozenset[str]:
        """Top-level sub-modules whose weights init_state overwrites ("*": all of them). The
        trainer initialises those as zeros, so XLA drops their random initialisers (a VAE's
        initialisers alone are seconds of compile time on CPU)."""
        return frozenset()

    def meta(self) -> dict:
        """JSON metadata saved with every checkpoint."""
        return {}

    def eval_every(self) -> int:
        """Steps between in-training evaluations (0: none); see evaluate()."""
        return 0

    def host_metrics(self, step: int) -> dict[str, float]:
        """Host-side figures joined to each logged row (e.g. the data's packing efficiency)."""
        return {}

    def evaluate(self, state: dict, trainer: Trainer, step: int) -> dict[str, float]:
        """Metrics of the current state, logged with the step's row (keys "eval/...")."""
        return {}

    def step_flops(self) -> float | None:
        """Model FLOPs of one optimizer step on the global batch (sorajax.flops; for the MFU the
        trainer logs), or None when this stage has no count."""
        return None

    def on_end(self, state: dict, trainer: Trainer, writer, step: int) -> None:
        """After the last step's checkpoint, on every process."""


def stage_done(stage: Stage) -> bool:
    steps = ckpt_lib.list_steps(os.path.join(stage.workdir, "checkpoints"))
    return bool(steps) and steps[-1] >= stage.tcfg.steps


# ==============================================================================================
# VAE.
# ==============================================================================================
class VAEStage(Stage):
    name = "vae"

    def __init__(self, config, run_dir):
        super().__init__(config, run_dir)
        self.vae_cfg, _, _ = video.model_configs(config)

    @property
    def workdir(self):
        return os.path.join(self.run_dir, "vae")

    def build(self, rngs):
        return WanVAE(self.vae_cfg, rngs=rngs)

    def trainable(self):
        return nnx.Param

    def source(self, mesh):
        return builders.source(self.config.data, "train", build=False)

    def train_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) the VAE trains on: data.frames x height x width, or with native
        shapes (data.aspect_ratios) the shortest duration (or clip_frames) at the smallest native
        height and width, cut from the centre of every clip (a fully convolutional VAE learns the
        same from crops; images become still clips)."""
        d = self.config.data
        native = shapes.native_settings(d)
        if native is None:
            return int(self.tcfg.clip_frames) or int(d.frames), int(d.height), int(d.width)
        sizes = shapes.all_sizes(native, d.height, d.width)
        return (int(self.tcfg.clip_frames) or min(native["durations"]),
                min(h for h, _ in sizes), min(w for _, w in sizes))

    def transform(self, example):
        if shapes.native_settings(self.config.data) is None:
            return example
        T, H, W = self.train_shape()
        f = example["frames"]  # (t, h, w, 3)
        if f.shape[0] < T:
            f = np.concatenate([f] * -(-T // f.shape[0]))
        y, x = (f.shape[1] - H) // 2, (f.shape[2] - W) // 2
        return dict(example, frames=np.ascontiguousarray(f[:T, y:y + H, x:x + W]))

    def local_batch(self, batch):
        """Optionally trains on the first `clip_frames` frames: a causal VAE trained on 1 + r
        frames already sees the cached-chunk path every later chunk takes, at a fraction of the
        cost."""
        n = int(self.tcfg.clip_frames)
        if n and batch["frames"].shape[1] > n:
            batch = dict(batch, frames=batch["frames"][:, :n])
        return batch

    def step_flops(self):
        """Encode + decode of the batch's clips, forward and backward (3x the forward)."""
        n, h, w = self.train_shape()
        fwd = flops.vae_encode_flops(self.vae_cfg, n, h, w) + flops.vae_decode_flops(self.vae_cfg, n, h, w)
        return 3.0 * int(self.tcfg.batch_size) * fwd

    def loss(self, model, batch, key):
        x = batch["frames"]  # (B, T, H, W, 3) in [-1, 1]
        mean, logvar = model.encode(x)  # (B, t, h, w, z)
        if self.tcfg.sample_posterior:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        else:  # deterministic autoencoder (toy runs: learns far faster on CPU budgets)
            z = mean
        rec = model.decode(z, clip=False)  # (B, T, H, W, 3)
        # Foreground emphasis: pixels far from the clip's background colour (its per-channel
        # median) weigh 1 + fg_weight. Small objects are a few percent of the pixels, and their
        # colour is what text conditioning needs the latents to keep.
        fgw = float(self.tcfg.fg_weight)
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


def vae_provenance(config, run_dir) -> str:
    """Names the frozen VAE's weights (for the latent cache) without loading them: the real path
    of its newest checkpoint, so runs whose `vae` folder links to one VAE (the experiment runner's
    arms and seeds) name the same weights and share one latent cache."""
    if config.init_from:
        return f"init_from:{os.path.realpath(config.init_from)}"
    ckdir = os.path.join(VAEStage(config, run_dir).workdir, "checkpoints")
    steps = ckpt_lib.list_steps(ckdir)
    return f"{os.path.realpath(ckdir)}/{steps[-1] if steps else 'none'}"


def load_vae_state(config, run_dir, mesh):
    """(graphdef, state) of the frozen VAE: from `init_from` when fine-tuning, else from the VAE
    stage's newest good checkpoint."""
    if config.init_from:
        return nnx.split(load_init_model(config, mesh).vae)
    vstage = VAEStage(config, run_dir)
    ck = ckpt_lib.Checkpointer(os.path.join(vstage.workdir, "checkpoints"))
    vtrainer = Trainer(vstage, config, mesh)
    target = vtrainer.abstract_target()
    got = ck.restore_latest_good({"model": {"params": target["params"], "frozen": target["frozen"]}})
    ck.close()
    if got is None:
        raise UserError(f"no VAE checkpoint in {vstage.workdir}: run the 'vae' stage first")
    return nnx.split(nnx.merge(vtrainer.graphdef, got[1]["model"]["params"], got[1]["model"]["frozen"]))


def load_init_model(config, mesh):
    """The model of `config.init_from` (a converted or trained checkpoint dir), for fine-tuning."""
    return inference.load_model(config.init_from, use_ema=True, mesh_cfg=config.mesh,
                                flag="init_from")[1]


# ==============================================================================================
# DiT (+ toy text encoder) on the frozen VAE's latents.
# ==============================================================================================
def ensure_tokenizer(config, run_dir) -> str:
    """The run's tokenizer path: the imported model's (fine-tuning; copied into the run), the
    configured one, or a sentencepiece vocabulary trained once on the training captions.
    Multi-process: process 0 writes, every process waits at the barrier, then all read it."""
    if config.init_from:
        dst = os.path.join(run_dir, "tokenizer")
        if jax.process_index() == 0 and not os.path.isdir(dst):
            shutil.copytree(os.path.join(config.init_from, "tokenizer"), dst + ".tmp", dirs_exist_ok=True)
            os.replace(dst + ".tmp", dst)
        sharding.sync("sorajax:tokenizer")
        return dst
    if config.text.tokenizer:
        return config.text.tokenizer
    path = os.path.join(run_dir, "tokenizer", "spiece.model")
    if jax.process_index() == 0 and not os.path.exists(path):
        src = (latents.LatentCache(config.data.dir) if config.data.source == "latents"
               else builders.source(config.data, "train", build=False))
        caps = builders.captions(src)
        try:
            tok_lib.train_tokenizer(caps, path, config.text.vocab_size)
        except RuntimeError as e:  # sentencepiece: e.g. fewer pieces than the captions' characters
            why = (str(e).split("] ", 1)[-1].strip().splitlines() or [str(e).strip()])[0]
            raise UserError(f"text.vocab_size={config.text.vocab_size}: sentencepiece cannot train "
                            f"this vocabulary ({why})") from None
    sharding.sync("sorajax:tokenizer")
    return path


def load_tokenizer(path: str) -> tok_lib.Tokenizer:
    try:
        return tok_lib.Tokenizer.load(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"tokenizer {path!r} cannot be loaded: {e}") from None


def conditioned_flow_loss(model, x0, noise, sigma, fmask, ctx, patch_size, start=None, weight=None):
    """The flow loss of clips (B, t, h, w, z) whose latent frames `fmask` (B, t) are given: those
    are the model's input as they are (clean, per-token noise level 0), the others are noised to
    `sigma` (B,); the velocity error is averaged over the generated frames only (with `weight`,
    e.g. flow.motion_weight, a weighted mean)."""
    _, ph, pw = patch_size
    fm = fmask[:, :, None, None, None]
    xt = jnp.where(fm, x0, flow.add_noise(x0, noise, sigma))
    per_frame = (x0.shape[2] // ph) * (x0.shape[3] // pw)
    v = model.velocity(xt, conditioning.token_levels(sigma, fmask, per_frame), ctx, start=start)
    keep = (~fm).astype(jnp.float32)
    return flow.flow_loss(v, flow.velocity_target(x0, noise), keep if weight is None else keep * weight)


class DiTStage(Stage):
    name = "dit"
    data_seed_offset = 17

    def __init__(self, config, run_dir, tokenizer: tok_lib.Tokenizer, tokenizer_path: str = ""):
        super().__init__(config, run_dir)
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        vocab = tokenizer.vocab_size if config.text.vocab_from_tokenizer else None
        self.cfgs = video.model_configs(config, vocab_size=vocab)
        empty_ids, empty_mask = tokenizer.encode([""], config.text.max_length)[:2]
        self.empty_ids = np.asarray(empty_ids)[0]
        self.empty_mask = np.asarray(empty_mask)[0]
        self.latent_source = None  # latents.LatentCache once prepare() ran
        self._max_frames = 1  # packing: the most latent frames of a clip (set by prepare)
        self._plan = None  # packing / bucketing: the PackPlan / BucketPlan of the iterator
        self._mesh = None

    @property
    def workdir(self):
        return self.run_dir

    def prepare(self, mesh) -> None:
        """(In-training evaluation needs one process: the sampler runs on one host.) The latent
        cache the DiT trains from: data.source='latents' names one (built by
        `python -m sorajax.cache_latents` with this run's frozen VAE), else with
        vae.precompute_latents the training clips are encoded once into RUN/latents (streamed,
        resumable: sorajax/latents.py). With vae.normalize_latents its per-channel statistics
        become the VAE's latents_mean/std, so the DiT sees unit-scale data."""
        config = self.config
        self._mesh = mesh
        if self.tcfg.eval_every and jax.process_count() > 1:
            raise UserError(f"{self.section}.eval_every={self.tcfg.eval_every}: in-training evaluation "
                            "samples on one host; set it to 0 for a multi-process run and evaluate "
                            "checkpoints with `python -m sorajax.evaluate --workdir RUN`")
        if config.data.source == "latents":
            self.latent_source = latents.LatentCache(config.data.dir)
            want, got = vae_provenance(config, self.run_dir), self.latent_source.meta["fingerprint"]["vae"]
            if got != want:
                raise UserError(f"data.dir={config.data.dir!r}: its latents were made by the VAE "
                                f"{got!r}, but this run's frozen VAE is {want!r}; cache again with "
                                "`python -m sorajax.cache_latents` and this config")
        elif config.vae.precompute_latents:
            self.latent_source = latents.build(
                config, builders.source(config.data, "train", build=False), mesh,
                os.path.join(self.run_dir, "latents"),
                vae_provenance=vae_provenance(config, self.run_dir),
                load_vae=lambda: load_vae_state(config, self.run_dir, mesh))
        else:
            return
        if config.vae.normalize_latents:
            mean = tuple(float(v) for v in self.latent_source.mean)
            std = tuple(float(v) for v in self.latent_source.std)
            with config.unlocked():
                config.vae.overrides = dict(config.vae.overrides, latents_mean=mean, latents_std=std)
                config.vae.normalize_latents = False  # done: the stats now live in the config
        ov = config.vae.overrides
        if "latents_mean" in ov and "latents_std" in ov:
            self.latent_source.normalize(np.asarray(ov["latents_mean"], np.float32),
                                         np.asarray(ov["latents_std"], np.float32))
        if self.packed():
            self._max_frames = self._pack_budget(self.latent_source)[2]
        elif self.tcfg.packing == "none" and self.latent_source.native:
            raise UserError(f"the latent cache at {self.latent_source.directory!r} holds clips of "
                            f"different shapes: train it with {self.section}.packing='pack' (or 'bucket')")

    def build(self, rngs):
        return video.VideoModel(*self.cfgs, rngs=rngs)

    def trainable(self):
        return video.trainable_filter(self.config)

    def source(self, mesh):
        if self.latent_source is not None:
            return self.latent_source
        return builders.source(self.config.data, "train", build=False)

    # -- packing (dit_train.packing="pack": sorajax/packing.py) ---------------------------------
    def packed(self) -> bool:
        return self.tcfg.packing == "pack"

    def _buckets(self, src, mesh) -> tuple[dict, dict]:
        """Bucketing: (tokens per shape, global batch per shape) for the latent cache `src`: about
        batch_size x pack_tokens tokens per batch (pack_tokens 0: the largest clip's)."""
        patch = self.cfgs[1].patch_size
        tokens_of = {tuple(s): packing.clip_tokens(s, patch) for s in src.clip_shapes}
        target = int(self.tcfg.batch_size) * (int(self.tcfg.pack_tokens) or max(tokens_of.values()))
        dp = sharding.data_parallel_size(mesh, sharding.normalize_rules(self.config.sharding_rules))
        return tokens_of, packing.bucket_batch_sizes(tokens_of, target, dp * int(self.tcfg.grad_accum))

    def _pack_budget(self, src) -> tuple[packing.Budget, list[int], int]:
        """(budget, tokens per clip, most latent frames of a clip) of the latent cache `src`."""
        patch = self.cfgs[1].patch_size
        shapes = src.clip_shapes
        sizes = [packing.clip_tokens(s, patch) for s in shapes]
        # pack_tokens 0: the largest clip, rounded up so the context-parallel devices split a row.
        cp = 1 if self._mesh is None else sharding.axis_size(
            self._mesh, sharding.normalize_rules(self.config.sharding_rules), "length")
        tokens = int(self.tcfg.pack_tokens) or packing.token_budget(max(sizes), cp)
        budget = packing.Budget(rows=int(self.tcfg.batch_size), tokens=tokens, max_clips=int(self.tcfg.pack_clips))
        return budget, sizes, max(int(s[0]) // patch[0] for s in shapes)

    def iterator(self, mesh, rows, *, seed):
        if self.tcfg.packing == "bucket":
            src, self._mesh = self.source(mesh), mesh
            _, batch_of = self._buckets(src, mesh)
            try:
                self._plan = packing.BucketPlan(src.clip_shapes, batch_of, seed=seed)
            except ValueError as e:
                raise UserError(f"{self.section}.packing='bucket': {e}") from None
            rules = sharding.normalize_rules(self.config.sharding_rules)
            return pipeline.make_bucket_iterator(src, self._plan, transform=self.transform,
                                                 rows_of=lambda b: sharding.process_batch_rows(mesh, rules, b))
        if not self.packed():
            return super().iterator(mesh, rows, seed=seed)
        src = self.source(mesh)
        budget, sizes, _ = self._pack_budget(src)
        try:
            plan = self._plan = packing.PackPlan(packing.Packer(sizes, budget, seed=seed))
        except ValueError as e:
            raise UserError(f"{self.section}.pack_tokens={self.tcfg.pack_tokens}: {e}") from None
        patch, L = self.cfgs[1].patch_size, int(self.config.text.max_length)
        pack_fn = lambda exs: packing.pack(exs, budget.tokens, budget.max_clips, patch,
                                           self.empty_ids[:L], self.empty_mask[:L])
        return pipeline.make_packed_iterator(src, plan, rows=rows, transform=self.transform, pack_fn=pack_fn)

    def transform(self, example):
        ids, mask = self.tokenizer.encode([builders.decode_text(example["caption"])],
                                          self.config.text.max_length)[:2]
        example["ids"] = np.asarray(ids, np.int32)[0]
        example["mask"] = np.asarray(mask, np.int32)[0]
        return example

    def loss(self, model, batch, key):
        if self.packed():
            rates = conditioning.rates(self.tcfg) if conditioning.enabled(self.tcfg) else None
            return packing.packed_flow_loss(
                model, batch, key, flow_cfg=self.config.flow, text_dropout=float(self.tcfg.text_dropout),
                empty_ids=self.empty_ids, empty_mask=self.empty_mask, cond_rates=rates,
                max_frames=self._max_frames)
        k_drop, k_sigma, k_noise = jax.random.split(key, 3)
        if "latents" in batch:  # precomputed by the frozen VAE (prepare)
            x0 = batch["latents"]  # (B, t, h, w, z)
        else:
            x0 = jax.lax.stop_gradient(model.encode_video(batch["frames"]))  # (B, t, h, w, z)
        b = x0.shape[0]
        x0, start = self._window(x0, jax.random.fold_in(key, 2))
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
        mw = float(self.tcfg.motion_weight)
        weight = flow.motion_weight(x0, mw) if mw else None
        if not conditioning.enabled(self.tcfg):
            v = model.velocity(xt, sigma, ctx, start=start)
            return flow.flow_loss(v, flow.velocity_target(x0, noise), weight), {}
        # Conditioning masks (dit_train.cond_rates): the given latent frames stay clean at noise
        # level 0 (per-token timesteps) and the loss covers only the generated frames.
        fmask = conditioning.sample_masks(jax.random.fold_in(key, 1), b, x0.shape[1], conditioning.rates(self.tcfg))
        loss = conditioned_flow_loss(model, x0, noise, sigma, fmask, ctx, self.cfgs[1].patch_size, start,
                                     weight)
        return loss, {"cond_frac": jnp.mean(fmask.astype(jnp.float32))}

    def _window(self, x0, key):
        """dit_train.clip_frames: each clip's latents (B, t, ...) cut to the window's latent frames
        at a random start per clip -> (windows, (B,) bool: the window begins at the clip's
        one-frame first latent, as text-to-video and i2v windows do; the DiT's start_embedding
        tells the two kinds apart)."""
        vae_cfg = self.cfgs[0]
        w = 1 + (video.window_frames(self.config) - 1) // vae_cfg.temporal_stride
        t = x0.shape[1]
        if w >= t:
            return x0, jnp.ones((x0.shape[0],), bool)
        offset = jax.random.randint(key, (x0.shape[0],), 0, t - w + 1)
        return jax.vmap(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, w, axis=0))(x0, offset), offset == 0

    def step_flops(self):
        """DiT forward + backward on its window, the text encoder (backward too when trained),
        and the frozen VAE's encode of whole clips when latents are not precomputed
        (flops.dit_train_step_flops). Packed: each row as computed -- pack_tokens tokens against
        pack_clips captions, padding and the masked cross-clip attention included."""
        vae_cfg, dit_cfg, text_cfg = self.cfgs
        d, b = self.config.data, int(self.tcfg.batch_size)
        L, tmul = int(self.config.text.max_length), 3.0 if self.config.text.trainable else 1.0
        if self.packed() and self.latent_source is not None:
            budget, _, _ = self._pack_budget(self.latent_source)
            K = budget.max_clips
            return b * (3.0 * flops.dit_forward_flops(dit_cfg, budget.tokens, K * L) +
                        tmul * K * flops.text_forward_flops(text_cfg, L))
        if self.tcfg.packing == "bucket" and isinstance(self._plan, packing.BucketPlan):
            # The mean step: every bucket's batch weighted by how many batches it has per epoch.
            tokens_of, batch_of = self._buckets(self.latent_source, self._mesh)
            per_batch = {k: batch_of[k] * (3.0 * flops.dit_forward_flops(dit_cfg, n, L) +
                                           tmul * flops.text_forward_flops(text_cfg, L))
                         for k, n in tokens_of.items()}
            count = {k: len(v) // batch_of[k] for k, v in self._plan.buckets.items()}
            return sum(per_batch[k] * c for k, c in count.items()) / max(sum(count.values()), 1)
        shape = latent_shape(vae_cfg, video.window_frames(self.config), int(d.height), int(d.width))[:3]  # (t, h, w)
        total = flops.dit_train_step_flops(dit_cfg, text_cfg, b, shape, int(self.config.text.max_length),
                                           bool(self.config.text.trainable))
        if not self.config.vae.precompute_latents:
            total += b * flops.vae_encode_flops(vae_cfg, int(d.frames), int(d.height), int(d.width))
        return total

    def loaded_modules(self):
        return frozenset({"*"}) if self.config.init_from else frozenset({"vae"})

    def init_state(self, state, trainer, mesh):
        """Every weight from `init_from` (fine-tuning an imported or trained model), or else the
        trained VAE's weights into the frozen part of a fresh state."""
        put = lambda new, old: jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), new, old)
        if self.config.init_from:
            model = load_init_model(self.config, mesh)
            _, params, frozen = nnx.split(model, self.trainable(), ...)
            state["params"] = put(params, state["params"])
            state["frozen"] = put(frozen, state["frozen"])
            state["ema"] = jax.tree.map(jnp.copy, state["params"])
            return state
        _, vae_state = load_vae_state(self.config, self.run_dir, mesh)
        state["frozen"]["vae"] = put(vae_state, state["frozen"]["vae"])
        return state

    def meta(self):
        return {"tokenizer": os.path.relpath(self.tokenizer_path, self.run_dir) if self.tokenizer_path
                else "", "config": self.config.to_dict()}

    def eval_every(self):
        return int(self.tcfg.eval_every)

    def host_metrics(self, step):
        """Packed: real tokens / token budget over every batch of the run so far (the per-step
        figure is the step's own `packing_efficiency`)."""
        if not self.packed() or self._plan is None or step < 1:
            return {}
        return {"packing_efficiency_mean": self._plan.efficiency(step)}

    def evaluate(self, state, trainer, step):
        """The world benchmark (sorajax.evaluate) on the first `eval_prompts` validation prompts,
        sampled with the EMA weights at the config's sampling settings, seed 0 (the same noise at
        every evaluation, so the rows compare). -> {"eval/<metric>": value}."""
        cfgs = video.model_configs(self.config, vocab_size=self.cfgs[2].vocab_size)  # latent stats now in
        model = nnx.eval_shape(lambda: video.VideoModel(*cfgs, rngs=nnx.Rngs(0)))
        nnx.update(model, nnx.state(nnx.merge(trainer.graphdef, state["ema"], state["frozen"])))
        graphdef, weights = nnx.split(model)
        pipe = inference.Pipeline(self.config, graphdef, weights, self.tokenizer, trainer.mesh, cfgs[0], cfgs[1])
        rep = evaluate.run_benchmark(evaluate.model_generate(pipe), prompts="validation",
                                     num_prompts=int(self.tcfg.eval_prompts))
        return {f"eval/{k}": float(v) for k, v in rep["metrics"].items()}

    def on_end(self, state, trainer, writer, step):
        """Samples the first evaluation prompts with the EMA weights into RUN/samples (+ TensorBoard).
        The run is checkpointed by now; a failure here still fails the command (exit 1)."""
        if not self.tcfg.sample_at_end:
            return
        if jax.process_count() > 1:  # the sampler runs single-process (one host's devices)
            if jax.process_index() == 0:
                print(f"[{self.name}] multi-process run: skipping end-of-training samples; run "
                      f"`python -m sorajax.sample --workdir {self.run_dir} ...` on one host", flush=True)
            return
        try:
            pipe = inference.load_pipeline(workdir=self.run_dir)
            prompts = (builders.first_captions(self.latent_source, 4) if self.config.data.source == "latents"
                       else builders.sample_prompts(self.config.data, 4))
            frames = pipe.generate(prompts, seed=0)["frames"]  # (N, T, H, W, 3) in [0, 1]
            os.makedirs(os.path.join(self.run_dir, "samples"), exist_ok=True)
            video_io.write(os.path.join(self.run_dir, "samples", f"step_{step}.gif"), frames, prompts)
        except Exception as e:
            raise RunFailed(f"training finished and its checkpoint is saved, but end-of-training "
                            f"sampling failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                            f"set dit_train.sample_at_end=False to skip it") from e
        if writer is not None:  # (the .gif above is the video: tensorboardX's add_video needs moviepy)
            writer.add_image("samples_sheet", video_io.contact_sheet(frames, prompts), step,
                             dataformats="HWC")


STAGES: dict[str, type[Stage]] = {"vae": VAEStage, "dit": DiTStage}
