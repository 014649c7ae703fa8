"""The step cache on a trained run: its speed-up and its cost on the world metrics.

    python scripts/step_cache.py --workdir runs/toy --thresholds 0,0.1,0.2,0.4 --prompts validation --out R.json

For each threshold (0 = the cache off), in one process so that the ratios are fair on a noisy
machine: the median wall time of the jitted sampler on 12 prompts (no decode; `--repeats` runs
after a warm-up, thresholds interleaved round by round), the share of model calls that ran the
DiT blocks, and the world benchmark (sorajax.evaluate) on the prompt set with that threshold.
Choose the threshold on `--prompts validation` and report it on `--prompts test`
(docs/PERFORMANCE.md).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a trained run")
    ap.add_argument("--thresholds", default="0,0.1,0.2,0.4", help="comma list; 0 = the cache off")
    ap.add_argument("--prompts", default="validation", choices=["validation", "test"])
    ap.add_argument("--repeats", type=int, default=5, help="timed sampler runs per threshold")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    from sorajax import cli, evaluate, fileio, inference
    from sorajax.data import world as world_lib
    from sorajax.errors import UserError

    def run(_):
        try:
            thresholds = [float(x) for x in a.thresholds.split(",")]
        except ValueError:
            raise UserError(f"--thresholds {a.thresholds!r}: a comma list of numbers >= 0") from None
        if any(not t >= 0 for t in thresholds):
            raise UserError(f"--thresholds {a.thresholds!r}: every threshold must be >= 0")
        cli.check_writable_output(a.out, (".json",), "--out")
        pipe = inference.load_pipeline(workdir=a.workdir)
        caps = [p.caption for p in world_lib.PROMPT_SETS[a.prompts][:12]]
        sample = lambda t: pipe.generate(caps, seed=0, steps=a.steps, step_cache=t, decode=False)
        times = {t: [] for t in thresholds}
        for t in thresholds:
            sample(t)  # compile + warm-up
        for _ in range(a.repeats):  # interleaved: load drift hits every threshold alike
            for t in thresholds:
                t0 = time.perf_counter()
                sample(t)
                times[t].append(time.perf_counter() - t0)
        rows = []
        for t in thresholds:
            gen = evaluate.model_generate(pipe, steps=a.steps, step_cache=t)
            rep = evaluate.run_benchmark(gen, prompts=a.prompts)
            frac = gen.stats["block_runs"] / gen.stats["model_calls"] if t > 0 else 1.0
            rows.append(dict(threshold=t, sampler_s=statistics.median(times[t]), sampler_all_s=times[t],
                             block_run_fraction=frac, metrics=rep["metrics"]))
        base = rows[0]["sampler_s"] if thresholds[0] == 0 else None
        for r in rows:
            r["speedup"] = base / r["sampler_s"] if base else None
        fileio.write_json(a.out, dict(workdir=os.path.abspath(a.workdir), prompts=a.prompts,
                                      steps=a.steps or pipe.defaults["steps"], rows=rows))
        keys = ("color_adherence", "direction_adherence", "shape_adherence", "prompt_adherence")
        print(f"{'threshold':>9} {'blocks run':>10} {'sampler s':>9} {'speed-up':>8} " +
              " ".join(f"{k.split('_')[0]:>9}" for k in keys))
        for r in rows:
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            print(f"{r['threshold']:>9g} {r['block_run_fraction']:>10.2f} {r['sampler_s']:>9.3f} {sp:>8} " +
                  " ".join(f"{r['metrics'][k]:>9.3f}" for k in keys))
        return 0

    return cli.run(run, [])


if __name__ == "__main__":
    sys.exit(main())
