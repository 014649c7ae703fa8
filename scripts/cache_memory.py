"""Peak host memory of `python -m sorajax.cache_latents` at N and 10 x N clips (docs/DATA.md).

    python scripts/cache_memory.py --clips 256 --out cache_memory.json

Trains the toy config's VAE stage (configs/toy.py:runlocal, 2 steps: the weights do not matter
for memory) once, builds the world datasets of N and 10N clips, then caches each in its own
process and reads that process's peak RSS (os.wait4's rusage of the child). Prints one JSON object:
peak RSS per size and their ratio. The cache streams, so the ratio should stay near 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env):
    """Runs `python args` to completion; returns that child's own peak RSS in bytes (os.wait4's
    rusage of the one process; Linux reports KiB)."""
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            log.seek(0)
            sys.exit(f"error: {' '.join(args[:3])} failed:\n{log.read()[-2000:]}")
    return usage.ru_maxrss * 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=256, help="N: the small dataset (the large one is 10N)")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("--tmp", default="", help="working directory (default: a new temporary one)")
    args = p.parse_args(argv)
    tmp = args.tmp or tempfile.mkdtemp(prefix="sorajax-cache-mem-")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cfg = ["--config", "configs/toy.py:runlocal"]
    run = os.path.join(tmp, "run")
    data = os.path.join(tmp, "data")
    # The VAE to encode with (stage 'vae' only), then the datasets (built once, outside the measure).
    _run(["-m", "sorajax.train", *cfg, "--workdir", run, f"--config.data.data_dir={data}",
          "--config.stages=('vae',)", "--config.vae_train.steps=2"], env)
    sizes = [args.clips, 10 * args.clips]
    for n in sizes:
        code = (f"from sorajax import config_lib; from sorajax.data import builders; "
                f"c = config_lib.load_config('configs/toy.py:runlocal'); c.data.num_train = {n}; "
                f"c.data.data_dir = {data!r}; builders.source(c.data, 'train', build=True)")
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True)
    out = {"clips": sizes, "peak_rss_bytes": [], "seconds": []}
    for n in sizes:
        t0 = time.time()
        rss = _run(["-m", "sorajax.cache_latents", *cfg, "--data", data, "--out", os.path.join(tmp, f"lat{n}"),
                    "--workdir", run, f"--config.data.num_train={n}"], env)
        out["peak_rss_bytes"].append(rss)
        out["seconds"].append(round(time.time() - t0, 1))
    out["rss_growth"] = round(out["peak_rss_bytes"][1] / out["peak_rss_bytes"][0] - 1, 4)
    out["machine"] = {"cpus": os.cpu_count()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
