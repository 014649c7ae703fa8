"""Ablations reproduced by `python scripts/reproduce.py configs/experiments/NAME.py --seeds 3`
(sorajax/experiments.py): each file's get_experiment(arg) returns an Experiment; ":runlocal" is
the same experiment at smoke-test size. Tables land in docs/RESULTS.md."""
