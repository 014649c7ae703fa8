"""Experiments from configs (sorajax/experiments.py, scripts/reproduce.py): every experiment file
resolves into declared training configs; the table is the mean and standard deviation over the
seeds' own scores; a rerun replaces the experiment's section of RESULTS.md and reuses finished
runs; arms that differ only in sampling share one training run per seed; bad input is one line
and exit 2."""
import json
import os
import re

import numpy as np
import pytest

from sorajax import cli, experiments
from sorajax.errors import UserError
from tests.helpers import ROOT, cli_env, run_cli

ENCODED = re.compile(r"latent cache \S+: \d+ clips")  # what sorajax/latents.py prints when it encodes
EXPERIMENTS = sorted(p for p in (ROOT / "configs" / "experiments").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_every_experiment_loads_into_declared_configs(path, arg):
    exp = experiments.load(f"{path}:{arg}" if arg else str(path))
    assert len(exp.arms) >= 2 and exp.prompts == "test"
    assert f"python scripts/reproduce.py configs/experiments/{path.name}" in path.read_text()
    for arm in exp.arms.values():  # each arm is a valid config (declared keys, valid values)
        cfg = experiments.train_config(exp, arm, seed=2)
        assert cfg.seed == 2


def test_table_is_mean_and_std_over_the_seeds_scores():
    per_seed = {"a": [{"m": 0.5}, {"m": 0.7}, {"m": 0.9}], "b": [{"m": 0.1}, {"m": 0.1}, {"m": 0.4}]}
    s = experiments.summarize(per_seed, ("m",))
    assert s["a"]["m"]["mean"] == pytest.approx(0.7) and s["a"]["m"]["std"] == pytest.approx(0.2)
    assert s["b"]["m"]["mean"] == pytest.approx(0.2) and s["b"]["m"]["std"] == pytest.approx(np.std([.1, .1, .4], ddof=1))
    exp = experiments.Experiment(name="x", question="q", base="configs/toy.py", overrides=(),
                                 arms={"a": experiments.Arm(), "b": experiments.Arm()}, metrics=("m",))
    assert experiments.table(exp, s).splitlines()[2:] == ["| a | 0.700 ± 0.200 |", "| b | 0.200 ± 0.173 |"]
    one = experiments.summarize({"a": [{"m": 0.5}], "b": [{"m": 0.25}]}, ("m",))
    assert experiments.table(exp, one).splitlines()[2] == "| a | 0.500 |"  # one seed: no std


def test_results_section_is_replaced_and_the_rest_kept(tmp_path):
    p = str(tmp_path / "R.md")
    experiments.write_results(p, "<!-- experiment: a -->\nA1\n<!-- end: a -->\n", "a")
    experiments.write_results(p, "<!-- experiment: b -->\nB1\n<!-- end: b -->\n", "b")
    experiments.write_results(p, "<!-- experiment: a -->\nA2\n<!-- end: a -->\n", "a")
    text = open(p).read()
    assert text.startswith("# Results") and "A2" in text and "A1" not in text and "B1" in text
    assert text.count("<!-- experiment: a -->") == 1 and text.index("A2") < text.index("B1")


def test_reproduce_shares_runs_across_sampling_arms_and_reuses_them(tmp_path):
    """sample_shift:runlocal, two seeds: its two arms differ only in sampling, so one DiT run per
    seed is trained and scored twice (with different schedules); both runs train on the
    experiment's one VAE and its one latent cache (encoded once, normalisation statistics
    included); the section lands in --results; a rerun retrains and rescores nothing and writes
    the same table. Run from another directory with a relative --workdir (the runs' links to the
    shared VAE must still resolve)."""
    for name in ("configs", "scripts"):  # the same relative paths as from the checkout
        os.symlink(ROOT / name, tmp_path / name)
    argv = ["scripts/reproduce.py", "configs/experiments/sample_shift.py:runlocal", "--seeds", "2",
            "--workdir", "exp", "--results", str(tmp_path / "R.md")]
    # 2 devices, like tests/test_cli.py's trained run: the same toy:runlocal training programs,
    # so they come from the session's XLA cache instead of compiling again (75 s -> 43 s idle).
    r = run_cli(argv, env=cli_env(2), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(ENCODED.findall(r.stdout)) == 1, r.stdout[-3000:]  # the clips are encoded once
    run_dirs = [tmp_path / "exp" / "runs" / n for n in sorted(os.listdir(tmp_path / "exp" / "runs"))]
    assert [d.name[:3] for d in run_dirs] == ["s0-", "s1-"], run_dirs
    assert len({os.path.realpath(d / "latents") for d in run_dirs}) == 1
    stats = [json.load(open(d / "config.json"))["vae"]["overrides"]["latents_mean"] for d in run_dirs]
    assert stats[0] == stats[1]
    for d in run_dirs:
        scores = sorted(f for f in os.listdir(d) if f.startswith("reproduce-eval-"))
        assert sorted(json.load(open(d / f))["info"]["sample"]["shift"] for f in scores) == [1.0, 3.0]
    summary = json.load(open(tmp_path / "exp" / "sample_shift.json"))["summary"]
    assert set(summary) == {"shift 1", "shift 3"} and summary["shift 1"]["color_adherence"]["n"] == 2
    text = (tmp_path / "R.md").read_text()
    assert "python scripts/reproduce.py configs/experiments/sample_shift.py:runlocal --seeds 2" in text
    assert "| shift 1 |" in text and "| shift 3 |" in text
    r2 = run_cli(argv, env=cli_env(2), cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "[dit] already trained" in r2.stdout and not ENCODED.search(r2.stdout)
    assert "sampling" not in r2.stderr  # every score reused, nothing sampled
    table = [l for l in text.splitlines() if l.startswith("| shift")]
    text2 = (tmp_path / "R.md").read_text()
    assert [l for l in text2.splitlines() if l.startswith("| shift")] == table
    assert "reused from earlier invocations: 2 of 2 finished runs, 4 of 4 scores" in text2
    assert "reused" not in text  # the first invocation computed everything


@pytest.mark.parametrize("args, words", [
    (["configs/experiments/nope.py"], "no such file"),
    (["configs/toy.py"], "has no get_experiment"),
    (["configs/experiments/sample_shift.py:big"], "unknown argument 'big'"),
    (["configs/experiments/sample_shift.py", "--seeds", "0"], "--seeds 0"),
    (["configs/experiments/sample_shift.py", "--results", "out.txt"], "unsupported extension"),
])
def test_bad_input_is_one_line_exit_2(args, words, tmp_path, capsys):
    rc = cli.run(experiments.main, [*args, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and words in err[-1], err
    assert not (tmp_path / "w").exists()


def test_unknown_sampling_key_or_config_key_in_an_arm_is_refused(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("from sorajax.experiments import Arm, Experiment\n"
                 "def get_experiment(arg=''):\n"
                 "    return Experiment(name='bad', question='q', base='configs/toy.py', overrides=(),\n"
                 "                      arms={'a': Arm(sample=dict(cfg=2.0)), 'b': Arm()})\n")
    with pytest.raises(UserError, match=r"unknown sampling keys \['cfg'\]"):
        experiments.load(str(f))
    f.write_text(f.read_text().replace("Arm(sample=dict(cfg=2.0))", "Arm(train=('--config.dit_train.nope=1',))"))
    with pytest.raises(UserError, match="unknown config key 'dit_train.nope'"):
        experiments.load(str(f))
