"""The end-to-end demo (`make demo`): synthetic world -> VAE -> DiT -> samples -> world metrics.

    python scripts/demo.py [--workdir runs/toy] [--samples samples] [--config configs/toy.py]

Trains the toy config on CPU (resumes if interrupted), samples every evaluation prompt with
fixed seeds into SAMPLES/ (.mp4, .gif and a contact-sheet .png), runs the world benchmark into
WORKDIR/eval.json and prints where everything is.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/toy")
    p.add_argument("--samples", default="samples")
    p.add_argument("--config", default="configs/toy.py")
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides")
    a, rest = p.parse_known_args(argv)
    from sorajax import cli, demo

    return cli.run(lambda _: demo.run_demo(a.config, a.workdir, a.samples, rest + a.overrides), [])


if __name__ == "__main__":
    sys.exit(main())
