"""Convert a diffusers-format Wan 2.1 folder into a sorajax checkpoint.

    python scripts/convert_diffusers.py --src Wan2.1-T2V-1.3B-Diffusers --dst ckpt/wan1p3b
    python -m sorajax.sample --checkpoint ckpt/wan1p3b --prompt "..." --out video.mp4
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Convert a diffusers-format Wan 2.1 folder (vae/, transformer/, text_encoder/, "
                    "tokenizer/, scheduler/) into a sorajax checkpoint directory. Tensors are read from "
                    "safetensors one at a time (no torch needed).")
    p.add_argument("--src", required=True, help="the diffusers folder (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    p.add_argument("--dst", required=True, help="checkpoint directory to create")
    p.add_argument("--frames", type=int, default=81, help="default frame count for sampling (81)")
    p.add_argument("--height", type=int, default=480, help="default height for sampling (480)")
    p.add_argument("--width", type=int, default=832, help="default width for sampling (832)")
    p.add_argument("--max-length", type=int, default=512, help="text tokens (Wan: 512)")
    p.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    a = p.parse_args(argv)
    from sorajax import cli, convert

    def run(_):
        out = convert.convert(a.src, a.dst, frames=a.frames, height=a.height, width=a.width,
                              max_length=a.max_length, overwrite=a.overwrite)
        print(f"wrote {out}")
        return 0

    return cli.run(run, [])


if __name__ == "__main__":
    sys.exit(main())
