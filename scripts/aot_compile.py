"""Prove a config fits a TPU pod before paying for it: compile its train step for a named TPU
topology on this (CPU-only) machine and print per-chip memory, FLOPs and collectives as JSON.

    python scripts/aot_compile.py --config configs/pods/wan14b_v5p256.py --topology v5p-256
    python scripts/aot_compile.py --config configs/pods/wan14b_2xv5p128.py --topology v5p-128 --num-slices 2
    python scripts/aot_compile.py --config configs/pods/wan14b_v5p256.py --topology v5p-256 \\
        --global-batch 64 --frames 121 --search --max-candidates 4
    python scripts/aot_compile.py --config configs/pods/wan14b_sample.py --topology v6e-8 --sample

Needs libtpu (`make aot-deps` installs it into .venv/aot-libtpu): jax.experimental.topologies uses
it to describe TPU slices without a TPU. Nothing is run; docs/SCALING.md explains the output.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="scripts/aot_compile.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1] + "\nAny --config.KEY=VALUE overrides the config.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file[:arg], e.g. configs/wan2_1_t2v_14b.py")
    p.add_argument("--topology", required=True,
                   help="TPU slice: v5p-N / v4-N (N TensorCores) or v5e-N / v6e-N (N chips), e.g. v5p-256")
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: slices joined over DCN (default 1)")
    p.add_argument("--global-batch", type=int, default=None, help="dit_train.batch_size (default: the config's)")
    p.add_argument("--frames", type=int, default=None, help="pixel frames per clip (1 + 4k)")
    p.add_argument("--height", type=int, default=None, help="pixel height")
    p.add_argument("--width", type=int, default=None, help="pixel width")
    p.add_argument("--mesh", default=None,
                   help="mesh sizes, e.g. 'fsdp=32,context=4' or 'dcn_data=2' (default: the config's)")
    p.add_argument("--remat", default=None, choices=("none", "full", "dots", "offload"),
                   help="DiT remat policy (default: the config's)")
    p.add_argument("--no-sampler", action="store_true", help="skip compiling the sampler's denoising step")
    p.add_argument("--sample", action="store_true",
                   help="plan sampling instead of training: the whole jitted sampler (text encoding, "
                        "--steps CFG denoising steps, the sharded VAE decode) for --global-batch clips "
                        "(default 1), weights in the config's param dtypes, no optimizer state")
    p.add_argument("--steps", type=int, default=50, help="--sample: denoising steps (default 50)")
    p.add_argument("--search", action="store_true",
                   help="try mesh shapes x remat policies; rank those that fit by per-chip memory, "
                        "then collective bytes")
    p.add_argument("--max-candidates", type=int, default=6, help="--search: compile at most this many")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    return args, extra


def main(argv=None):
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    from sorajax import cli

    return cli.run(lambda _argv: _main(args, extra))


def _main(args, extra):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from sorajax import aot, config_lib
    from sorajax.errors import UserError

    topo = aot.parse_topology(args.topology, args.num_slices)  # validates before anything heavy
    mesh = None
    if args.mesh:
        mesh = {}
        for item in args.mesh.split(","):
            k, _, v = item.partition("=")
            keys = {"data", "fsdp", "context", "tensor"}
            if k.strip().removeprefix("dcn_") not in keys or not v.strip().lstrip("-").isdigit():
                raise UserError(f"--mesh: bad item {item!r}; expected AXIS=SIZE with AXIS in "
                                f"data, fsdp, context, tensor (or dcn_AXIS), e.g. fsdp=32,context=4")
            mesh[k.strip()] = int(v)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UserError(f"--out: directory of {args.out} does not exist")
    config = config_lib.load_config(args.config)
    config = aot._apply(config, mesh, args.frames, args.height, args.width, args.global_batch,
                        args.remat, extra)
    if topo.num_slices > 1 and not mesh:
        with config.unlocked():
            if int(config.mesh.get("dcn_data", 1)) * int(config.mesh.get("dcn_fsdp", 1)) * \
                    int(config.mesh.get("dcn_context", 1)) * int(config.mesh.get("dcn_tensor", 1)) == 1:
                config.mesh.dcn_data = topo.num_slices  # data parallelism across slices by default
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    devices = aot.topology_devices(topo)
    log(f"[aot] {topo.name} x{topo.num_slices}: {len(devices)} chips, {topo.hbm_bytes / 2**30:.0f} GiB HBM each")
    if args.sample:
        if args.search:
            raise UserError("--sample and --search: the search plans training steps; give one of them")
        if args.steps < 1:
            raise UserError(f"--steps {args.steps}: must be >= 1")
        result = aot.plan_sampling(config, devices, topo, batch=args.global_batch or 1, steps=args.steps, log=log)
    elif args.search:
        result = {"topology": topo.name, "num_slices": topo.num_slices,
                  "search": aot.search(config, devices, topo, max_candidates=args.max_candidates, log=log)}
    else:
        result = aot.plan(config, devices, topo, sampler=not args.no_sampler, log=log)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
