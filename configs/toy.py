"""Toy text-to-video model on the synthetic world, trained end to end on one CPU machine.

Launch (what `make demo` runs):
    python -m sorajax.train --config configs/toy.py --workdir runs/toy
Tiny smoke variant (seconds; used by tests):
    python -m sorajax.train --config configs/toy.py:runlocal --workdir /tmp/toy_smoke

Two stages in one run: the causal VAE (spacetime compression 4x4x4) trains first into
WORKDIR/vae, then the DiT and the small T5-style text encoder train on the frozen VAE's latents
into WORKDIR. 9-frame 32x32 clips -> 3x8x8x8 latents -> 48 tokens with (1, 2, 2) patches.
"""
import ml_collections


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stages = ("vae", "dit")  # trained in order; a finished stage is skipped on restart

    # -- data: the synthetic world (sorajax/data/world.py), TFDS array_record under data_dir.
    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "data"
    c.data.frames = 9
    c.data.height = 32
    c.data.width = 32
    c.data.num_train = 4096
    c.data.num_eval = 64
    c.data.seed = 0
    c.data.min_objects = 1
    c.data.max_objects = 1
    c.data.occluder_prob = 0.0
    c.data.two_tone_prob = 0.0

    # -- models: variants from the model files' VARIANTS tables, plus field overrides.
    # normalize_latents: after the VAE stage, its latents' per-channel mean/std are measured and
    # written into vae.overrides (latents_mean/latents_std), as Wan ships them for its VAE.
    c.vae = ml_collections.ConfigDict(dict(variant="toy", overrides={}, precompute_latents=True,
                                           normalize_latents=True))
    c.dit = ml_collections.ConfigDict(dict(variant="toy", overrides={}))
    c.text = ml_collections.ConfigDict(dict(variant="toy", overrides={}, vocab_size=192, max_length=24,
                                            trainable=True, tokenizer=""))

    # -- VAE stage.
    c.vae_train = ml_collections.ConfigDict()
    c.vae_train.steps = 800
    c.vae_train.batch_size = 8
    c.vae_train.clip_frames = 0  # >0: train on the first N frames only
    c.vae_train.sample_posterior = False  # deterministic autoencoder: learns much faster on CPU
    c.vae_train.lr = 2e-3
    c.vae_train.warmup_steps = 50
    c.vae_train.kl_weight = 1e-6
    c.vae_train.fg_weight = 10.0  # extra loss weight on object pixels (see VAEStage.loss)
    c.vae_train.log_every = 50
    c.vae_train.ckpt_every = 200
    c.vae_train.inject_nonfinite_steps = ()  # testing knob: see train.inject_nonfinite_steps

    # -- DiT stage.
    c.train = ml_collections.ConfigDict()
    c.train.steps = 1500
    c.train.batch_size = 32
    c.train.lr = 1e-3
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.01
    c.train.grad_clip = 1.0
    c.train.b1 = 0.9
    c.train.b2 = 0.99
    c.train.ema_decay = 0.999
    c.train.text_dropout = 0.1
    c.train.log_every = 50
    c.train.ckpt_every = 250
    c.train.sample_at_end = True  # sample eval prompts into WORKDIR/samples + TensorBoard
    c.train.max_nonfinite_in_a_row = 20  # NaN/Inf updates are skipped; this many in a row stop the run
    # Testing knob (fault injection, docs/RELIABILITY.md): the gradients of these steps (1-based, as
    # in metrics.jsonl) are multiplied by NaN. Leave empty: then the step is not changed at all.
    c.train.inject_nonfinite_steps = ()
    c.train.keep_checkpoints = 3

    # -- rectified flow.
    c.flow = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=1.0, shift=1.0))

    # -- sampling defaults (sorajax.sample / sorajax.evaluate).
    # guidance 8: measured on the demo run, 26 eval prompts: colour 0.92 / direction 0.81 (seed 0) vs
    # 0.92 / 0.65 at guidance 4 and 0.88 / 0.73 at 6.
    c.sample = ml_collections.ConfigDict(dict(steps=25, guidance=8.0, shift=1.0, solver="euler",
                                              negative_prompt=""))

    # -- mesh and sharding: sizes per axis (-1 = all remaining devices), DCN sizes for slices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1,
                                            dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1))
    c.sharding_rules = None  # None: sorajax.sharding.DEFAULT_RULES

    if arg == "runlocal":
        c.data.num_train = 64
        c.data.num_eval = 8
        c.vae_train.steps = 6
        c.vae_train.batch_size = 8
        c.vae_train.log_every = 2
        c.vae_train.ckpt_every = 3
        c.train.steps = 6
        c.train.batch_size = 8
        c.train.log_every = 2
        c.train.ckpt_every = 3
        c.sample.steps = 3
    elif arg:
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    return c
