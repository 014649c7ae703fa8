"""Wan 2.1 1.3B, 81 frames at 480x832 (32,760 tokens/clip), global batch 16 on one 8 x H100 host:
FSDP 8, cuDNN flash attention, bf16 compute, dots-saveable remat.

    # the checkpoint at /data/ckpt/wan2.1-t2v-1.3b (scripts/convert_diffusers.py), a prepared
    # folder at /data/data/videos; cache its latents once, then train:
    python -m sorajax.cache_latents --config configs/pods/wan1p3b_8xh100.py --data /data/data/videos \\
        --out /data/latents/wan1p3b_8xh100
    python -m sorajax.train --config configs/pods/wan1p3b_8xh100.py --workdir /data/runs/wan1p3b
    # Several hosts under SLURM (jax.distributed reads SLURM_*): one task per host, 8 GPUs each:
    srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 .venv/bin/python -m sorajax.train \\
        --config configs/pods/wan1p3b_8xh100.py --workdir /shared/runs/wan1p3b --config.mesh.fsdp=32 \\
        --config.data.dir=/shared/latents/wan1p3b_8xh100 --config.init_from=/shared/ckpt/wan2.1-t2v-1.3b
Tiny variant, the same path (prepare -> cache_latents -> train -> sample; tests/test_pods.py):
    python -m sorajax.cache_latents --config configs/pods/wan1p3b_8xh100.py:runlocal:CKPT --data DATA --out LAT
    python -m sorajax.train --config configs/pods/wan1p3b_8xh100.py:runlocal:CKPT --workdir /tmp/p \\
        --config.data.dir=LAT
"""
from configs.pods._preset import preset


def get_config(arg: str = ""):
    return preset(
        "wan2_1_t2v_1p3b", arg, frames=81, height=480, width=832, batch=16,
        mesh=dict(fsdp=8),
        dit=dict(attention="cudnn", remat="dots", scan_layers=True, dtype="bfloat16", param_dtype="float32"),
        runlocal_mesh=dict(fsdp=8), ckpt='/data/ckpt/wan2.1-t2v-1.3b', name='wan1p3b_8xh100', data_root='/data')
