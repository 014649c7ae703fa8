"""Shared by the pod presets in this folder (not a config itself): loads a top-level config and
applies a preset's scale settings, or the preset's tiny `runlocal` variant."""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def load(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, "..", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def preset(base: str, arg: str, *, frames, height, width, batch, mesh: dict, dit: dict, runlocal_mesh: dict):
    """The base config at pod scale, or (arg == "runlocal") its tiny variant with the preset's
    parallelism knobs on fake CPU devices: same code paths, seconds to run."""
    if arg not in ("", "runlocal"):
        raise ValueError(f"unknown config argument {arg!r} (known: runlocal)")
    c = load(base, arg)
    full = dict(data=1, fsdp=1, context=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1)
    if arg == "runlocal":
        c.mesh.update(dict(full, **runlocal_mesh))
        c.dit.overrides = dict(c.dit.overrides, **{k: v for k, v in dit.items()
                                                   if k in ("context_parallel", "scan_layers", "remat")})
        return c
    c.data.update(frames=frames, height=height, width=width)
    c.train.batch_size = batch
    c.mesh.update(dict(full, **mesh))
    c.dit.overrides = dict(c.dit.overrides, **dit)
    # Latents and text are precomputed/frozen at this scale: the step trains the DiT only.
    c.vae.precompute_latents = True
    c.stages = ("dit",)
    return c
