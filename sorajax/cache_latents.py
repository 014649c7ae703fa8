"""Encode a dataset's clips into a latent cache once, for DiT training (data.source='latents').

    python -m sorajax.cache_latents --config configs/wan2_1_finetune.py:CKPT --data DATA_DIR \\
        --out LATENTS_DIR
    python -m sorajax.train --config configs/wan2_1_finetune.py:CKPT --workdir RUN \\
        --config.data.source=latents --config.data.dir=LATENTS_DIR

The frozen VAE is the config's `init_from` checkpoint (an imported Wan 2.1 model) or, with
--workdir, the VAE a run trained (RUN/vae). Every device of every process encodes (start the
same command on every host of a pod, as for training); host memory is one encode batch whatever
the dataset size; a killed command resumes where it stopped (sorajax/latents.py).
"""
from __future__ import annotations

import os
import sys
import time

import jax

from sorajax import cli, config_lib, latents, sharding, stages, validate
from sorajax.data import builders
from sorajax.errors import UserError


def parse_args(argv):
    p = cli.Parser(
        prog="python -m sorajax.cache_latents",
        description="Encode every training clip of a dataset with the frozen VAE into a latent cache "
                    "(array_record shards of latents and captions, bf16 by default) that "
                    "`python -m sorajax.train --config.data.source=latents --config.data.dir=OUT` "
                    "trains the DiT from. Resumable: run the same command again after a kill.",
        epilog="Override any declared config key with --config.KEY=VALUE (e.g. --config.mesh.data=8). "
               "Multi-process: start the same command on every host (JAX_COORDINATOR_ADDRESS, "
               "JAX_NUM_PROCESSES, JAX_PROCESS_ID, or the TPU pod's own discovery); OUT must be on a "
               "file system every host sees (e.g. a gcsfuse mount).")
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]: the data shape, the VAE and the mesh")
    p.add_argument("--data", required=True,
                   help="the dataset: a prepared DATA_DIR (python -m sorajax.data.prepare) when the "
                        "config's data.source is 'folder' or 'latents' (the configs that train from a "
                        "cache), else ('world') the world's TFDS data_dir")
    p.add_argument("--out", required=True, help="LATENTS_DIR to write (created; resumed if partial)")
    p.add_argument("--workdir", default="",
                   help="a run whose trained VAE (RUN/vae) encodes; default: the config's init_from")
    p.add_argument("--batch-size", type=int, default=32,
                   help="clips per encode call over all devices (rounded up to the data-parallel size)")
    p.add_argument("--shard-clips", type=int, default=1024,
                   help="clips per chunk: the unit written per process and redone after a kill")
    p.add_argument("--dtype", choices=tuple(latents.DTYPES), default=None,
                   help="storage dtype of the latents (default: the config's vae.cache_dtype, bfloat16)")
    return p.parse_known_args(argv)


def _main(argv):
    args, rest = parse_args(argv)
    config = config_lib.apply_overrides(config_lib.load_config(args.config), rest)
    if args.batch_size < 1 or args.shard_clips < 1:
        raise UserError("--batch-size and --shard-clips must be >= 1")
    if "://" in args.out:
        raise UserError(f"--out {args.out!r}: URLs are not supported; mount the bucket (e.g. gcsfuse)")
    with config.unlocked():
        if config.data.source == "latents":  # a config that trains from the cache: its pixels are a folder
            config.data.source = "folder"
        if config.data.source == "folder":
            config.data.dir = args.data
        else:
            config.data.data_dir = args.data
        if args.dtype:
            config.vae.cache_dtype = args.dtype
    if not config.init_from and not args.workdir:
        raise UserError("no VAE to encode with: the config has no init_from checkpoint; pass "
                        "--workdir RUN of a run that trained its VAE stage")
    # The config's shapes and model; not its training batches (this command does not train):
    # the clips' shape is checked when the folder is opened (builders.folder_source).
    validate.validate(config, data=False)
    run_dir = args.workdir or args.out
    provenance = stages.vae_provenance(config, run_dir)
    if provenance.endswith("/none"):  # checked before --out is created
        raise UserError(f"--workdir {args.workdir!r}: no VAE checkpoint in {os.path.join(args.workdir, 'vae')}; "
                        "train its 'vae' stage first (python -m sorajax.train ...)")
    if config.init_from and not os.path.isdir(config.init_from):
        raise UserError(f"init_from={config.init_from!r}: no such checkpoint directory (convert one with "
                        "scripts/convert_diffusers.py, or pass --config.init_from=CKPT_DIR)")
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)
    if jax.process_index() == 0:
        os.makedirs(args.out, exist_ok=True)
        cli.probe_writable_dir(args.out, f"--out {args.out!r}")
        if config.data.source == "world":
            builders.source(config.data, "train", build=True)
    sharding.sync("sorajax:cache_start")
    source = builders.source(config.data, "train", build=False)
    t0 = time.time()
    cache = latents.build(config, source, mesh, args.out,
                          vae_provenance=provenance,
                          load_vae=lambda: stages.load_vae_state(config, run_dir, mesh),
                          batch_size=args.batch_size, shard_clips=args.shard_clips)
    if jax.process_index() == 0:
        what = "mixed-shape" if cache.native else 'x'.join(map(str, cache.shape))
        print(f"latent cache: {len(cache)} clips of {what} latents "
              f"({cache.meta['dtype']}) in {len(cache.meta['parts'])} parts at {os.path.abspath(args.out)} "
              f"({time.time() - t0:.1f} s)", flush=True)
        extra = "" if "vae" not in config.stages else " --config.stages=\"('dit',)\""
        print(f"train from it: python -m sorajax.train --config {args.config} --workdir "
              f"{args.workdir or 'RUN'} --config.data.source=latents --config.data.dir={args.out}{extra}",
              flush=True)
    return 0


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
