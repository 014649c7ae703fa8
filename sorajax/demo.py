"""The end-to-end demo behind `make demo` (scripts/demo.py is its thin entry point)."""
from __future__ import annotations

import os
import time

import numpy as np

from sorajax import config_lib, evaluate, fileio, inference, mode_eval, modes, train, video_io


def run_demo(config_spec: str, workdir: str, samples_dir: str, overrides=()) -> int:
    t0 = time.time()
    config = config_lib.apply_overrides(config_lib.load_config(config_spec), list(overrides))
    train.train_and_evaluate(config, workdir)
    t_train = time.time() - t0

    # The test prompts are sampled once: the benchmark scores them and the same clips are written.
    pipe = inference.load_pipeline(workdir=workdir)
    generate, made = evaluate.model_generate(pipe), []

    def generate_and_keep(captions, seed):
        frames = generate(captions, seed)
        made.append((list(captions), frames))
        return frames

    report = evaluate.run_benchmark(generate_and_keep, info={"workdir": workdir},
                                    holdout=tuple(pipe.config.data.holdout))
    report["vae"] = evaluate.vae_reconstruction(pipe)
    report_path = os.path.join(workdir, "eval.json")
    fileio.write_json(report_path, report)
    prompts = [c for caps, _ in made for c in caps]
    frames = np.concatenate([f for _, f in made])
    os.makedirs(samples_dir, exist_ok=True)
    paths = []
    for ext in (".mp4", ".gif"):
        paths.append(video_io.write(os.path.join(samples_dir, "world" + ext), frames, prompts))
    paths.append(video_io.write(os.path.join(samples_dir, "world_contact_sheet.png"), frames, prompts))
    for i in range(min(4, len(prompts))):
        paths.append(video_io.write(os.path.join(samples_dir, f"prompt{i:02d}.mp4"), frames[i:i + 1]))

    # The generation modes (i2v, extend, connect, loop, long, v2v, keyframes) against the world's
    # truth, with a contact sheet per mode (sorajax/mode_eval.py).
    runner = modes.Runner(pipe, seed=0)
    modes_report = mode_eval.run_modes(runner, sheets_dir=os.path.join(samples_dir, "modes"))
    modes_report["info"].update(source="model", workdir=os.path.abspath(workdir))
    modes_path = os.path.join(workdir, "modes.json")
    fileio.write_json(modes_path, modes_report)

    m = report["metrics"]
    print("")
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min (training {t_train / 60:.1f} min)")
    print(f"  trained run:  {os.path.abspath(workdir)}  (metrics.jsonl, tensorboard/, checkpoints/)")
    print(f"  videos:       {os.path.abspath(samples_dir)}/  ({', '.join(os.path.basename(p) for p in paths[:3])}, ...)")
    print(f"  world eval:   {os.path.abspath(report_path)}")
    print("  metrics:      " + ", ".join(f"{k}={v:.3f}" for k, v in m.items()))
    for g in ("seen", "heldout"):
        if f"metrics_{g}" in report:
            mg = report[f"metrics_{g}"]
            print(f"  {g + ' pairs:':<14}" + ", ".join(f"{k}={mg[k]:.3f}" for k in
                                                     ("color_adherence", "shape_adherence", "prompt_adherence")))
    v = report["vae"]
    print(f"  VAE:          PSNR {v['psnr']:.2f} dB (by frame {v['psnr_by_frame']}), SSIM {v['ssim']:.3f}")
    print(f"  VAE ceiling:  {evaluate.ceiling_line(v['ceiling'])}  (the benchmark on its round trip)")
    print(f"  modes eval:   {os.path.abspath(modes_path)}  (contact sheets in {os.path.abspath(samples_dir)}/modes/)")
    print("  modes:        " + ", ".join(f"{k}={v:.3f}" for k, v in modes_report["metrics"].items()
                                       if v is not None and not k.endswith("_adherence")))
    print(f"  try:          python -m sorajax.sample --workdir {workdir} --prompt \"{prompts[0]}\" --out my.mp4")
    return 0
