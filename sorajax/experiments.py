"""Experiments reproduced from configs (`python scripts/reproduce.py EXPERIMENT [--seeds N]`).

An experiment file in configs/experiments/ returns an `Experiment`: a base training config, the
overrides every arm shares (the budget), and arms that change training settings (`Arm.train`,
--config.KEY=VALUE strings) and/or sampling settings (`Arm.sample`). For each training seed the
runner trains every distinct training setting once (arms that differ only in sampling share it),
samples the world benchmark's prompt set with each arm's settings and scores it
(sorajax/evaluate.py), then writes a table of mean +- std over the seeds per arm and metric into
docs/RESULTS.md (its own section, replaced on a rerun) with the command that made it.

What is shared, on purpose: the frozen VAE is trained once per experiment (training seed 0, the
base settings; an arm that changes `--config.vae*` or `--config.data*` gets its own), and so is
its latent cache (every run's `vae` and `latents` folders link to WORK/vae/KEY/), so the seeds vary
the DiT and text encoder (init, data order, training noise) and the sampling noise.
Finished runs and scores are kept under the work folder and reused, so an interrupted or
extended (`--seeds 5` after `--seeds 3`) reproduction only computes what is missing.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import time
from typing import Any

import numpy as np

from sorajax import checkpoint as ckpt_lib
from sorajax import cli, config_lib, evaluate, fileio, inference, train
from sorajax.data import world as world_lib
from sorajax.errors import UserError

SAMPLE_KEYS = ("steps", "guidance", "shift", "solver")  # what Arm.sample may set
DEFAULT_METRICS = ("color_adherence", "direction_adherence", "shape_adherence", "count_adherence",
                   "prompt_adherence")
_VAE_PREFIXES = ("--config.vae", "--config.data")  # overrides that change what the frozen VAE is


@dataclasses.dataclass(frozen=True)
class Arm:
    train: tuple[str, ...] = ()  # --config.KEY=VALUE overrides of this arm's training runs
    sample: dict = dataclasses.field(default_factory=dict)  # sampling settings (SAMPLE_KEYS)


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str  # section name in docs/RESULTS.md
    question: str  # one line: what the ablation asks
    base: str  # training config spec, e.g. "configs/toy.py"
    overrides: tuple[str, ...]  # --config.KEY=VALUE shared by every arm (the experiment's budget)
    arms: dict[str, Arm]  # arm name -> what it changes (table rows, in this order)
    prompts: str = "test"  # evaluation prompt set (world.PROMPT_SETS): report on "test"
    num_prompts: int | None = None  # its first N prompts (None: all)
    metrics: tuple[str, ...] = DEFAULT_METRICS  # table columns (report.json "metrics" names)
    budget: str = ""  # one line on the cost, e.g. "about 25 min on 2 CPU cores for 3 seeds"


def load(spec: str) -> Experiment:
    """`PATH[:ARG]` of an experiment file (its get_experiment(arg)) -> a checked Experiment."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") or not os.path.isfile(path):
        raise UserError(f"experiment {spec!r}: no such file (configs/experiments/NAME.py[:ARG])")
    module = config_lib.load_python_file(path, "sorajax_experiment_", "experiment",
                                         "a Python experiment file (configs/experiments/NAME.py)")
    if not hasattr(module, "get_experiment"):
        raise UserError(f"experiment {path} has no get_experiment(arg)")
    try:
        exp = module.get_experiment(arg)
    except ValueError as e:
        raise UserError(f"experiment {spec}: {e}") from e
    if not isinstance(exp, Experiment) or not exp.arms:
        raise UserError(f"experiment {spec}: get_experiment must return an Experiment with arms")
    if exp.prompts not in world_lib.PROMPT_SETS:
        raise UserError(f"experiment {spec}: prompts {exp.prompts!r} not in {sorted(world_lib.PROMPT_SETS)}")
    for name, arm in exp.arms.items():
        bad = sorted(set(arm.sample) - set(SAMPLE_KEYS))
        if bad:
            raise UserError(f"experiment {spec}: arm {name!r} sets unknown sampling keys {bad} "
                            f"(known: {', '.join(SAMPLE_KEYS)})")
        train_config(exp, arm, 0)  # every override is a declared key with a valid value
    return exp


def _resolve(spec: str) -> str:
    """A config spec relative to the working directory, else to the checkout (configs/...)."""
    path, sep, arg = spec.partition(":")
    if not os.path.isfile(path) and not os.path.isabs(path):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isfile(os.path.join(root, path)):
            return os.path.join(root, path) + sep + arg
    return spec


def train_config(exp: Experiment, arm: Arm, seed: int):
    cfg = config_lib.load_config(_resolve(exp.base))
    return config_lib.apply_overrides(cfg, [*exp.overrides, *arm.train, f"--config.seed={seed}"])


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _vae_key(exp: Experiment, arm: Arm) -> str:
    return _digest(exp.base, list(exp.overrides), [o for o in arm.train if o.startswith(_VAE_PREFIXES)])


def _run_key(exp: Experiment, arm: Arm, seed: int) -> str:
    return f"s{seed}-{_digest(exp.base, list(exp.overrides), list(arm.train), seed)}"


def _vae_dir(exp: Experiment, arm: Arm, root: str) -> str:
    """The run folder of the experiment's frozen VAE for `arm` (absolute: runs link into it)."""
    return os.path.abspath(os.path.join(root, "vae", _vae_key(exp, arm)))


def ensure_vae(exp: Experiment, arm: Arm, root: str) -> str:
    """The experiment's frozen VAE for `arm` (trained once, seed 0): its run folder."""
    d = _vae_dir(exp, arm, root)
    cfg = train_config(exp, arm, 0)
    with cfg.unlocked():
        cfg.stages = ("vae",)
    print(f"[reproduce] VAE {d}", flush=True)
    train.train_and_evaluate(cfg, d)
    return d


def ensure_run(exp: Experiment, arm: Arm, seed: int, root: str) -> str:
    """Trains (or finds finished, or resumes) the run of `arm`'s training settings at `seed`.
    Its `vae` folder links to the experiment's frozen VAE, and its `latents` folder to the one
    latent cache of that VAE (built by the first run that needs it, normalisation statistics
    included): the VAE's encode of the training clips runs once per experiment, not per run."""
    d = os.path.join(root, "runs", _run_key(exp, arm, seed))
    vae_root = _vae_dir(exp, arm, root)
    if not os.path.islink(os.path.join(d, "vae")):  # (linked once the VAE is trained)
        ensure_vae(exp, arm, root)
    os.makedirs(d, exist_ok=True)
    for name in ("vae", "latents"):
        link, target = os.path.join(d, name), os.path.join(vae_root, name)
        if name == "latents":
            os.makedirs(target, exist_ok=True)
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        if os.path.islink(link):
            os.remove(link)
        elif os.path.isdir(link):  # a run folder from before the links: its own copy
            shutil.rmtree(link)
        os.symlink(target, link)
    fileio.write_json(os.path.join(d, "experiment_run.json"),
                      dict(base=exp.base, overrides=list(exp.overrides), train=list(arm.train), seed=seed))
    print(f"[reproduce] seed {seed}: training {d}", flush=True)
    train.train_and_evaluate(train_config(exp, arm, seed), d)
    return d


def _score_path(exp: Experiment, arm: Arm, seed: int, run_dir: str) -> str:
    key = _digest(dict(arm.sample), exp.prompts, exp.num_prompts, seed)
    return os.path.join(run_dir, f"reproduce-eval-{key}.json")


def stage_done_dit(exp: Experiment, arm: Arm, seed: int, root: str) -> bool:
    """Whether the run of `arm` at `seed` has its final DiT checkpoint already."""
    cfg = train_config(exp, arm, seed)
    steps = ckpt_lib.list_steps(os.path.join(root, "runs", _run_key(exp, arm, seed), "checkpoints"))
    return bool(steps) and steps[-1] >= int(cfg.dit_train.steps)


def score(exp: Experiment, arm: Arm, seed: int, run_dir: str) -> dict[str, Any]:
    """The world benchmark of `run_dir` with `arm`'s sampling settings (sampling seed 1000 *
    seed), kept next to the run and reused."""
    path = _score_path(exp, arm, seed, run_dir)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    pipe = inference.load_pipeline(workdir=run_dir)
    gen = evaluate.model_generate(pipe, **arm.sample)
    rep = evaluate.run_benchmark(gen, seed=1000 * seed, prompts=exp.prompts, num_prompts=exp.num_prompts,
                                 info=dict(workdir=os.path.abspath(run_dir), sample=dict(arm.sample)))
    out = {"metrics": rep["metrics"], "info": rep["info"]}
    fileio.write_json(path, out)
    return out


def summarize(per_seed: dict[str, list[dict[str, float]]], metrics) -> dict[str, dict[str, dict]]:
    """arm -> metric -> {mean, std (ddof 1; None for one seed), n, values}."""
    out = {}
    for arm, rows in per_seed.items():
        out[arm] = {}
        for m in metrics:
            vals = [float(r[m]) for r in rows]
            out[arm][m] = dict(mean=float(np.mean(vals)), n=len(vals), values=vals,
                               std=float(np.std(vals, ddof=1)) if len(vals) > 1 else None)
    return out


def table(exp: Experiment, summary: dict) -> str:
    """Markdown table: one row per arm, `mean ± std` per metric."""
    head = "| arm | " + " | ".join(exp.metrics) + " |"
    rule = "|---|" + "---|" * len(exp.metrics)
    rows = []
    for arm in exp.arms:
        cells = []
        for m in exp.metrics:
            s = summary[arm][m]
            cells.append(f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else ""))
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def _git_commit() -> str:
    """The checkout's commit, "+ uncommitted changes" when tracked files differ from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes" if dirty else "")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
        return f"{m.group(1).strip() if m else platform.processor()}, {os.cpu_count()} cores"
    except OSError:
        return f"{platform.processor()}, {os.cpu_count()} cores"


def section(exp: Experiment, summary: dict, *, command: str, seeds: int, minutes: float,
            reused: str = "") -> str:
    arms = "\n".join(f"- **{name}**: training {' '.join(a.train) or '(base)'}; sampling "
                     f"{', '.join(f'{k}={v}' for k, v in a.sample.items()) or '(config defaults)'}"
                     for name, a in exp.arms.items())
    n_prompts = exp.num_prompts or len(world_lib.PROMPT_SETS[exp.prompts])
    return (f"<!-- experiment: {exp.name} -->\n## {exp.name}\n\n{exp.question}\n\n"
            f"```bash\n{command}\n```\n\n"
            f"Base `{exp.base}` with `{' '.join(exp.overrides)}`.\n\n{arms}\n\n"
            f"{table(exp, summary)}\n\n"
            f"Mean ± standard deviation over {seeds} training seeds (each also its own sampling "
            f"seed) on the {exp.prompts} prompts ({n_prompts}); the VAE is shared (seed 0). "
            f"Made {datetime.date.today().isoformat()} at commit {_git_commit()} on {_cpu()} in "
            f"{minutes:.1f} min{f' ({reused})' if reused else ''}.\n<!-- end: {exp.name} -->\n")


def write_results(path: str, text: str, name: str) -> None:
    """Puts `text` (a section) into the markdown file at `path`: replaces the experiment's
    section if present, else appends it. Atomic."""
    old = open(path).read() if os.path.exists(path) else "# Results\n\nTables made by `scripts/reproduce.py`.\n"
    pat = re.compile(rf"<!-- experiment: {re.escape(name)} -->.*?<!-- end: {re.escape(name)} -->\n?", re.S)
    new = pat.sub(lambda _: text, old) if pat.search(old) else old.rstrip("\n") + "\n\n" + text
    fileio.write_text(path, new)


def reproduce(exp: Experiment, *, seeds: int, root: str, results: str | None, command: str) -> dict:
    """Trains, scores and tabulates `exp` over training seeds 0..seeds-1; returns the summary."""
    t0 = time.time()
    print(f"[reproduce] {exp.name}: {len(exp.arms)} arms x {seeds} seeds"
          + (f"; expected cost {exp.budget}" if exp.budget else ""), flush=True)
    per_seed: dict[str, list[dict]] = {a: [] for a in exp.arms}
    runs: dict[str, str] = {}  # run key -> its folder, trained (or found finished) in this call
    found_runs = sum(stage_done_dit(exp, arm, seed, root) for seed in range(seeds)
                     for arm in {_run_key(exp, a, seed): a for a in exp.arms.values()}.values())
    found_scores = 0
    for seed in range(seeds):
        for name, arm in exp.arms.items():
            key = _run_key(exp, arm, seed)
            if key not in runs:  # arms that differ only in sampling share the run
                runs[key] = ensure_run(exp, arm, seed, root)
            run_dir = runs[key]
            found_scores += os.path.exists(_score_path(exp, arm, seed, run_dir))
            rep = score(exp, arm, seed, run_dir)
            per_seed[name].append(rep["metrics"])
            print(f"[reproduce] {exp.name} / {name} / seed {seed}: "
                  + ", ".join(f"{m}={rep['metrics'][m]:.3f}" for m in exp.metrics), flush=True)
    summary = summarize(per_seed, exp.metrics)
    minutes = (time.time() - t0) / 60
    fileio.write_json(os.path.join(root, f"{exp.name}.json"),
                      dict(experiment=dataclasses.asdict(exp), seeds=seeds, summary=summary,
                           command=command, minutes=minutes))
    print(table(exp, summary), flush=True)
    if results:
        n_runs = len(runs)
        reused = (f"reused from earlier invocations: {found_runs} of {n_runs} finished runs, "
                  f"{found_scores} of {seeds * len(exp.arms)} scores") if found_runs or found_scores else ""
        write_results(results, section(exp, summary, command=command, seeds=seeds, minutes=minutes,
                                       reused=reused), exp.name)
        print(f"[reproduce] wrote section {exp.name!r} of {results}", flush=True)
    return summary


def main(argv) -> int:
    p = cli.Parser(
        prog="python scripts/reproduce.py",
        description="Reproduce an experiment from configs/experiments/: train each arm's setting at "
                    "every training seed (finished runs are reused), score the world benchmark's "
                    "test prompts, and write the table (mean ± std over seeds per arm and metric) "
                    "into docs/RESULTS.md with this command.")
    p.add_argument("experiment", help="configs/experiments/NAME.py[:ARG] (ARG runlocal: a tiny smoke version)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 (default 3; >= 2 for a std)")
    p.add_argument("--workdir", default="runs/experiments",
                   help="where runs and scores are kept and reused (default runs/experiments)")
    p.add_argument("--results", default="docs/RESULTS.md",
                   help="markdown file whose section for this experiment is written (default "
                        "docs/RESULTS.md); --results '' writes none")
    a = p.parse_args(argv)
    if a.seeds < 1:
        raise UserError(f"--seeds {a.seeds}: must be >= 1")
    exp = load(a.experiment)
    if a.results:
        cli.check_writable_output(a.results, (".md",), "--results")
    os.makedirs(a.workdir, exist_ok=True)
    command = f"python scripts/reproduce.py {a.experiment} --seeds {a.seeds}"
    reproduce(exp, seeds=a.seeds, root=a.workdir, results=a.results or None, command=command)
    return 0
