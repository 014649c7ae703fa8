"""Nothing lost, nothing hidden (docs/RELIABILITY.md): kill -9 at random moments and SIGTERM
resume bit-exactly, a truncated newest checkpoint is named and skipped, NaN/Inf updates are
skipped, counted and stop the run.

The runs are the toy config's VAE stage shrunk to seconds (a 2x2x2-compression VAE on 16x16
single-frame clips, batch 2, one CPU device). The kill -9 runs checkpoint every 3 steps: most of
their wall time is checkpoint writing, so a kill often lands mid-write, and one is aimed there
on purpose. The checkpoint interval does not change the losses, so the other runs checkpoint
less often and are still compared with the same uninterrupted run."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import ROOT, cli_env

STEPS = 30
TINY = ["--config", "configs/toy.py:runlocal", "--config.stages=('vae',)",
        "--config.vae.overrides={'base_dim': 4, 'z_dim': 4, 'dim_mult': (1, 2), 'temporal_downsample': (True,)}",
        "--config.data.height=16", "--config.data.width=16", "--config.data.num_train=16",
        "--config.data.num_eval=2", "--config.vae_train.batch_size=2", "--config.vae_train.clip_frames=1",
        "--config.vae_train.log_every=1", "--config.vae_train.ckpt_every=3"]


def _env():
    return cli_env(devices=1)


def _argv(workdir, data_dir, steps=STEPS, *extra):
    return [sys.executable, "-m", "sorajax.train", *TINY, "--workdir", str(workdir),
            f"--config.data.data_dir={data_dir}", f"--config.vae_train.steps={steps}", *extra]


def _start(log_prefix, *argv):
    with open(f"{log_prefix}.out", "w") as out, open(f"{log_prefix}.err", "w") as err:
        return subprocess.Popen(list(argv), cwd=ROOT, env=_env(), stdout=out, stderr=err, text=True)


def _run(*argv, timeout=300):
    return subprocess.run(list(argv), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _logs(prefix):
    return open(f"{prefix}.out").read(), open(f"{prefix}.err").read()


def _rows(workdir):
    path = os.path.join(workdir, "vae", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return out


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in _rows(workdir)]


def _last_step(workdir):
    rows = _rows(workdir)
    return rows[-1]["step"] if rows else 0


def _ckpt_dir(workdir):
    return os.path.join(workdir, "vae", "checkpoints")


def _wait(proc, cond, timeout=240):
    """Polls until cond() holds (True) or the process exits (False)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("no progress")


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def data_dir(tmp_path_factory):
    """The tiny world dataset, built once (the runs below only read it)."""
    from sorajax import config_lib
    from sorajax.data import builders

    d = tmp_path_factory.mktemp("reliability_data")
    cfg = config_lib.apply_overrides(config_lib.load_config(str(ROOT / "configs" / "toy.py:runlocal")),
                                     [a for a in TINY if a.startswith("--config.")] +
                                     [f"--config.data.data_dir={d}"])
    builders.world_source(cfg.data, "train", build=True)
    return d


class _Baseline:
    """The uninterrupted 30-step run, started once in the background for the tests below."""

    def __init__(self, tmp, data_dir):
        self.workdir = tmp / "base"
        # Checkpoint frequency does not change the training math: fewer saves, same losses.
        self.proc = _start(tmp / "base", *_argv(self.workdir, data_dir, STEPS, "--config.vae_train.ckpt_every=10"))
        self._tmp = tmp

    def losses(self):
        assert self.proc.wait(timeout=300) == 0, _logs(self._tmp / "base")[1][-3000:]
        got = _losses(self.workdir)
        assert [s for s, _ in got] == list(range(1, STEPS + 1))
        return got


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def baseline(tmp_path_factory, data_dir):
    b = _Baseline(tmp_path_factory.mktemp("baseline"), data_dir)
    yield b
    if b.proc.poll() is None:
        b.proc.kill()
        b.proc.wait()


def _finished_steps(workdir):
    d = _ckpt_dir(workdir)
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_kill_9_at_random_steps_resumes_to_identical_losses(baseline, data_dir, tmp_path):
    """30 steps, SIGKILL at 3 seeded-random steps (the second one while a checkpoint is being
    written), restart after each. Every run after a kill must resume from the newest finished
    checkpoint (not start over), and every step it computes itself must equal the uninterrupted
    run's loss, bit for bit; the final metrics.jsonl equals the uninterrupted run's."""
    want = dict(baseline.losses())
    wd = tmp_path / "killed"
    kills = sorted(random.Random(20240605).sample(range(3, STEPS - 2), 3))
    mid_write = False
    metrics = os.path.join(wd, "vae", "metrics.jsonl")
    inode = lambda: os.stat(metrics).st_ino if os.path.exists(metrics) else None
    checked = []
    for i, k in enumerate(kills + [None]):  # None: the last run, to the end
        finished = _finished_steps(wd)
        resume_from = finished[-1] if finished else 0
        old = inode()  # a resumed run rewrites metrics.jsonl (to the restored step): new inode
        p = _start(tmp_path / f"run{i}", *_argv(wd, data_dir))
        if k is None:
            assert p.wait(timeout=300) == 0, _logs(tmp_path / f"run{i}")[1][-3000:]
        else:
            if _wait(p, lambda: inode() not in (None, old) and _last_step(wd) >= k) and i == 1:
                # Aim for the middle of a checkpoint write: a step directory still being written
                # (a new one: any left by the first kill belongs to an earlier step).
                writing = lambda: [n for n in os.listdir(_ckpt_dir(wd))
                                   if re.match(r"\d+\..*tmp", n) and int(n.split(".")[0]) >= k]
                mid_write = _wait(p, lambda: bool(writing()), timeout=60)
            p.kill()
            p.wait()
        out = _logs(tmp_path / f"run{i}")[0]
        m = re.search(r"\[vae\] resumed from \S+/(\d+)", out)
        assert (int(m.group(1)) if m else 0) == resume_from, (i, resume_from, out[-1500:])
        # The rows past the restored step are this run's own computation (the restart truncated
        # metrics.jsonl to the restored step): each must equal the uninterrupted run's.
        own = [(s, v) for s, v in _losses(wd) if s > resume_from]
        assert own, f"run {i} computed no step"
        assert [s for s, _ in own] == list(range(resume_from + 1, resume_from + 1 + len(own)))
        assert own == [(s, want[s]) for s, _ in own], i
        checked.append((resume_from, own[-1][0]))
    assert mid_write, "the second kill did not land during a checkpoint write"
    # The resume path really ran (a kill may land before the first async save has finished:
    # then that restart starts over, which is right, and is checked above like the others).
    assert any(r > 0 for r, _ in checked[1:]), checked
    left = sorted(os.listdir(_ckpt_dir(wd)))
    assert left and all(n.isdigit() for n in left), left  # no half-written step directories remain
    assert _losses(wd) == baseline.losses()


def test_sigterm_finishes_the_step_saves_and_exits_0_then_resumes(baseline, data_dir, tmp_path):
    wd = tmp_path / "term"
    # No periodic checkpoints: the one the stop writes is the only one before the end.
    p = _start(tmp_path / "term", *_argv(wd, data_dir, STEPS, "--config.vae_train.ckpt_every=1000"))
    assert _wait(p, lambda: _last_step(wd) >= 4), _logs(tmp_path / "term")[1][-3000:]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0, _logs(tmp_path / "term")[1][-3000:]
    out = _logs(tmp_path / "term")[0]
    assert "received signal 15" in out
    m = re.search(r"\[vae\] stopped at step (\d+); checkpoint saved in (\S+)", out)
    assert m, out[-2000:]
    stopped = int(m.group(1))
    assert 4 <= stopped < STEPS
    assert sorted(os.listdir(_ckpt_dir(wd))) == [str(stopped)]
    assert _last_step(wd) == stopped
    r = _run(*_argv(wd, data_dir, STEPS, "--config.vae_train.ckpt_every=1000"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[vae] resumed from {_ckpt_dir(wd)}/{stopped}" in r.stdout
    assert _losses(wd) == baseline.losses()


def _largest_array_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
             if os.sep + "d" + os.sep in os.path.join(d, f)]  # OCDBT data files: */ocdbt.process_*/d/*
    return max(files, key=os.path.getsize)


def test_truncated_newest_checkpoint_is_named_skipped_and_the_run_resumes(baseline, data_dir, tmp_path):
    import shutil

    want = baseline.losses()
    wd = tmp_path / "trunc"
    shutil.copytree(baseline.workdir, wd)
    steps = sorted(int(n) for n in os.listdir(_ckpt_dir(wd)) if n.isdigit())
    newest, previous = steps[-1], steps[-2]
    victim = _largest_array_file(os.path.join(_ckpt_dir(wd), str(newest)))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    r = _run(*_argv(wd, data_dir, STEPS + 3, "--config.vae_train.ckpt_every=10"))
    assert r.returncode == 0, r.stderr[-3000:]
    bad = os.path.join(_ckpt_dir(wd), str(newest))
    assert re.search(rf"checkpoint {re.escape(bad)} is unreadable \(.+\); skipping it", r.stderr), r.stderr[-3000:]
    assert f"[vae] resumed from {_ckpt_dir(wd)}/{previous}" in r.stdout
    assert os.path.isdir(bad + ".unreadable")  # kept for inspection, out of the way of the re-save
    got = _losses(wd)
    assert [s for s, _ in got] == list(range(1, STEPS + 4))
    assert got[:previous] == want[:previous]
    assert os.path.isdir(os.path.join(_ckpt_dir(wd), str(STEPS + 3)))
    assert os.path.isdir(bad)  # the skipped step was saved again, readable this time


def test_nan_gradients_are_skipped_counted_and_stop_the_run(data_dir, tmp_path):
    """NaN gradients injected at steps 2 and 5, 6, 7 (vae_train.max_nonfinite_in_a_row=3): step 2 is
    skipped and training goes on; 5-7 stop the run with exit code 1 and one `error:` line, and no
    checkpoint is written after the NaNs began (step 6's is held back; step 3's is kept)."""
    wd = tmp_path / "nan"
    r = _run(*_argv(wd, data_dir, 12, "--config.vae_train.inject_nonfinite_steps=(2, 5, 6, 7)",
                    "--config.vae_train.max_nonfinite_in_a_row=3"))
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: vae: 3 non-finite losses/gradients in a row at step 7"), last
    assert f"last good checkpoint: {_ckpt_dir(wd)}/3" in last
    assert sorted(os.listdir(_ckpt_dir(wd))) == ["3"]
    rows = _rows(wd)
    assert [x["step"] for x in rows] == list(range(1, 8))
    assert [x["skipped"] for x in rows] == [0, 1, 0, 0, 1, 1, 1]
    assert [x["nonfinite_in_a_row"] for x in rows] == [0, 1, 0, 0, 1, 2, 3]
    assert [x["nonfinite_total"] for x in rows] == [0, 1, 1, 1, 2, 3, 4]
    assert all(np.isfinite(x["loss"]) for x in rows)  # the loss was fine, the gradients were not
    assert not np.isfinite(rows[1]["grad_norm"])
    assert "not checkpointing until an update succeeds" in r.stdout


def test_injected_nan_step_leaves_params_opt_and_ema_unchanged():
    """In process: the step whose gradients are NaN returns the state unchanged (only the step
    counter and the non-finite counters move); later steps update again."""
    import jax

    from sorajax import config_lib, sharding, stages
    from sorajax.train_state import Trainer

    cfg = config_lib.apply_overrides(config_lib.load_config(str(ROOT / "configs" / "toy.py:runlocal")),
                                     [a for a in TINY if a.startswith("--config.")] +
                                     ["--config.vae_train.inject_nonfinite_steps=(1,)"])
    with cfg.unlocked():
        cfg.mesh.data = 1
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    tr = Trainer(stages.VAEStage(cfg, "/nonexistent"), cfg, mesh)
    state = tr.init()
    before = jax.tree.map(np.array, {k: state[k] for k in ("params", "opt", "ema")})  # copies: state is donated
    batch = {"frames": np.random.default_rng(0).uniform(-1, 1, (2, 1, 16, 16, 3)).astype(np.float32)}
    step = tr.step_fn()
    state, m = step(state, sharding.global_batch(batch, mesh, tr.rules))
    after = jax.tree.map(np.asarray, {k: state[k] for k in ("params", "opt", "ema")})
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["grad_norm"]))
    assert int(state["train"]["step"]) == 1 and int(state["train"]["nonfinite_total"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    for _ in range(2):  # (the skipped step did not advance the optimizer's schedule: lr(0) = 0)
        state, m = step(state, sharding.global_batch(batch, mesh, tr.rules))
        assert int(m["skipped"]) == 0 and int(state["train"]["nonfinite_in_a_row"]) == 0
    moved = jax.tree.map(np.asarray, state["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(moved)))
