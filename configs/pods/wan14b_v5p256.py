"""Wan 2.1 14B, 81 frames at 720x1280 (75,600 tokens/clip), global batch 32 on a TPU v5p-256 slice
(128 chips): FSDP 32 x context 4 (all-to-all heads<->sequence, splash attention), full remat,
scanned layers, bf16 compute with f32 master weights and optimizer state sharded like them.

    # 1. prove it fits (CPU-only machine, libtpu): docs/SCALING.md
    python scripts/aot_compile.py --config configs/pods/wan14b_v5p256.py --topology v5p-256
    # 2. the checkpoint (/mnt/gcs/ckpt/wan2.1-t2v-14b, scripts/convert_diffusers.py) and a prepared
    #    folder (/mnt/gcs/data/videos); every worker caches its share of the latents, then trains
    #    (every worker runs the same command; jax.distributed finds the others):
    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \\
      "cd sorajax && .venv/bin/python -m sorajax.cache_latents --config configs/pods/wan14b_v5p256.py \\
       --data /mnt/gcs/data/videos --out /mnt/gcs/latents/wan14b_v5p256"
    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \\
      "cd sorajax && .venv/bin/python -m sorajax.train --config configs/pods/wan14b_v5p256.py \\
       --workdir /mnt/gcs/runs/wan14b"
/mnt/gcs = a Cloud Storage bucket mounted with gcsfuse on every worker (docs/RELIABILITY.md).
Tiny variant, the same path (prepare -> cache_latents -> train -> sample; tests/test_pods.py):
    python -m sorajax.cache_latents --config configs/pods/wan14b_v5p256.py:runlocal:CKPT --data DATA --out LAT
    python -m sorajax.train --config configs/pods/wan14b_v5p256.py:runlocal:CKPT --workdir /tmp/p \\
        --config.data.dir=LAT
"""
from configs.pods._preset import preset


def get_config(arg: str = ""):
    return preset(
        "wan2_1_t2v_14b", arg, frames=81, height=720, width=1280, batch=32,
        mesh=dict(fsdp=32, context=4),
        dit=dict(attention="splash", context_parallel="all_to_all", remat="full", scan_layers=True,
                 dtype="bfloat16", param_dtype="float32"),
        runlocal_mesh=dict(fsdp=4, context=2), ckpt='/mnt/gcs/ckpt/wan2.1-t2v-14b', name='wan14b_v5p256', data_root='/mnt/gcs')
