"""The end-to-end demo behind `make demo` (scripts/demo.py is its thin entry point)."""
from __future__ import annotations

import os
import time

from sorajax import config_lib, evaluate, fileio, inference, train, video_io
from sorajax.data import world as world_lib


def run_demo(config_spec: str, workdir: str, samples_dir: str, overrides=()) -> int:
    t0 = time.time()
    config = config_lib.apply_overrides(config_lib.load_config(config_spec), list(overrides))
    train.train_and_evaluate(config, workdir)
    t_train = time.time() - t0

    pipe = inference.load_pipeline(workdir=workdir)
    prompts = [p.caption for p in world_lib.EVAL_PROMPTS]
    out = pipe.generate(prompts, seed=0)
    os.makedirs(samples_dir, exist_ok=True)
    paths = []
    for ext in (".mp4", ".gif"):
        paths.append(video_io.write(os.path.join(samples_dir, "world" + ext), out["frames"], prompts))
    paths.append(video_io.write(os.path.join(samples_dir, "world_contact_sheet.png"), out["frames"], prompts))
    for i in range(min(4, len(prompts))):
        paths.append(video_io.write(os.path.join(samples_dir, f"prompt{i:02d}.mp4"), out["frames"][i:i + 1]))

    report_path = os.path.join(workdir, "eval.json")
    report = evaluate.run_benchmark(evaluate.model_generate(pipe), info={"workdir": workdir})
    fileio.write_json(report_path, report)
    m = report["metrics"]
    print("")
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min (training {t_train / 60:.1f} min)")
    print(f"  trained run:  {os.path.abspath(workdir)}  (metrics.jsonl, tensorboard/, checkpoints/)")
    print(f"  videos:       {os.path.abspath(samples_dir)}/  ({', '.join(os.path.basename(p) for p in paths[:3])}, ...)")
    print(f"  world eval:   {os.path.abspath(report_path)}")
    print("  metrics:      " + ", ".join(f"{k}={v:.3f}" for k, v in m.items()))
    print(f"  try:          python -m sorajax.sample --workdir {workdir} --prompt \"{prompts[0]}\" --out my.mp4")
    return 0
