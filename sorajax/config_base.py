"""The one declared config: every key a sorajax config may set, with its default and meaning.

Every file in configs/ starts from `get_config()` here and changes values; it never adds keys.
`config_lib.load_config` checks that (an undeclared key is one `error:` line, exit 2), and
`--config.KEY=VALUE` accepts exactly these keys. The defaults are the toy model of `make demo`
(configs/toy.py, which adds the conditioning masks), so the small case reads top to bottom
without indirection.

The model sections' `overrides` are the only free-form dicts: their keys are the fields of the
model dataclasses (VAEConfig, DiTConfig, TextConfig in sorajax/models/), checked by
`models.video.model_configs` before anything is built.
"""
from __future__ import annotations

import ml_collections

# Stage sections: config[STAGE + "_train"] holds the settings of stage STAGE.
STAGE_SECTIONS = {"vae": "vae_train", "dit": "dit_train"}


def _stage_section(**changes) -> ml_collections.ConfigDict:
    """The settings every training stage has (optimizer, loop, checkpoints, numerics)."""
    s = ml_collections.ConfigDict()
    s.steps = 1000  # optimizer steps of this stage
    s.batch_size = 32  # global batch (all processes and devices together)
    s.grad_accum = 1  # micro-batches per step (batch_size must divide by data-parallel x this)
    s.lr = 1e-3  # peak learning rate (linear warm-up, cosine decay to 5% of it)
    s.warmup_steps = 100  # linear warm-up steps from lr 0
    s.weight_decay = 0.0  # AdamW decoupled weight decay
    s.grad_clip = 1.0  # global gradient-norm clip
    s.b1 = 0.9  # Adam beta1
    s.b2 = 0.99  # Adam beta2
    s.ema_decay = 0.0  # EMA of the trained weights (warm-up min(d, (1+t)/(10+t))); 0 = EMA = weights
    s.log_every = 50  # steps between metrics.jsonl / TensorBoard rows
    s.ckpt_every = 250  # steps between Orbax checkpoints (the last step always saves)
    s.keep_checkpoints = 3  # newest checkpoints kept on disk
    s.max_nonfinite_in_a_row = 20  # NaN/Inf updates are skipped; this many in a row stop the run
    # Testing knob (fault injection, docs/RELIABILITY.md): the gradients of these 1-based steps are
    # multiplied by NaN. Leave empty: then the step is not changed at all.
    s.inject_nonfinite_steps = ()
    s.update(changes)
    return s


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init, data order and training noise (sampling has its own --seed)
    c.stages = ("vae", "dit")  # trained in order into one workdir; a finished stage is skipped
    c.init_from = ""  # a converted or trained checkpoint dir to start every weight from (fine-tuning)

    # -- data: the synthetic world (sorajax/data/world.py) as TFDS array_record under data_dir,
    # or a folder of the user's videos prepared by `python -m sorajax.data.prepare` (docs/DATA.md).
    c.data = ml_collections.ConfigDict()
    # "world" (synthetic, built on demand), "folder" (a prepared data.dir) or "latents" (a latent
    # cache in data.dir, python -m sorajax.cache_latents: the DiT stage only)
    c.data.source = "world"
    c.data.dir = ""  # source="folder": DATA_DIR (prepare --out); "latents": LATENTS_DIR; shapes must match
    c.data.data_dir = "data"  # where the dataset is built (once) and read
    c.data.frames = 9  # frames per clip: 1 + (VAE temporal stride) k
    c.data.height = 32  # pixels; a multiple of VAE spatial stride x DiT patch
    c.data.width = 32  # pixels; likewise
    c.data.num_train = 4096  # training clips
    c.data.num_eval = 64  # evaluation-split clips
    c.data.seed = 0  # world rendering seed (clip i of a split is a pure function of it)
    c.data.min_objects = 1  # objects per clip, at least
    c.data.max_objects = 1  # objects per clip, at most
    c.data.occluder_prob = 0.0  # chance of a static occluder bar in a clip
    c.data.two_tone_prob = 0.0  # chance of a two-colour background
    # held-out compositions: "COLOR SHAPE" pairs no training clip shows, e.g. ("red triangle",);
    # the benchmark scores prompts with them apart (report.json metrics_heldout / metrics_seen)
    c.data.holdout = ()
    # Native shapes (world data; trained with dit_train.packing="pack"): each clip gets one of
    # these width/height ratios at the nearest size to height x width pixels whose sides are
    # multiples of size_multiple, and one of `durations` frame counts -- or is a 1-frame image,
    # with chance image_share. () = every clip is frames x height x width.
    c.data.aspect_ratios = ()  # e.g. (1.0, 1.5, 0.667): square, landscape, portrait
    c.data.durations = ()  # frame counts (1 + 4k) of the videos; () = (frames,)
    c.data.image_share = 0.0  # chance that a clip is a 1-frame image (native shapes only)
    c.data.size_multiple = 16  # native sides are multiples of this (VAE spatial stride x DiT patch)
    # pixel budgets as (height, width) pairs, e.g. ((720, 1280), (480, 832)): each clip draws one
    # (native shapes only); () = the one budget data.height x data.width
    c.data.resolutions = ()

    # -- models: a variant from the model file's VARIANTS table plus dataclass field overrides.
    c.vae = ml_collections.ConfigDict()
    c.vae.variant = "toy"  # sorajax/models/vae.py VARIANTS
    c.vae.overrides = {}  # VAEConfig fields (latents_mean/std are written here by normalize_latents)
    c.vae.precompute_latents = True  # DiT stage: encode the training clips once with the frozen VAE
    # After the VAE stage, measure its latents' per-channel mean/std and store them in
    # vae.overrides (latents_mean/latents_std), as Wan ships them for its VAE.
    c.vae.normalize_latents = True
    c.vae.cache_dtype = "bfloat16"  # storage of cached latents (sorajax/latents.py): bfloat16 | float32
    c.dit = ml_collections.ConfigDict()
    c.dit.variant = "toy"  # sorajax/models/dit.py VARIANTS
    c.dit.overrides = {}  # DiTConfig fields (attention, context_parallel, remat, scan_layers, dtype, ...)
    c.text = ml_collections.ConfigDict()
    c.text.variant = "toy"  # sorajax/models/text.py VARIANTS
    c.text.overrides = {}  # TextConfig fields
    c.text.vocab_size = 192  # sentencepiece vocabulary trained on the captions (upper bound)
    # prompt tokens incl. </s>; longer prompts are truncated with a warning. 32 holds every world
    # caption (the longest, two objects + a wall + a two-tone background, is 29 tokens; at 24, 8%
    # of the training captions and 2 of the 48 test prompts lost their last words)
    c.text.max_length = 32
    c.text.trainable = True  # train the text encoder with the DiT (toy) or keep it frozen (pretrained)
    c.text.tokenizer = ""  # an existing spiece.model / tokenizer.json (or its folder); "" = train one
    c.text.vocab_from_tokenizer = True  # the encoder's vocabulary size follows the tokenizer's

    # -- stages.
    c.vae_train = _stage_section(
        steps=800, batch_size=8, lr=2e-3, warmup_steps=50, ckpt_every=200)
    c.vae_train.kl_weight = 1e-6  # KL of the latent posterior
    c.vae_train.fg_weight = 10.0  # extra loss weight on object pixels (stages.VAEStage.loss)
    c.vae_train.clip_frames = 0  # >0: train on the first N = 1 + 4k frames only
    c.vae_train.sample_posterior = False  # False: deterministic autoencoder (learns faster on CPU)
    c.dit_train = _stage_section(
        steps=1500, batch_size=32, lr=1e-3, warmup_steps=100, weight_decay=0.01, ema_decay=0.999)
    c.dit_train.text_dropout = 0.1  # captions replaced by "" (the unconditional branch of CFG)
    # >0: the velocity error of each latent position weighs 1 + motion_weight x how much it
    # changes between latent frames (mean 1 per clip; flow.motion_weight); 0: plain mean
    c.dit_train.motion_weight = 0.0  # 1 and 4 did not beat 0 on the toy world (README)
    # >0: train on windows of N = 1 + 4k frames cut from each clip's latents at a random start
    # (windows that start mid-clip teach extension and long rollouts: sorajax/modes.py); also
    # the default sampling length. 0: whole clips
    c.dit_train.clip_frames = 0
    # "pack": clips of any shape packed whole into batch_size rows of pack_tokens tokens each
    # (sorajax/packing.py: per-clip attention, noise and loss; one compiled step); "bucket": one
    # shape per batch, about batch_size x pack_tokens tokens per batch (one compile per shape);
    # "none": one shape per run (data.frames x height x width, or clip_frames windows of it)
    c.dit_train.packing = "none"
    c.dit_train.pack_tokens = 0  # tokens per packed row; 0 = the largest clip's token count
    c.dit_train.pack_clips = 8  # clips (and caption slots) per packed row, at most
    c.dit_train.sample_at_end = True  # sample eval prompts into WORKDIR/samples + TensorBoard
    # >0: every N steps (and at the last) sample the world's validation prompts with the EMA
    # weights and log the world benchmark's metrics (eval/*) to metrics.jsonl and TensorBoard
    c.dit_train.eval_every = 0
    c.dit_train.eval_prompts = 24  # how many of the 24 validation prompts (the first N) it samples
    # Conditioning masks (sorajax/conditioning.py): the chance that a clip's given latent frames
    # are its first / first k / last k / first and last / random keyframes -- kept clean at noise
    # level 0 and out of the loss -- so one model also does i2v, extension, connect and keyframes
    # (python -m sorajax.sample --mode ...). The rest of the clips are plain text-to-video.
    c.dit_train.cond_rates = ml_collections.ConfigDict(dict(
        first=0.0, first_k=0.0, last_k=0.0, first_last=0.0, keyframes=0.0))

    # -- rectified flow (sorajax/flow.py).
    c.flow = ml_collections.ConfigDict()
    c.flow.logit_mean = 0.0  # logit-normal training noise levels: mean
    c.flow.logit_std = 1.0  # and standard deviation
    c.flow.shift = 1.0  # time shift of the training noise levels (> 1: more time at high noise)

    # -- sampling defaults (sorajax.sample, sorajax.evaluate, end-of-training samples).
    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 25  # denoising steps
    # Chosen on the validation prompts (`python -m sorajax.evaluate --prompts validation --seeds 2
    # --guidance G`, the demo's DiT of training seed 0: one training run, 2 sampling seeds,
    # standard errors 0.00-0.08): colour first, the mean of the 7 adherence metrics to break ties. Colour 0.52 / 0.50 / 0.54 / 0.50 / 0.44 / 0.46 / 0.48 and mean 0.30 /
    # 0.32 / 0.32 / 0.28 / 0.25 / 0.25 / 0.23 at guidance 1 / 1.5 / 2 / 3 / 4 / 6 / 8: higher
    # guidance overshoots the latents' scale (std 1.6 vs 0.9 at 8), and the first frame and the
    # background break up (background 0.71 at 2, 0.19 at 8). Re-choose it for another model.
    c.sample.guidance = 2.0  # classifier-free guidance scale (1 = off, 0 = unconditional)
    c.sample.shift = 1.0  # time shift of the sampling schedule
    c.sample.solver = "euler"  # euler | heun | unipc
    c.sample.negative_prompt = ""  # text of the unconditional branch
    # > 0: the step cache (TeaCache-style, VideoModel.velocity_cached): a step skips the DiT
    # blocks and extrapolates their residual from the last two runs while the first block's
    # modulated input changed by less than this (accumulated relative L1) since the blocks
    # last ran; 0 = off (0.15: 2.3x on the demo model, docs/PERFORMANCE.md)
    c.sample.step_cache = 0.0

    # -- mesh (sorajax/sharding.py): devices per axis (-1 = all remaining), DCN sizes for slices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1,
                                            dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1))
    c.sharding_rules = None  # None: sorajax.sharding.DEFAULT_RULES; else (logical, mesh axes) pairs

    # -- provenance of converted checkpoints (scripts/convert_diffusers.py writes it).
    c.source = ml_collections.ConfigDict()
    c.source.diffusers = ""  # the diffusers folder the weights came from
    c.source.scheduler = ""  # its scheduler class
    return c
