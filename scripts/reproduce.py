"""Reproduce an experiment from configs/experiments/ and write its table into docs/RESULTS.md.

    python scripts/reproduce.py configs/experiments/sample_shift.py --seeds 3
    python scripts/reproduce.py configs/experiments/cond_masks.py --seeds 3 --workdir runs/experiments

Trains every arm's training setting at training seeds 0..N-1 (reusing finished runs and scores
under --workdir), samples and scores the world benchmark's test prompts with each arm's sampling
settings, prints the table (mean ± std over the seeds) and replaces the experiment's section of
--results. The logic lives in sorajax/experiments.py.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    from sorajax import cli, experiments

    return cli.run(experiments.main, argv)


if __name__ == "__main__":
    sys.exit(main())
