"""Training: `python -m sorajax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.K=V ...]`.

`train_and_evaluate(config, workdir)` runs the config's stages in order (sorajax/stages.py:
"vae" into DIR/vae, then "dit" into DIR). `run_stage` is the one loop every stage shares: mesh,
sharded state (sorajax/train_state.py), the jitted step, Orbax checkpoints under
STAGE_DIR/checkpoints (async), STAGE_DIR/metrics.jsonl and TensorBoard events, resume where it
stopped, SIGTERM/NaN handling.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm import tqdm

from sorajax import checkpoint as ckpt_lib
from sorajax import cli, config_lib, fileio, flops, sharding, stages, validate
from sorajax.data import builders, pipeline
from sorajax.errors import RunFailed, UserError
from sorajax.train_state import Trainer


# ==============================================================================================
# Stopping and metrics.
# ==============================================================================================
class _Stop:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit 0.

    Multi-process: the processes must stop at the same step (the save is collective), but a
    signal reaches each at a different moment; `agree()`, called by all once per step, makes
    `requested` true everywhere as soon as any process has been signalled."""

    def __init__(self):
        self.signalled = False
        self._agreed = False
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signalled if jax.process_count() == 1 else self._agreed

    def agree(self):
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.asarray(self.signalled, np.int32))
            self._agreed = bool(np.any(flags))

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signalled = True
        print(f"\nreceived signal {signum}: finishing this step, saving a checkpoint, then exiting",
              flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@functools.lru_cache(maxsize=None)
def _cpu_matmul_ceiling(n: int = 1024, repeats: int = 5) -> float:
    """This machine's f32 matmul FLOP/s (jitted n x n @ n x n on the first CPU device, the best of
    `repeats` after a warm-up; ~0.3 s once per process): the CPU stand-in for a chip's peak in the
    trainer's MFU. scripts/benchmark.py measures the ceiling more carefully (larger sizes)."""
    a = jax.device_put(np.ones((n, n), np.float32), jax.devices("cpu")[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def _run_peak_flops(devices) -> tuple[float | None, str]:
    """(peak FLOP/s of all `devices` together, what it is) for the trainer's MFU: the chips' bf16
    peak (flops.PEAK_BF16_FLOPS) times their count on TPU/GPU; on CPU the measured f32 matmul
    ceiling of the machine (fake CPU devices share its cores: not multiplied); None if unknown."""
    devices = list(devices)
    if devices and devices[0].platform == "cpu":
        return _cpu_matmul_ceiling(), "cpu f32 matmul ceiling (measured)"
    peak = flops.peak_flops(devices[0]) if devices else None
    if peak is None:
        return None, "unknown chip"
    return peak * len(devices), f"{len(devices)} x {devices[0].device_kind} bf16 peak"


def _append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def _truncate_metrics(path, upto_step):
    """On resume, drop logged lines after the restored step so metrics.jsonl has no repeats."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:  # a line cut short by a kill -9 is dropped; a kept line always ends the line
                if json.loads(line)["step"] <= upto_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    fileio.write_text(path, "".join(keep))


# ==============================================================================================
# The loop.
# ==============================================================================================
def run_stage(stage: stages.Stage, config, mesh) -> dict:
    """Trains one stage to its `steps` (resuming if checkpoints exist). Returns the final state."""
    tcfg = stage.tcfg
    os.makedirs(stage.workdir, exist_ok=True)
    trainer = Trainer(stage, config, mesh)
    ckpt = ckpt_lib.Checkpointer(os.path.join(stage.workdir, "checkpoints"),
                                 max_to_keep=tcfg.keep_checkpoints)
    # Every process walks the same global batches and reads only the rows its devices hold, so
    # the data at each step does not depend on the process count or the mesh (and neither does
    # the iterator state saved with checkpoints). Batch sizes were checked in validate_mesh.
    rows = sharding.process_batch_rows(mesh, trainer.rules, tcfg.batch_size)
    it = stage.iterator(mesh, rows, seed=config.seed + stage.data_seed_offset)

    abstract = trainer.abstract_target()
    restored = ckpt.restore_latest_good({
        "model": {"params": abstract["params"], "frozen": abstract["frozen"]},
        "ema": abstract["ema"], "opt": abstract["opt"], "train": abstract["train"], "data": None})
    if restored is not None:
        step0, items = restored
        state = {"params": items["model"]["params"], "frozen": items["model"]["frozen"],
                 "opt": items["opt"], "ema": items["ema"], "train": items["train"]}
        pipeline.set_state(it, items["data"]["iterator"])
        print(f"[{stage.name}] resumed from {ckpt.directory}/{step0}", flush=True)
    else:
        step0 = 0
        state = stage.init_state(trainer.init(), trainer, mesh)
    metrics_path = os.path.join(stage.workdir, "metrics.jsonl")
    lead = jax.process_index() == 0
    if lead:
        _truncate_metrics(metrics_path, step0)
    writer = SummaryWriter(os.path.join(stage.workdir, "tensorboard")) if lead else None
    step_fn = trainer.step_fn()

    def save(step, force=False):
        model = {"params": state["params"], "frozen": state["frozen"]}
        ckpt.save(step, {"model": model, "ema": state["ema"], "opt": state["opt"],
                         "train": state["train"], "data": {"iterator": pipeline.get_state(it)},
                         "meta": dict(stage.meta(), stage=stage.name, step=int(step))}, force=force)

    total, max_bad = int(tcfg.steps), int(tcfg.max_nonfinite_in_a_row)
    # Throughput: model FLOPs per step (flops.py) over the peak of this run's devices -> MFU.
    step_flops = stage.step_flops()
    peak, peak_what = _run_peak_flops(mesh.devices.flat) if step_flops else (None, "")
    if lead and step_flops:
        print(f"[{stage.name}] {step_flops / 1e9:.3g} GFLOP per step; MFU against "
              f"{peak / 1e12 if peak else float('nan'):.3g} TFLOP/s ({peak_what})", flush=True)
    t_last, s_last = time.time(), step0
    step = step0
    bar = tqdm(total=total, initial=step0, desc=f"train {stage.name}", unit="step",
               disable=not lead, dynamic_ncols=True, mininterval=1.0)

    def nonfinite_stop(bad_run, step):
        bar.close()
        ckpt.wait()  # a save in flight finishes: it holds the last good state
        last = ckpt.latest_step()
        ckpt.close()
        kept = f"{ckpt.directory}/{last}" if last is not None else f"none written yet in {ckpt.directory}"
        raise RunFailed(
            f"{stage.name}: {bad_run} non-finite losses/gradients in a row at step {step} "
            f"({stage.section}.max_nonfinite_in_a_row={max_bad}); stopped; last good checkpoint: {kept}")

    with _Stop() as stop:
        while step < total:
            local = next(it)  # bucketed batches (dit_train.packing="bucket") say their global size
            size = int(local["global_batch"]) if "global_batch" in local else tcfg.batch_size
            batch = sharding.global_batch(stage.local_batch(local), mesh, trainer.rules, batch_size=size)
            state, m = step_fn(state, batch)
            step += 1
            stop.agree()
            ev = stage.eval_every()
            eval_now = ev and (step % ev == 0 or step == total)
            if step % tcfg.log_every == 0 or step == total or eval_now:  # the only host fetch of metrics
                host = {k: float(v) for k, v in jax.device_get(m).items()}
                now = time.time()
                sps = (step - s_last) / max(now - t_last, 1e-9)
                if eval_now:  # its metrics join this step's row; its time is not the next rows'
                    host.update(stage.evaluate(state, trainer, step))
                    now = time.time()
                t_last, s_last = now, step
                bad_run = int(jax.device_get(state["train"]["nonfinite_in_a_row"]))
                host["step_traces"] = trainer.traces  # > 1: batch shapes changed and the step recompiled
                host.update(stage.host_metrics(step))
                if step_flops:
                    host["model_tflops_per_sec"] = step_flops * sps / 1e12
                    if peak:
                        host["mfu"] = step_flops * sps / peak
                if lead:
                    _append_jsonl(metrics_path, {"step": step, "stage": stage.name, **host,
                                                 "steps_per_sec": sps})
                    for k, v in host.items():
                        writer.add_scalar(f"{stage.name}/{k}", v, step)
                bar.set_postfix(loss=f"{host['loss']:.4f}", sps=f"{sps:.2f}")
                if bad_run >= max_bad:
                    nonfinite_stop(bad_run, step)
            bar.update(1)
            if step % tcfg.ckpt_every == 0 or step == total or stop.requested:
                # No checkpoint inside a run of skipped (non-finite) steps: the one written before
                # the run began is the last good one that a stop keeps (the skipped steps left the
                # weights as they were, so nothing is lost). A preemption or the last step saves.
                bad_run = int(jax.device_get(state["train"]["nonfinite_in_a_row"]))
                if bad_run >= max_bad:
                    nonfinite_stop(bad_run, step)
                if bad_run and step != total and not stop.requested:
                    print(f"[{stage.name}] step {step}: {bad_run} non-finite step(s) in a row; "
                          f"not checkpointing until an update succeeds", flush=True)
                else:
                    save(step, force=stop.requested)
            if stop.requested:
                ckpt.close()
                bar.close()
                print(f"[{stage.name}] stopped at step {step}; checkpoint saved in {ckpt.directory}",
                      flush=True)
                raise SystemExit(0)
    bar.close()
    ckpt.close()
    try:
        stage.on_end(state, trainer, writer, step)
    finally:
        if writer is not None:
            writer.close()
    return {"state": state, "trainer": trainer}


# ==============================================================================================
# All stages of a config.
# ==============================================================================================
def _write_config(config, workdir):
    if jax.process_index() == 0:
        fileio.write_text(os.path.join(workdir, "config.json"), config_lib.to_json(config))


def train_and_evaluate(config, workdir: str):
    """Runs every stage of `config` in `workdir`; returns the last stage's final state."""
    validate.validate(config)
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh)  # UserError when the axis sizes do not fit the devices
    validate.validate_mesh(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir)
    # Process 0 builds the dataset (once); the others wait, then read it.
    if jax.process_index() == 0 and config.data.source != "latents":
        builders.source(config.data, "train", build=True)
    sharding.sync("sorajax:world_built")
    out = None
    for name in config.stages:
        if name == "dit":
            tok_path = stages.ensure_tokenizer(config, workdir)
            stage = stages.DiTStage(config, workdir, stages.load_tokenizer(tok_path), tok_path)
        else:
            stage = stages.STAGES[name](config, workdir)
        stage.prepare(mesh)  # also for a finished stage: it may measure settings the run keeps
        _write_config(config, workdir)  # (the latent statistics of vae.normalize_latents)
        if stages.stage_done(stage):
            print(f"[{name}] already trained ({stage.workdir}); skipping", flush=True)
            continue
        out = run_stage(stage, config, mesh)
    return out


# ==============================================================================================
# Command line.
# ==============================================================================================
def parse_args(argv):
    p = cli.Parser(
        prog="python -m sorajax.train",
        description="Train (or resume) a sorajax model from a config. Writes WORKDIR/metrics.jsonl, "
                    "TensorBoard events under WORKDIR/tensorboard, Orbax checkpoints under "
                    "WORKDIR/checkpoints (and WORKDIR/vae/... for the VAE stage). Re-running the same "
                    "command resumes from the last complete checkpoint.",
        epilog="Override any declared config key (sorajax/config_base.py) with --config.KEY=VALUE, "
               "e.g. --config.dit_train.steps=100 --config.dit_train.grad_accum=2 "
               "--config.dit.overrides.remat=full.")
    p.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:ARG (e.g. :runlocal)")
    p.add_argument("--workdir", required=True, help="run directory (created if missing)")
    return p.parse_known_args(argv)


def _has_checkpoints(workdir) -> bool:
    return any(ckpt_lib.list_steps(d) for d, _, _ in os.walk(workdir)
               if os.path.basename(d) == "checkpoints")


def _check_workdir(workdir):
    if "://" in workdir:  # os.makedirs("gs://b/r") would make a local ./gs:/b/r and lose the run
        raise UserError(f"--workdir {workdir!r}: URLs are not supported; mount the bucket (e.g. gcsfuse) "
                        "and pass the mounted path (docs/RELIABILITY.md)")
    if not workdir.strip():
        raise UserError("--workdir '': give a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {workdir!r} cannot be created: {e.strerror}") from e
    if not os.access(workdir, os.W_OK):
        raise UserError(f"--workdir {workdir!r} is not writable")


def _main(argv):
    args, rest = parse_args(argv)
    config = config_lib.apply_overrides(config_lib.load_config(args.config), rest)
    validate.validate(config)
    existed = os.path.isdir(args.workdir)
    _check_workdir(args.workdir)
    try:
        train_and_evaluate(config, args.workdir)
    except UserError:
        # Bad input found before any checkpoint: the workdir this command created (config.json,
        # empty logs) goes too. A run that checkpointed keeps everything.
        if not existed and jax.process_index() == 0 and not _has_checkpoints(args.workdir):
            shutil.rmtree(args.workdir, ignore_errors=True)
        raise
    print(f"done: run in {os.path.abspath(args.workdir)}", flush=True)
    return 0


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
