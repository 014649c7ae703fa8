"""Multi-host training on localhost: 2 processes x 4 fake CPU devices with jax.distributed train
the DiT for K steps on data=4 x fsdp=2 and checkpoint; one process with 8 devices on a differently
shaped mesh (data=2 x fsdp=4) restores that checkpoint and continues to 2K steps. Every step's loss equals an uninterrupted
single-process run's within 1e-5: the global batch at each step does not depend on the process
count or the mesh (sharding.process_batch_rows + data.pipeline rows=), and params, optimizer,
EMA, step/RNG and the data-iterator position all come back from the 2-process checkpoint.

The VAE stage (and its latents and tokenizer) of the single-process reference run is reused by
the multi-process run: the comparison is then about the DiT stage alone, and the 2-process run
also restores a checkpoint written by one process (the frozen VAE) onto its own mesh.
"""
import json
import os
import shutil
import sys

from tests.helpers import free_port, process_env, run_all


K = 4  # steps before the checkpoint / process-count change; the runs go to 2K

# The toy config, small: a 2x2x2 VAE, a 1-layer DiT and text encoder on 16x16 clips of 9 frames
# (same code paths, faster compiles), 1 VAE step, a loss per step, a checkpoint every K steps, no
# end-of-run sampling.
SMALL = [
    "--config.vae.overrides={'base_dim': 4, 'z_dim': 4, 'dim_mult': (1, 2), 'temporal_downsample': (True,)}",
    "--config.data.height=16", "--config.data.width=16", "--config.data.num_train=32",
    # the DiT on whole 9-frame clips (the toy's 9-frame windows of 13-frame clips resume in
    # test_cli.py); the VAE, only the frozen encoder here, on their first 3 frames (its first
    # chunk and one cached chunk: its train step compiles in a fraction of the 9-frame time)
    "--config.data.frames=9", "--config.vae_train.clip_frames=3", "--config.dit_train.clip_frames=0",
    "--config.dit.overrides={'num_layers': 1, 'num_attention_heads': 2, 'attention_head_dim': 32, 'ffn_dim': 128}",
    "--config.text.overrides={'num_layers': 1, 'd_model': 64, 'd_kv': 16, 'num_heads': 4, 'd_ff': 128}",
    "--config.vae_train.steps=1", "--config.vae_train.log_every=1", "--config.vae_train.ckpt_every=1",
    "--config.dit_train.log_every=1", f"--config.dit_train.ckpt_every={K}", "--config.dit_train.sample_at_end=False",
]


def _train_cmd(workdir, data_dir, steps, mesh):
    return [sys.executable, "-m", "sorajax.train", "--config", "configs/toy.py:runlocal",
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *SMALL,
            f"--config.dit_train.steps={steps}", *(f"--config.mesh.{k}={v}" for k, v in mesh.items())]


def _losses(path):
    with open(path) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_process_checkpoint_resumes_on_another_mesh_with_the_same_losses(tmp_path):
    data = tmp_path / "data"
    ref, run = tmp_path / "ref", tmp_path / "run"

    # 1. Uninterrupted reference: one process, 8 devices, 2K steps, on the mesh step 3 resumes on
    #    (data=2 x fsdp=4: step 3 then reuses this run's compiled step from the XLA cache).
    run_all([(_train_cmd(ref, data, 2 * K, dict(data=2, fsdp=4)), process_env(8))], tmp_path, "ref")

    # 2. Two processes x 4 devices, mesh data=4 x fsdp=2 (parameters sharded across the two
    #    processes), K steps, on the reference's trained VAE.
    run.mkdir()
    for sub in ("vae", "latents", "tokenizer"):
        shutil.copytree(ref / sub, run / sub)
    port = free_port()
    outs = run_all([(_train_cmd(run, data, K, dict(data=4, fsdp=2)),
                      process_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
                           JAX_PROCESS_ID=i))
                     for i in range(2)], tmp_path, "two")
    assert all("[vae] already trained" in o for o in outs)
    assert sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())[-1] == K
    assert sorted(_losses(run / "metrics.jsonl")) == list(range(1, K + 1))  # process 0 alone logs

    # 3. One process, 8 devices, a different mesh (data=2 x fsdp=4): restores step K, goes to 2K.
    (out,) = run_all([(_train_cmd(run, data, 2 * K, dict(data=2, fsdp=4)), process_env(8))], tmp_path, "one")
    assert f"[dit] resumed from {run / 'checkpoints'}/{K}" in out

    want, got = _losses(ref / "metrics.jsonl"), _losses(run / "metrics.jsonl")
    assert sorted(want) == sorted(got) == list(range(1, 2 * K + 1))
    diff = max(abs(want[s] - got[s]) for s in want)
    print(f"max |loss difference| over {2 * K} steps: {diff:.3g}")
    assert diff < 1e-5, {s: (want[s], got[s]) for s in want}


def test_process_rows_read_the_same_global_batches():
    """The pipeline's `rows=` mode: any split of the global batch's rows reads exactly those rows
    of the batches the unsplit (shard_count=1) pipeline yields, across epochs, and the iterator
    state is the same in every "process"."""
    import numpy as np

    from sorajax.data import pipeline

    src = [{"x": np.float32(i), "caption": f"c{i}"} for i in range(20)]
    kw = dict(batch_size=8, seed=3)
    whole = pipeline.make_iterator(src, shard_index=0, shard_count=1, **kw)
    parts = [pipeline.make_iterator(src, rows=r, **kw) for r in ([0, 1, 2, 3], [4, 5, 6, 7], [1, 6])]
    for _ in range(7):  # 3.5 epochs of 2 batches
        b = next(whole)
        p0, p1, p2 = (next(p) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p0["x"], p1["x"]]), b["x"])
        np.testing.assert_array_equal(p2["x"], b["x"][[1, 6]])
        assert list(p2["caption"]) == [b["caption"][1], b["caption"][6]]
    states = {json.dumps(pipeline.get_state(p)) for p in parts}
    assert len(states) == 1 and json.dumps(pipeline.get_state(whole)) in states


def test_process_batch_rows_single_process():
    import jax
    import numpy as np

    from sorajax import sharding

    mesh = sharding.make_mesh(dict(data=2, fsdp=4), devices=jax.devices()[:8])
    rules = sharding.normalize_rules(None)
    np.testing.assert_array_equal(sharding.process_batch_rows(mesh, rules, 16), np.arange(16))
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    g = sharding.global_batch({"x": x}, mesh, rules, batch_size=16)["x"]
    np.testing.assert_array_equal(np.asarray(g), x)
    assert g.sharding.spec[0] == ("data", "fsdp")
