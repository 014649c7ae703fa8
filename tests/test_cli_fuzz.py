"""Property test over the command-line space of train, sample and evaluate (hypothesis): whatever
the flags, values and paths, a command exits 0 or 2, never prints a traceback, and leaves no
partial files: a failed command (exit 2) adds nothing to the directories it was pointed at, a
successful one leaves no temporary files next to its outputs.

Each example is a subprocess (~2-5 s, mostly the jax import), so the example counts are small and
the search is derandomized (the same examples on every run). Generated argument lists always
contain at least one bad element (so none of them starts a long training or sampling run); the
explicit @example cases add the valid ones: --help, a 2-step training run, sampling with a prompt
longer than the text encoder's max length, the ground-truth benchmark."""
import os
import re
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import FIXTURES, ROOT, cli_env

SETTINGS = settings(max_examples=5, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _env():
    return cli_env(devices=1)


def _listing(d):
    return sorted(os.path.relpath(os.path.join(p, f), d) for p, ds, fs in os.walk(d) for f in fs + ds)


def _check(module, args, tmp):
    """Runs `python -m module args` ({T} = tmp) and checks the contract; returns the result."""
    argv = [a.replace("{T}", tmp) for a in args]
    before = _listing(tmp)
    r = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    shown = f"argv={argv}\nrc={r.returncode}\nstderr:\n{r.stderr[-3000:]}"
    short = [a if len(a) < 60 else a[:57] + "..." for a in argv]
    print(f"{module} {short} -> {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:160]}")
    assert r.returncode in (0, 2), shown
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, shown
    after = _listing(tmp)
    if r.returncode == 2:
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        assert lines and "error:" in lines[-1], shown  # argparse: "prog: error: ...", ours: "error: ..."
        assert after == before, f"{shown}\nnew files: {sorted(set(after) - set(before))}"
    else:
        leftovers = [p for p in after if re.search(r"(^|/)\.?[^/]*\.tmp|orbax-checkpoint-tmp|\.sorajax-probe", p)]
        assert not leftovers, f"{shown}\ntemporary files left: {leftovers}"
    return r


@pytest.fixture(scope="session")  # once per worker, even when xdist interleaves modules
def ckpt(tmp_path_factory):
    """A converted tiny Wan 2.1 checkpoint (9x32x48 clips, 16 text tokens): a valid --checkpoint."""
    d = tmp_path_factory.mktemp("fuzz_ckpt") / "ckpt"
    r = subprocess.run([sys.executable, "scripts/convert_diffusers.py", "--src", str(FIXTURES / "wan_pipeline_tiny"),
                        "--dst", str(d), "--frames", "9", "--height", "32", "--width", "48", "--max-length", "16"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(d)


def _with_one_bad(good_parts, bad_parts):
    """Argument groups: up to 3 good ones, then a bad one (last, so that a repeated flag or key
    keeps the bad value: argparse and --config overrides both let the last one win)."""
    return st.tuples(st.lists(good_parts, max_size=3), bad_parts).map(lambda t: [*t[0], t[1]])


def _flat(groups):
    return [a for g in groups for a in g]


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
TRAIN_TINY = ["--config.stages=('vae',)",
              "--config.vae.overrides={'base_dim': 4, 'z_dim': 4, 'dim_mult': (1, 2), 'temporal_downsample': (True,)}",
              "--config.data.height=16", "--config.data.width=16", "--config.data.num_train=16",
              "--config.data.num_eval=2", "--config.vae_train.batch_size=2", "--config.vae_train.clip_frames=1",
              "--config.vae_train.steps=2", "--config.vae_train.ckpt_every=1", "--config.data.data_dir={T}/data"]
TRAIN_GOOD = st.sampled_from([
    ["--config.dit_train.steps=3"], ["--config.vae_train.log_every=1"], ["--config.data.frames=5"],
    ["--config.seed=3"], ["--config.dit_train.warmup_steps=2"], ["--config.dit_train.lr=0.001"],
    ["--config.data.data_dir={T}/data"], ["--config.dit_train.ema_decay=0.99"],
])
TRAIN_BAD = st.sampled_from([
    ["--config.dit_train.nope=1"], ["--config.data.frames=8"], ["--config.data.frames=-3"], ["--config.data.height=20"],
    ["--config.data.width=0"], ["--config.dit_train.steps=abc"], ["--config.dit_train.steps"], ["--config.=1"],
    ["--config.stages=vae"], ["--config.stages=('vae', 'gan')"], ["--config.stages=()"], ["--config.mesh.data=3"],
    ["--config.mesh.fsdp=0"], ["--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.mesh.tensor=-1"],
    ["--config.dit_train.batch_size=0"], ["--config.vae_train.batch_size=100000"], ["--config.dit_train.log_every=0"],
    ["--config.vae_train.ckpt_every=-2"], ["--config.dit_train.lr=nan"], ["--config.dit_train.lr=1e999"],
    ["--config.dit_train.b2=1.5"], ["--config.seed=-1"], ["--config.vae.variant=huge"],
    ["--config.vae.overrides={'nope': 1}"], ["--config.sharding_rules=5"],
    ["--config.sharding_rules=[('batch', 'nowhere')]"], ["--config.text.tokenizer=/nonexistent/spiece.model"],
    ["--config.text.max_length=1"], ["--config.dit_train.inject_nonfinite_steps=('x',)"],
    ["--config.vae_train.clip_frames=2"], ["--config.flow.shift=0"], ["--bogus-flag"], ["stray"],
])
TRAIN_CONFIG = st.sampled_from([["--config", "configs/toy.py:runlocal"]] * 4 + [
    ["--config", "configs/missing.py"], ["--config", "configs/toy.py:bogus"], ["--config", "configs"],
    ["--config", "README.md"], ["--config", ""], []])
TRAIN_WORKDIR = st.sampled_from([["--workdir", "{T}/run"]] * 4 + [
    ["--workdir", ""], ["--workdir", "gs://bucket/run"], ["--workdir", "/proc/sorajax/run"],
    ["--workdir", "{T}/file.txt/run"], []])


@SETTINGS
@given(cfg=TRAIN_CONFIG, wd=TRAIN_WORKDIR, groups=_with_one_bad(TRAIN_GOOD, TRAIN_BAD))
@example(cfg=["--help"], wd=[], groups=[])
@example(cfg=["--config", "configs/toy.py:runlocal"], wd=["--workdir", "{T}/run"], groups=[TRAIN_TINY])
def test_train_cli_exit_0_or_2_no_traceback_no_partial_files(cfg, wd, groups):
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "file.txt"), "w").close()
        r = _check("sorajax.train", cfg + wd + _flat(groups), tmp)
        if groups == [TRAIN_TINY]:  # the valid run really trained and checkpointed
            assert r.returncode == 0 and os.path.isdir(os.path.join(tmp, "run", "vae", "checkpoints", "2"))


# ----------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------
LONG_PROMPT = " ".join(["a large red circle moves right on a black background"] * 6)
SAMPLE_GOOD = st.sampled_from([
    ["--prompt", "a red circle moves right"], ["--prompt", LONG_PROMPT], ["--steps", "1"], ["--seed", "7"],
    ["--guidance", "1.5"], ["--solver", "euler"], ["--frames", "5"], ["--mode", "t2i"],
    ["--save-latents", "{T}/lat.npy"], ["--negative-prompt", ""],
])
SAMPLE_BAD = st.sampled_from([
    ["--prompt", ""], ["--prompt", "   "], ["--steps", "0"], ["--steps", "x"], ["--frames", "6"], ["--frames", "0"],
    ["--height", "30"], ["--width", "-48"], ["--guidance", "nan"], ["--shift", "0"], ["--shift", "inf"],
    ["--solver", "rk4"], ["--mode", "i2v"], ["--mode", "warp"], ["--seed", str(2 ** 70)],
    ["--noise", "{T}/missing.npy"], ["--noise", "{T}/file.txt"], ["--save-latents", "{T}/lat.txt"],
    ["--save-frames", "/proc/sorajax/f.npy"], ["--out", "{T}/v.avi"], ["--out", "{T}/nodir/v.gif"],
    ["--out", "/proc/v.gif"], ["--out", "{T}"], ["--checkpoint", "{T}/nothing"], ["--workdir", "{T}"],
    ["--workdir", ""], ["--bogus"],
])
SAMPLE_SOURCE = st.sampled_from(["ckpt", "ckpt", "ckpt", "missing", "file", "empty_dir", "none"])
SAMPLE_OUT = st.sampled_from([["--out", "{T}/v.gif"], ["--out", "{T}/v.png"], ["--out", "{T}/v.mp4"], []])
SAMPLE_PROMPT = st.sampled_from([["--prompt", "a small blue square moves up"]] * 3 + [[]])


def _source(kind, ckpt):
    return {"ckpt": ["--checkpoint", ckpt], "missing": ["--checkpoint", "{T}/missing"],
            "file": ["--workdir", "{T}/file.txt"], "empty_dir": ["--workdir", "{T}/empty"], "none": []}[kind]


@SETTINGS
@given(src=SAMPLE_SOURCE, out=SAMPLE_OUT, prompt=SAMPLE_PROMPT, groups=_with_one_bad(SAMPLE_GOOD, SAMPLE_BAD))
@example(src="ckpt", out=["--out", "{T}/v.png"], prompt=[], groups=[["--prompt", LONG_PROMPT, "--steps", "1"]])
@example(src="none", out=[], prompt=[], groups=[["--help"]])
def test_sample_cli_exit_0_or_2_no_traceback_no_partial_files(ckpt, src, out, prompt, groups):
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "file.txt"), "w").close()
        os.mkdir(os.path.join(tmp, "empty"))
        before = _listing(ckpt)
        r = _check("sorajax.sample", _source(src, ckpt) + out + prompt + _flat(groups), tmp)
        assert _listing(ckpt) == before  # reading a checkpoint never writes into it
        if groups == [["--prompt", LONG_PROMPT, "--steps", "1"]]:  # valid: written, and warned once
            assert r.returncode == 0 and os.path.getsize(os.path.join(tmp, "v.png")) > 0
            warn = [l for l in r.stderr.splitlines() if "truncated" in l]
            assert len(warn) == 1 and warn[0].startswith("warning:"), r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
EVAL_GOOD = st.sampled_from([
    ["--ground-truth"], ["--seed", "3"], ["--frames", "9"], ["--height", "32", "--width", "32"],
    ["--batch-size", "13"], ["--steps", "1"], ["--prompts", "validation"], ["--seeds", "2"],
])
EVAL_BAD = st.sampled_from([
    ["--out", "{T}/r.txt"], ["--out", "{T}/nodir/r.json"], ["--out", "/proc/r.json"], ["--out", "{T}/empty"],
    ["--out", ""], ["--frames", "0"], ["--frames", "x"], ["--height", "4"], ["--width", "-1"],
    ["--batch-size", "0"], ["--steps", "0"], ["--guidance", "zz"], ["--workdir", "{T}/missing"],
    ["--workdir", "{T}/empty"], ["--workdir", "{T}/file.txt"], ["--bogus"], ["--seeds", "0"],
    ["--prompts", "train"],
])


@SETTINGS
@given(groups=_with_one_bad(EVAL_GOOD, EVAL_BAD), out=st.sampled_from([["--out", "{T}/r.json"], []]))
@example(groups=[["--ground-truth", "--frames", "5"]], out=["--out", "{T}/r.json"])
@example(groups=[["--help"]], out=[])
def test_evaluate_cli_exit_0_or_2_no_traceback_no_partial_files(groups, out):
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "file.txt"), "w").close()
        os.mkdir(os.path.join(tmp, "empty"))
        r = _check("sorajax.evaluate", out + _flat(groups), tmp)
        if groups == [["--ground-truth", "--frames", "5"]]:
            assert r.returncode == 0 and os.path.getsize(os.path.join(tmp, "r.json")) > 0
