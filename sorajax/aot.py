"""Ahead-of-time planner: compile the real train step (and the sampler's denoising step) for a
named TPU topology on a CPU-only machine, and report whether it fits and what it costs.

    python scripts/aot_compile.py --config configs/wan2_1_t2v_14b.py --topology v5p-256 \\
        --global-batch 32 --frames 81 --height 720 --width 1280

With libtpu installed, `jax.experimental.topologies` describes a TPU slice (or several, for
multi-slice) without any TPU attached; XLA's TPU compiler then compiles the sharded program for
those devices, and its memory analysis is the per-chip HBM the program will use. Nothing runs.

Output (JSON): per-chip bytes (arguments, temporaries, outputs, aliased, total), the chip's HBM,
"fits" with the headroom, XLA's FLOPs per step next to the analytic model FLOPs (REFERENCE.md
formulas; Pallas kernels such as splash attention are invisible to XLA's count), and the count
and bytes of every collective in the compiled HLO. `--search` compiles several mesh shapes and
remat policies and ranks those that fit by per-chip memory and collective bytes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import sys
import time

from sorajax import config_lib
from sorajax.collectives import collective_stats
from sorajax.errors import UserError
from sorajax.flops import dit_train_step_flops, sampler_step_flops

# JAX's modules are imported inside the planner's functions, after ensure_libtpu() has put libtpu
# on the import path: JAX picks its TPU library when the first backend starts, and keeping those
# imports behind that call makes the order explicit.

# ----------------------------------------------------------------------------------------------
# TPU topologies
# ----------------------------------------------------------------------------------------------
# cores_per_chip: how the name counts (v4/v5p names count TensorCores, 2 per chip; v5e/v6e count
# chips). peak: dense bf16 TFLOP/s per chip; hbm in GiB per chip (REFERENCE.md).
# ici_gbps: the chip's inter-chip interconnect bandwidth, all links (Cloud TPU system
# architecture pages: v4 2,400, v5e 1,600, v5p 4,800, v6e 3,584 Gbps).
CHIPS = {
    "v4": dict(cores_per_chip=2, dims=3, hbm_gib=32, peak_tflops=275, ici_gbps=2400),
    "v5p": dict(cores_per_chip=2, dims=3, hbm_gib=95, peak_tflops=459, ici_gbps=4800),
    "v5e": dict(cores_per_chip=1, dims=2, hbm_gib=16, peak_tflops=197, ici_gbps=1600),
    "v6e": dict(cores_per_chip=1, dims=2, hbm_gib=32, peak_tflops=918, ici_gbps=3584),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "trillium": "v6e"}


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Physical chip grid of a slice: powers of two, as balanced as possible (v5p-256 -> 4x4x8)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    return tuple(sorted(x for x in shape if x > 1)) + tuple(x for x in shape if x == 1)  # 2x2x1


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. "v5p-256"
    generation: str
    chips: int  # per slice
    grid: tuple[int, ...]
    num_slices: int
    hbm_bytes: int
    peak_flops: float  # per chip
    ici_bytes_per_s: float = 0.0  # per chip, all ICI links

    @property
    def total_chips(self) -> int:
        return self.chips * self.num_slices


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5p-256' / 'v5e-16' / 'v6e-256' / 'v4-32' -> Topology. Raises UserError naming what's allowed."""
    allowed = "v4-N, v5p-N (N TensorCores, 2 per chip, N >= 8) or v5e-N, v6e-N (N chips), N a power of two"
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", str(name).strip().lower())
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or gen not in CHIPS:
        raise UserError(f"--topology: unknown TPU topology {name!r}; expected {allowed}")
    info = CHIPS[gen]
    n = int(m.group(2))
    chips = n // info["cores_per_chip"]
    try:
        if n % info["cores_per_chip"] or chips < (4 if info["dims"] == 3 else 1):
            raise ValueError
        grid = _grid(chips, info["dims"])
    except ValueError:
        raise UserError(f"--topology: {name!r} is not a valid slice size; expected {allowed}") from None
    if num_slices < 1:
        raise UserError(f"--num-slices must be >= 1, got {num_slices}")
    return Topology(f"{gen}-{n}", gen, chips, grid, int(num_slices), int(info["hbm_gib"] * 2**30),
                    info["peak_tflops"] * 1e12, info["ici_gbps"] * 1e9 / 8)


def ensure_libtpu() -> None:
    """Makes libtpu importable: `make aot-deps` installs it into .venv/aot-libtpu, outside the
    venv's import path (set SORAJAX_LIBTPU_DIR to use another folder)."""
    # Compile-only use attaches no TPU: let several planners (or tests) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401  (importable: nothing to do)
        return
    except ImportError:
        pass
    for d in (os.environ.get("SORAJAX_LIBTPU_DIR"), os.path.join(sys.prefix, "aot-libtpu")):
        if d and os.path.isdir(os.path.join(d, "libtpu")):
            sys.path.insert(0, d)
            return
    raise UserError("the AOT planner needs libtpu: run `make aot-deps` (installs it into "
                    ".venv/aot-libtpu) or `pip install -r requirements-aot.txt`")


def topology_devices(topo: Topology):
    """Compile-only TPU devices for the topology (needs libtpu; no TPU attached)."""
    ensure_libtpu()
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise UserError(f"jax.experimental.topologies unavailable: {e}") from None
    grid = "x".join(str(g) for g in topo.grid)
    grid3 = tuple(topo.grid) + (1,) * (3 - len(topo.grid))
    host = tuple(min(h, g) for h, g in zip((2, 2, 1), grid3))  # 4 chips per TPU VM host
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{topo.generation}:{grid}", chips_per_host_bounds=host,
            num_slices=topo.num_slices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or refuses the topology
        msg = str(e).splitlines()[0][:200]
        raise UserError(f"cannot describe TPU topology {topo.name} x{topo.num_slices} "
                        f"(is libtpu installed? `pip install libtpu`): {msg}") from None
    return list(desc.devices)


# ----------------------------------------------------------------------------------------------
# Step-time estimate (the HLO's collectives: sorajax/collectives.py)
# ----------------------------------------------------------------------------------------------
def step_estimate(model_flops: float, collectives: dict, topo: "Topology", chips: int, remat: str) -> dict:
    """A roofline estimate of one train step: the compute at the chips' peak (the analytic FLOPs,
    plus the forward recomputed under full remat) and the bytes each chip sends through its
    collectives at the chip's ICI bandwidth. Overlap, as the compiled program states it: the
    collectives issued as start/done pairs (`async`) may run under compute, the others are
    counted after it, so `step_s` = max(compute, async collectives) + the other collectives;
    `step_s_full_overlap` = max(compute, all collectives) is the bound were every collective
    hidden. `mfu` and `mfu_full_overlap`: the analytic FLOPs over chips x peak x that time. Not
    modelled: kernels below peak (the MXU's efficiency on each op), HBM-bound ops, DCN between
    slices (counted at ICI speed); full remat alone caps MFU at 0.75."""
    recompute = 4 / 3 if remat in ("full", "True") else 1.0
    compute_s = model_flops * recompute / (chips * topo.peak_flops)
    wire = sum(v["wire_bytes"] for v in collectives.values())
    async_wire = sum(v["async_wire_bytes"] for v in collectives.values())
    ici_s, async_s = wire / topo.ici_bytes_per_s, async_wire / topo.ici_bytes_per_s
    step = max(compute_s, async_s) + (ici_s - async_s)
    full = max(compute_s, ici_s)
    peak = chips * topo.peak_flops
    return {"compute_s": compute_s, "recompute_factor": round(recompute, 4),
            "wire_bytes_per_chip": wire, "async_wire_bytes_per_chip": async_wire,
            "ici_bytes_per_s": topo.ici_bytes_per_s, "collective_s": ici_s, "async_collective_s": async_s,
            "step_s": step, "step_s_full_overlap": full,
            "mfu": model_flops / (peak * step), "mfu_full_overlap": model_flops / (peak * full),
            "note": " ".join(step_estimate.__doc__.split())}


# ----------------------------------------------------------------------------------------------
# Planning one configuration
# ----------------------------------------------------------------------------------------------
def _apply(config, args_mesh: dict | None, frames, height, width, batch, remat, extra):
    with config.unlocked():
        if frames:
            config.data.frames = int(frames)
        if height:
            config.data.height = int(height)
        if width:
            config.data.width = int(width)
        if batch:
            config.dit_train.batch_size = int(batch)
        if args_mesh:
            for k, v in args_mesh.items():
                config.mesh[k] = int(v)
        if remat:
            config.dit.overrides = dict(config.dit.overrides, remat=remat)
    if extra:
        config = config_lib.apply_overrides(config, list(extra))
    with config.unlocked():
        config.stages = ("dit",)  # the planner compiles the DiT stage's step
        config.text.tokenizer = _tokenizer_path(config)
    return config


def _tokenizer_path(config) -> str:
    """The run's tokenizer, or the repository's small UMT5 tokenizer: the planner only needs the
    empty prompt's ids (</s> then padding), which every UMT5/T5 tokenizer agrees on."""
    path = config.text.tokenizer
    if not path or not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "tests", "fixtures", "umt5_tiny", "tokenizer")
    return path


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    code = int(ma.generated_code_size_in_bytes)
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "code_bytes": code, "total_bytes": arg + out - alias + temp + code}


_OOM = re.compile(r"RESOURCE_EXHAUSTED.*?required for HLO temporaries \(([\d.]+)([KMGT])\)")


_OOM_USED = re.compile(r"RESOURCE_EXHAUSTED.*?Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")


def _oom_bytes(msg: str):
    """Bytes XLA said the program needs, from its compile-time out-of-memory error (or None)."""
    msg = msg.replace("\n", " ")
    m = _OOM.search(msg) or _OOM_USED.search(msg)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))


def _oom_report(config, topo, mesh, temp_bytes, compile_s, msg):  # temp_bytes: what XLA asked for
    """XLA's compile-time out-of-memory answer as a planner result (fits: false)."""
    return {"config": {"frames": int(config.data.frames), "height": int(config.data.height),
                       "width": int(config.data.width), "global_batch": int(config.dit_train.batch_size)},
            "topology": {"name": topo.name, "num_slices": topo.num_slices, "chips": mesh.devices.size,
                         "hbm_bytes_per_chip": topo.hbm_bytes},
            "mesh": {k: int(v) for k, v in mesh.shape.items()},
            "train_step": {"fits": False, "per_chip": {"required_bytes": temp_bytes},
                           "hbm_bytes": topo.hbm_bytes, "compile_s": compile_s,
                           "xla_message": " ".join(msg.split())[:400]}}


def _compile(lowered, config, topo, mesh):
    """(compiled, None), or (None, the planner's report) when XLA refuses the program for HBM."""
    t = time.time()
    try:
        return lowered.compile(), None
    except Exception as e:  # noqa: BLE001 - XLA refuses a program that cannot fit: report it
        need = _oom_bytes(str(e))
        if need is None:
            raise
        return None, _oom_report(config, topo, mesh, need, round(time.time() - t, 1), str(e))


def plan(config, devices, topo: Topology, *, sampler: bool = True, log=print) -> dict:
    """Compiles the DiT train step (and one CFG denoising step) of `config` for `devices`."""
    import jax
    import jax.numpy as jnp

    from sorajax import sharding, stages, validate
    from sorajax import tokenizer as tok_lib
    from sorajax.train_state import Trainer
    from sorajax.models import dit as dit_lib

    t0 = time.time()
    # frames 1 + 4k, sizes vs stride x patch, ... (one line, exit 2); not the dataset, which
    # lives on the pod (a preset's latent cache), not on the planning machine.
    validate.validate(config, data=False)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    validate.validate_mesh(config, mesh)  # the batch over the data axes x grad_accum
    stage = stages.DiTStage(config, "/nonexistent", tok_lib.Tokenizer.load(config.text.tokenizer))
    trainer = Trainer(stage, config, mesh)
    vae_cfg, dit_cfg, text_cfg = stage.cfgs
    tcfg = config.dit_train
    B, F, H, W = int(tcfg.batch_size), int(config.data.frames), int(config.data.height), int(config.data.width)
    st, ss = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    accum = int(tcfg.grad_accum)
    lat = (B, 1 + (F - 1) // st, H // ss, W // ss, vae_cfg.z_dim)
    L = int(config.text.max_length)
    rules = trainer.rules
    bs = lambda nd: sharding.batch_sharding(mesh, rules, nd)
    if tcfg.packing == "bucket":
        raise UserError("dit_train.packing='bucket' compiles one step per clip shape: plan each shape "
                        "with --config.dit_train.packing=none --frames/--height/--width, or plan packing='pack'")
    packed = None
    if stage.packed():
        batch, packed = _packed_batch(stage, config, mesh, bs)
        tokens = packed["tokens_per_row"]
    else:
        batch = {"latents": jax.ShapeDtypeStruct(lat, jnp.float32, sharding=bs(5)),
                 "ids": jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bs(2)),
                 "mask": jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=bs(2))}
        tokens = dit_lib.num_tokens(dit_cfg, lat)
    state = trainer.abstract_target()
    lowered = trainer.step_fn().lower(state, batch)
    t1 = time.time()
    compiled, oom = _compile(lowered, config, topo, mesh)
    if oom is not None:
        return oom
    t2 = time.time()
    mem = _memory(compiled)
    hbm = topo.hbm_bytes
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    n_chips = mesh.devices.size
    if packed:  # each row as computed: its token budget against K captions (stages.DiTStage.step_flops)
        model_train = stage.step_flops()
    else:
        model_train = dit_train_step_flops(dit_cfg, text_cfg, B, lat, L, text_trainable=bool(config.text.trainable))
    coll = collective_stats(compiled.as_text())
    out = {
        "config": {"frames": F, "height": H, "width": W, "global_batch": B, "grad_accum": accum,
                   "latent_shape": list(lat), "tokens_per_sample": tokens, "text_len": L,
                   **({"packing": packed} if packed else {}),
                   "dit": {"variant": config.dit.variant, "attention": dit_cfg.attention,
                           "context_parallel": dit_cfg.context_parallel,
                           "remat": str(dit_cfg.remat), "scan_layers": dit_cfg.scan_layers,
                           "dtype": str(dit_cfg.dtype), "param_dtype": str(dit_cfg.param_dtype)}},
        "topology": {"name": topo.name, "num_slices": topo.num_slices, "chips": n_chips,
                     "grid": list(topo.grid), "hbm_bytes_per_chip": hbm},
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "train_step": {
            "per_chip": mem,
            "hbm_bytes": hbm,
            "fits": mem["total_bytes"] <= hbm,
            "headroom": round(1.0 - mem["total_bytes"] / hbm, 4),
            "xla_flops_per_step": float(cost.get("flops", 0.0)) * n_chips,
            "model_flops_per_step": model_train,
            "model_flops_note": "sorajax/flops.py: DiT 3x forward + text encoder 3x if trained, 1x if "
                                "frozen; no remat recompute",
            "xla_flops_note": "XLA's own count for the compiled program: includes remat recompute, "
                              "counts a while loop's body once (scan_layers: one block; ring/flash "
                              "attention loops: one block) and excludes Pallas kernels (splash)",
            "step_time_at_100pct_mfu_s": model_train / (n_chips * topo.peak_flops),
            "collectives": coll,
            "estimate": step_estimate(model_train, coll, topo, n_chips, str(dit_cfg.remat)),
            "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
        },
    }
    del compiled, lowered
    if sampler:
        out["sampler_step"] = _plan_sampler(trainer, stage, mesh, lat, L, topo, dit_cfg, text_cfg)
    return out


def _packed_batch(stage, config, mesh, bs):
    """dit_train.packing='pack': the packed global batch (packing.pack's arrays) as abstract
    arrays, its token budget taken as the trainer takes it (stages.DiTStage._pack_budget) from
    every clip shape the config's native settings produce (data.aspect_ratios, durations,
    resolutions, image_share) -> (batch, the budget's description)."""
    import types

    import jax
    import jax.numpy as jnp

    from sorajax.data import shapes
    from sorajax.models import vae as vae_lib

    vae_cfg, dit_cfg, _ = stage.cfgs
    d = config.data
    native = shapes.native_settings(d)
    clips = shapes.all_clip_shapes(native, d.height, d.width) if native else [(int(d.frames), int(d.height), int(d.width))]
    lat_shapes = [vae_lib.latent_shape(vae_cfg, *c) for c in clips]
    stage._mesh = mesh
    budget, sizes, stage._max_frames = stage._pack_budget(types.SimpleNamespace(clip_shapes=lat_shapes))
    stage.latent_source = types.SimpleNamespace(clip_shapes=lat_shapes)  # what step_flops sizes rows by
    if max(sizes) > budget.tokens:
        raise UserError(f"dit_train.pack_tokens={budget.tokens}: the largest clip ({clips[sizes.index(max(sizes))]}, "
                        f"{max(sizes)} tokens) does not fit a row")
    R, N, K, L = budget.rows, budget.tokens, budget.max_clips, int(config.text.max_length)
    pt, ph, pw = dit_cfg.patch_size
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=bs(len(shape)))
    batch = {"tokens": spec((R, N, pt * ph * pw * vae_cfg.z_dim), jnp.float32),
             "positions": spec((R, N, 3), jnp.int32), "segment_ids": spec((R, N), jnp.int32),
             "start_tokens": spec((R, N), jnp.bool_), "ids": spec((R, K, L), jnp.int32),
             "mask": spec((R, K, L), jnp.int32), "text_segment_ids": spec((R, K * L), jnp.int32),
             "clip_tokens": spec((R, K), jnp.int32), "clip_frames": spec((R, K), jnp.int32)}
    desc = {"rows": R, "tokens_per_row": N, "clips_per_row": K,
            "clip_shapes": [{"frames": f, "height": h, "width": w, "tokens": n}
                            for (f, h, w), n in zip(clips, sizes)]}
    return batch, desc


def _plan_sampler(trainer, stage, mesh, lat, L, topo, dit_cfg, text_cfg):
    """One classifier-free-guidance denoising step of the sampler (2B DiT forwards) on the
    trained params: what `sorajax.sample` runs `steps` times."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import sharding

    B = lat[0]
    rules = trainer.rules
    state = trainer.abstract_target()
    params, frozen = state["ema"], state["frozen"]
    bs = lambda nd: sharding.batch_sharding(mesh, rules, nd)
    x = jax.ShapeDtypeStruct(lat, jnp.float32, sharding=bs(5))
    ctx = jax.ShapeDtypeStruct((2 * B, L, text_cfg.d_model), jnp.float32, sharding=bs(3))
    sig = jax.ShapeDtypeStruct((B,), jnp.float32, sharding=bs(1))

    def step(params, frozen, x, ctx, sigma):
        with sharding.activation_rules(mesh, rules):
            model = nnx.merge(trainer.graphdef, params, frozen)
            v = model.velocity(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]), ctx)
            cond, uncond = jnp.split(v, 2)
            return x - 0.02 * (uncond + 5.0 * (cond - uncond))

    t0 = time.time()
    lowered = jax.jit(step, donate_argnums=(2,)).lower(params, frozen, x, ctx, sig)
    compiled = lowered.compile()
    mem = _memory(compiled)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"per_chip": mem, "fits": mem["total_bytes"] <= topo.hbm_bytes,
            "headroom": round(1.0 - mem["total_bytes"] / topo.hbm_bytes, 4),
            "xla_flops_per_step": float(cost.get("flops", 0.0)) * mesh.devices.size,
            "model_flops_per_step": sampler_step_flops(dit_cfg, B, lat, L),
            "collectives": collective_stats(compiled.as_text()),
            "compile_s": round(time.time() - t0, 1)}


def plan_sampling(config, devices, topo: Topology, *, batch: int = 1, steps: int = 50, log=print) -> dict:
    """Compiles the whole sampler `sorajax.sample` runs -- the prompts' text encoding, `steps`
    classifier-free-guidance denoising steps in one jitted loop (batched conditional and
    unconditional forwards) and the VAE decode of the result, sharded as the config's mesh and
    rules say (row-sharded VAE, context-parallel DiT) -- for `batch` clips of the config's
    data.frames x height x width on `devices`, with the weights in the config's param dtypes and
    no optimizer state."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sorajax import checkpoint as ckpt_lib
    from sorajax import sampler as sampler_lib
    from sorajax import sharding, validate
    from sorajax import tokenizer as tok_lib
    from sorajax.flops import vae_decode_flops
    from sorajax.models import dit as dit_lib
    from sorajax.models import video

    validate.validate(config, data=False)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    rules = sharding.normalize_rules(config.sharding_rules)
    tok = tok_lib.Tokenizer.load(_tokenizer_path(config))
    vocab = tok.vocab_size if config.text.vocab_from_tokenizer else None
    vae_cfg, dit_cfg, text_cfg = video.model_configs(config, vocab_size=vocab)
    F, H, W = int(config.data.frames), int(config.data.height), int(config.data.width)
    validate.check_context_split(vae_cfg, dit_cfg, F, H, W, mesh, rules, "--frames/--height/--width")
    st, ss = vae_cfg.temporal_stride, vae_cfg.spatial_stride
    lat = (int(batch), 1 + (F - 1) // st, H // ss, W // ss, vae_cfg.z_dim)
    L = int(config.text.max_length)
    abstract = nnx.eval_shape(lambda: video.VideoModel(vae_cfg, dit_cfg, text_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state = ckpt_lib.abstract_with_shardings(state, sharding.state_shardings(state, mesh, rules))
    def arg(shape, dtype):  # split over the batch axes where the batch divides (1 clip: replicated)
        spec = sharding.logical_to_spec(("batch",) + (None,) * (len(shape) - 1), rules, mesh, shape)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    noise = arg(lat, jnp.float32)
    ids = arg((lat[0], L), jnp.int32)
    sigmas, model_sigmas = sampler_lib.schedule("unipc", int(steps), 5.0)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    fn = sampler_lib._compiled(graphdef, "unipc", True, True, mesh, rules)
    t0 = time.time()
    lowered = fn.lower(state, noise, ids, ids, ids, ids, jnp.asarray(sigmas), jnp.asarray(model_sigmas),
                       scalar, scalar, scalar, scalar, scalar,
                       arg((lat[0],), jnp.bool_))
    t1 = time.time()
    compiled, oom = _compile(lowered, config, topo, mesh)
    if oom is not None:
        return oom
    mem = _memory(compiled)
    n_chips = mesh.devices.size
    dit_flops = sampler_step_flops(dit_cfg, lat[0], lat, L) * int(steps)
    vae_flops = vae_decode_flops(vae_cfg, F, H, W) * lat[0]
    coll = collective_stats(compiled.as_text())
    return {
        "config": {"frames": F, "height": H, "width": W, "batch": lat[0], "steps": int(steps),
                   "solver": "unipc", "guidance": True, "latent_shape": list(lat),
                   "tokens_per_sample": dit_lib.num_tokens(dit_cfg, lat),
                   "text_len": L,
                   "dit": {"variant": config.dit.variant, "attention": dit_cfg.attention,
                           "context_parallel": dit_cfg.context_parallel, "scan_layers": dit_cfg.scan_layers,
                           "dtype": str(dit_cfg.dtype), "param_dtype": str(dit_cfg.param_dtype)}},
        "topology": {"name": topo.name, "num_slices": topo.num_slices, "chips": n_chips,
                     "grid": list(topo.grid), "hbm_bytes_per_chip": topo.hbm_bytes},
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "sample": {
            "per_chip": mem, "hbm_bytes": topo.hbm_bytes,
            "fits": mem["total_bytes"] <= topo.hbm_bytes,
            "headroom": round(1.0 - mem["total_bytes"] / topo.hbm_bytes, 4),
            "model_flops": dit_flops + vae_flops, "dit_flops": dit_flops, "vae_decode_flops": vae_flops,
            "time_at_100pct_mfu_s": (dit_flops + vae_flops) / (n_chips * topo.peak_flops),
            "collectives": coll,
            "lower_s": round(t1 - t0, 1), "compile_s": round(time.time() - t1, 1),
        },
    }


# ----------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------
def candidate_meshes(chips: int, batch: int, heads: int, tokens: int, max_context: int = 64):
    """(fsdp, context, tensor) with fsdp*context*tensor = chips, the batch divisible over fsdp,
    tensor dividing the heads; smallest context and tensor first."""
    out = []
    p2 = [2**i for i in range(0, int(math.log2(chips)) + 1)]
    for t, c in itertools.product(p2, p2):
        if t * c > chips or chips % (t * c) or heads % t or c > max_context or tokens % c:
            continue
        f = chips // (t * c)
        if batch % f:
            continue
        out.append(dict(data=1, fsdp=f, context=c, tensor=t))
    return sorted(out, key=lambda m: (m["tensor"], m["context"]))


def search(config, devices, topo, *, remats=("full", "dots"), max_candidates=6, log=print):
    import copy

    from sorajax.models import dit as dit_lib
    from sorajax.models import video

    vae_cfg, dit_cfg, _ = video.model_configs(config)
    B, st, ss = int(config.dit_train.batch_size), vae_cfg.temporal_stride, vae_cfg.spatial_stride
    lat = (1 + (video.window_frames(config) - 1) // st, int(config.data.height) // ss, int(config.data.width) // ss)
    lat_tokens = dit_lib.num_tokens(dit_cfg, lat)
    per_slice = len(devices) // topo.num_slices
    meshes = candidate_meshes(per_slice, B // max(topo.num_slices, 1), dit_cfg.num_attention_heads, lat_tokens)
    results = []
    for mesh_kw, remat in list(itertools.product(meshes, remats))[:max_candidates]:
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            for k, v in mesh_kw.items():
                cfg.mesh[k] = v
            if topo.num_slices > 1:
                cfg.mesh.dcn_data = topo.num_slices
            # all-to-all needs the heads to split over tensor x context; otherwise ring.
            cp = "all_to_all" if dit_cfg.num_attention_heads % (mesh_kw["context"] * mesh_kw["tensor"]) == 0 else "ring"
            cfg.dit.overrides = dict(cfg.dit.overrides, remat=remat, context_parallel=cp)
        log(f"[search] mesh {mesh_kw} remat={remat} context_parallel={cp} ...")
        try:
            r = plan(cfg, devices, topo, sampler=False, log=log)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is reported
            results.append({"mesh": mesh_kw, "remat": remat, "error": str(e).splitlines()[0][:300]})
            continue
        ts = r["train_step"]
        results.append({"mesh": r["mesh"], "remat": remat, "context_parallel": cp,
                        "fits": ts["fits"], "headroom": ts.get("headroom"), "compile_s": ts["compile_s"],
                        "per_chip_total_bytes": ts["per_chip"].get("total_bytes"),
                        "per_chip_temp_bytes": ts["per_chip"].get("temp_bytes"),
                        "per_chip_required_bytes": ts["per_chip"].get("required_bytes"),
                        "collective_bytes": sum(v["bytes"] for v in ts.get("collectives", {}).values())})
    ok = sorted((r for r in results if r.get("fits")), key=lambda r: (r["per_chip_total_bytes"], r["collective_bytes"]))
    return {"ranked": ok, "all": results}
