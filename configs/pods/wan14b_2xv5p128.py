"""Wan 2.1 14B, 81 frames at 720x1280, global batch 32 on two v5p-128 slices (multi-slice, 2 x 64
chips): inside each slice FSDP 16 x context 4 over ICI; across slices data parallelism over DCN
(only the gradient all-reduce crosses DCN).

    python scripts/aot_compile.py --config configs/pods/wan14b_2xv5p128.py --topology v5p-128 --num-slices 2
    # Multislice via queued resources (MEGASCALE_* is set by the platform on every worker):
    gcloud compute tpus queued-resources create $QR --node-count 2 --accelerator-type v5p-128 \\
      --runtime-version v2-alpha-tpuv5 --zone $ZONE --node-prefix $TPU
    # the checkpoint at /mnt/gcs/ckpt/wan2.1-t2v-14b, latents cached as in wan14b_v5p256.py into
    # /mnt/gcs/latents/wan14b_2xv5p128 (python -m sorajax.cache_latents ... on every worker), then:
    gcloud compute tpus tpu-vm ssh $TPU-0 ... --worker=all --command \\
      "cd sorajax && .venv/bin/python -m sorajax.train --config configs/pods/wan14b_2xv5p128.py --workdir /mnt/gcs/runs/wan14b-ms"
    (and the same on $TPU-1)
/mnt/gcs = a Cloud Storage bucket mounted with gcsfuse on every worker (docs/RELIABILITY.md).
Tiny variant, the same path (prepare -> cache_latents -> train -> sample; tests/test_pods.py):
    python -m sorajax.cache_latents --config configs/pods/wan14b_2xv5p128.py:runlocal:CKPT --data DATA --out LAT
    python -m sorajax.train --config configs/pods/wan14b_2xv5p128.py:runlocal:CKPT --workdir /tmp/p \\
        --config.data.dir=LAT
"""
from configs.pods._preset import preset


def get_config(arg: str = ""):
    return preset(
        "wan2_1_t2v_14b", arg, frames=81, height=720, width=1280, batch=32,
        mesh=dict(fsdp=16, context=4, dcn_data=2),
        dit=dict(attention="splash", context_parallel="all_to_all", remat="full", scan_layers=True,
                 dtype="bfloat16", param_dtype="float32"),
        runlocal_mesh=dict(data=2, fsdp=2, context=2), ckpt='/mnt/gcs/ckpt/wan2.1-t2v-14b', name='wan14b_2xv5p128', data_root='/mnt/gcs')
