"""Wan 2.1 14B on one-minute 720p clips: 1,441 frames at 720x1280 = 361 x 45 x 80 = 1,299,600
tokens per clip, global batch 16 on a v5p-1024 slice (512 chips): FSDP 16 x context 16 x tensor 2
with ring attention (k/v blocks travel the ring; blockwise online softmax, never an N x N buffer;
16 is the largest power of two dividing the 1,299,600 tokens, so tensor parallelism over heads and
MLP halves the rest), full remat, scanned layers, bf16 compute. AOT: 88.2 GB of 95 GiB per chip.

    python scripts/aot_compile.py --config configs/pods/wan14b_60s_v5p1024.py --topology v5p-1024
    # the checkpoint at /mnt/gcs/ckpt/wan2.1-t2v-14b, one-minute clips prepared with --frames 1441
    # and cached into /mnt/gcs/latents/wan14b_60s_v5p1024 (python -m sorajax.cache_latents), then:
    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \\
      "cd sorajax && .venv/bin/python -m sorajax.train --config configs/pods/wan14b_60s_v5p1024.py --workdir /mnt/gcs/runs/wan14b-60s"
/mnt/gcs = a Cloud Storage bucket mounted with gcsfuse on every worker (docs/RELIABILITY.md).
Tiny variant, the same path (prepare -> cache_latents -> train -> sample; tests/test_pods.py):
    python -m sorajax.cache_latents --config configs/pods/wan14b_60s_v5p1024.py:runlocal:CKPT --data DATA --out LAT
    python -m sorajax.train --config configs/pods/wan14b_60s_v5p1024.py:runlocal:CKPT --workdir /tmp/p \\
        --config.data.dir=LAT
"""
from configs.pods._preset import preset


def get_config(arg: str = ""):
    return preset(
        "wan2_1_t2v_14b", arg, frames=1441, height=720, width=1280, batch=16,
        mesh=dict(fsdp=16, context=16, tensor=2),
        dit=dict(attention="flash", context_parallel="ring", remat="full", scan_layers=True,
                 dtype="bfloat16", param_dtype="float32"),
        runlocal_mesh=dict(fsdp=2, context=2, tensor=2), ckpt='/mnt/gcs/ckpt/wan2.1-t2v-14b', name='wan14b_60s_v5p1024', data_root='/mnt/gcs')
