"""Wan 2.1 T2V 14B architecture (DiT 5120x40, 40 heads; same VAE and UMT5-XXL encoder).

    python -m sorajax.train --config configs/wan2_1_t2v_14b.py --workdir /mnt/gcs/runs/wan14b \\
        --config.text.tokenizer=/path/to/umt5-xxl-tokenizer
/mnt/gcs = a Cloud Storage bucket mounted with gcsfuse on every worker (docs/RELIABILITY.md).
Tiny variant (tests): python -m sorajax.train --config configs/wan2_1_t2v_14b.py:runlocal --workdir /tmp/t
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "wan2_1_t2v_1p3b", os.path.join(os.path.dirname(os.path.abspath(__file__)), "wan2_1_t2v_1p3b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg: str = ""):
    c = _base.get_config(arg, dit_variant="wan2.1-14b")
    if arg != "runlocal":
        c.train.batch_size = 64
        c.dit.overrides = dict(remat=True)
    return c
