"""Wan 2.1 T2V 14B architecture (DiT 5120x40, 40 heads; same VAE and UMT5-XXL encoder).

    python -m sorajax.train --config configs/wan2_1_t2v_14b.py --workdir /mnt/gcs/runs/wan14b \\
        --config.text.tokenizer=/path/to/umt5-xxl-tokenizer
/mnt/gcs = a Cloud Storage bucket mounted with gcsfuse on every worker (docs/RELIABILITY.md).
Tiny variant (tests): python -m sorajax.train --config configs/wan2_1_t2v_14b.py:runlocal --workdir /tmp/t
"""
from configs import wan2_1_t2v_1p3b


def get_config(arg: str = ""):
    c = wan2_1_t2v_1p3b.get_config(arg, dit_variant="wan2.1-14b")
    if arg != "runlocal":
        c.dit_train.batch_size = 64
        c.dit.overrides = dict(remat=True)
    return c
