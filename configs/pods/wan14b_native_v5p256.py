"""Wan 2.1 14B on native shapes, packed (docs/SHAPES.md): 720p and 480p clips (landscape 16:9,
portrait 9:16, square) of 81 and 41 frames plus 1-frame images, whole clips packed into rows of
75,600 tokens (one 81 x 720 x 1280 clip, or e.g. two 81-frame 480p clips and five images), at
most 8 clips per row, 32 rows per global batch, on a TPU v5p-256 slice (128 chips). The mesh and
kernels are wan14b_v5p256.py's: FSDP 32 x context 4 (all-to-all heads<->sequence around the
splash kernel, which masks by segment id), full remat, scanned layers, bf16 compute.

    # 1. prove it fits (CPU-only machine, libtpu): docs/SCALING.md
    python scripts/aot_compile.py --config configs/pods/wan14b_native_v5p256.py --topology v5p-256 --no-sampler
    # 2. a folder prepared at native shapes (prepare keeps each video's aspect ratio and length
    #    with this config's data settings), its latents cached by shape, then train -- as for
    #    wan14b_v5p256.py, on every worker:
    python -m sorajax.data.prepare --src VIDEOS --out /mnt/gcs/data/videos --config configs/pods/wan14b_native_v5p256.py
    python -m sorajax.cache_latents --config configs/pods/wan14b_native_v5p256.py --data /mnt/gcs/data/videos \\
        --out /mnt/gcs/latents/wan14b_native_v5p256
    python -m sorajax.train --config configs/pods/wan14b_native_v5p256.py --workdir /mnt/gcs/runs/wan14b_native
Tiny variant, the same path (a packed DiT step with the preset's mesh axes and context-parallel
scheme on 8 fake CPU devices; tests/test_pods.py):
    python -m sorajax.train --config configs/pods/wan14b_native_v5p256.py:runlocal:CKPT --workdir /tmp/p \\
        --config.data.dir=LAT
"""
from configs.pods._preset import preset


def get_config(arg: str = ""):
    c = preset(
        "wan2_1_t2v_14b", arg, frames=81, height=720, width=1280, batch=32,
        mesh=dict(fsdp=32, context=4),
        dit=dict(attention="splash", context_parallel="all_to_all", remat="full", scan_layers=True,
                 dtype="bfloat16", param_dtype="float32"),
        runlocal_mesh=dict(fsdp=4, context=2), ckpt="/mnt/gcs/ckpt/wan2.1-t2v-14b",
        name="wan14b_native_v5p256", data_root="/mnt/gcs")
    if arg:  # runlocal: the tiny cache's clips (9 x 32 x 32), two to a packed row
        c.dit_train.update(packing="pack", pack_tokens=24, pack_clips=2, batch_size=8)  # 12 tokens a clip
        return c
    c.data.update(aspect_ratios=(1.778, 0.5625, 1.0), resolutions=((720, 1280), (480, 832)),
                  durations=(81, 41), image_share=0.1)
    c.dit_train.update(packing="pack", pack_tokens=75600, pack_clips=8)
    return c
