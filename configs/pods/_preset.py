"""Shared by the pod presets in this folder (not a config itself): a top-level config at a
preset's scale, or the preset's tiny `runlocal` variant."""
import importlib


def preset(base: str, arg: str, *, frames, height, width, batch, mesh: dict, dit: dict, runlocal_mesh: dict):
    """configs/BASE.py at pod scale, or (arg == "runlocal") its tiny variant with the preset's
    parallelism knobs on fake CPU devices: same code paths, seconds to run."""
    if arg not in ("", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    c = importlib.import_module(f"configs.{base}").get_config(arg)
    full = dict(data=1, fsdp=1, context=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1)
    if arg == "runlocal":
        c.mesh.update(dict(full, **runlocal_mesh))
        c.dit.overrides = dict(c.dit.overrides, **{k: v for k, v in dit.items()
                                                   if k in ("context_parallel", "scan_layers", "remat")})
        return c
    c.data.update(frames=frames, height=height, width=width)
    c.dit_train.batch_size = batch
    c.mesh.update(dict(full, **mesh))
    c.dit.overrides = dict(c.dit.overrides, **dit)
    # Latents and text are precomputed/frozen at this scale: the step trains the DiT only.
    c.vae.precompute_latents = True
    c.stages = ("dit",)
    return c
