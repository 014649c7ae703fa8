"""Shared by the pod presets in this folder (not a config itself): a top-level config at a
preset's scale, or the preset's tiny `runlocal` variant.

Every preset fine-tunes an imported Wan 2.1 checkpoint (`init_from`) on a latent cache
(`data.source = "latents"`): the path from a folder of videos to a pod job is

    python scripts/convert_diffusers.py --src Wan2.1-T2V-14B-Diffusers --dst /mnt/gcs/ckpt/wan2.1-t2v-14b
    python -m sorajax.data.prepare --src VIDEOS_DIR --out DATA_DIR --config configs/pods/PRESET.py
    python -m sorajax.cache_latents --config configs/pods/PRESET.py --data DATA_DIR \\
        --out /mnt/gcs/latents/PRESET --config.data.source=folder      # on every worker
    python -m sorajax.train --config configs/pods/PRESET.py --workdir /mnt/gcs/runs/PRESET  # on every worker

with `--config.init_from=` / `--config.data.dir=` where the checkpoint and the cache live
elsewhere. `:runlocal:CKPT_DIR` is the same path on 8 fake CPU devices with a tiny converted
checkpoint (its architecture read from CKPT_DIR/config.json), 9 x 32 x 32 clips and the preset's
parallelism (mesh axes, context-parallel scheme, scan, remat) at toy scale; pass the tiny cache
with --config.data.dir. Attention kernels (splash, flash, cuDNN) need a TPU or GPU: runlocal
uses the XLA attention, and the AOT planner compiles the preset's own kernel for its topology.
"""
import importlib


def preset(base: str, arg: str, *, frames, height, width, batch, mesh: dict, dit: dict,
           runlocal_mesh: dict, ckpt: str, name: str, data_root: str = "/mnt/gcs"):
    """configs/BASE.py at pod scale fine-tuning `ckpt` (a converted checkpoint's path on the pod)
    from the latent cache DATA_ROOT/latents/NAME, or (arg == "runlocal:CKPT_DIR") its tiny
    variant on the same path."""
    mode, _, tiny_ckpt = arg.partition(":")
    full = dict(data=1, fsdp=1, context=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1)
    if mode == "runlocal":
        if not tiny_ckpt:
            raise ValueError("runlocal fine-tunes a converted checkpoint: configs/pods/PRESET.py:runlocal:CKPT_DIR")
        c = importlib.import_module("configs.wan2_1_finetune").get_config(tiny_ckpt)
        c.data.update(source="latents", dir="", frames=9, height=32, width=32)
        c.mesh.update(dict(full, **runlocal_mesh))
        c.dit.overrides = dict(c.dit.overrides, **{k: v for k, v in dit.items()
                                                   if k in ("context_parallel", "scan_layers", "remat")})
        c.dit_train.update(steps=2, batch_size=8, log_every=1, ckpt_every=2, sample_at_end=True)
        c.sample.steps = 2
        return c
    if arg:
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal:CKPT_DIR)")
    c = importlib.import_module(f"configs.{base}").get_config("")
    c.data.update(frames=frames, height=height, width=width, source="latents", dir=f"{data_root}/latents/{name}")
    c.init_from = ckpt
    c.dit_train.batch_size = batch
    c.mesh.update(dict(full, **mesh))
    c.dit.overrides = dict(c.dit.overrides, **dit)
    # Fine-tuning the imported model on cached latents: the step trains the DiT only, the VAE
    # (and its shipped latent statistics) and the UMT5 encoder stay frozen.
    c.vae.update(precompute_latents=True, normalize_latents=False)
    c.text.trainable = False
    c.stages = ("dit",)
    return c
