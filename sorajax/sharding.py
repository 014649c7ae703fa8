"""Meshes, logical axis names and the rules that map them to mesh axes.

Model code only ever names *logical* axes (below). Configs hold `sharding_rules`, a list of
(logical name, mesh axis or tuple of mesh axes or None) pairs; every parameter, optimizer-state,
EMA, activation and batch sharding is derived from those rules here.
"""
from __future__ import annotations

# ----------------------------------------------------------------------------------------------
# Logical axis names (declared once).
# ----------------------------------------------------------------------------------------------
LOGICAL_AXES = {
    "batch": "examples in a global batch",
    "length": "token / sequence positions (video tokens, text tokens)",
    "embed": "model width (DiT hidden, T5 d_model)",
    "mlp": "MLP hidden width",
    "heads": "attention heads x head_dim, fused (q/k/v/out projections)",
    "kv": "per-head feature dim",
    "vocab": "text vocabulary",
    "norm": "1-D scale/bias vectors of norms",
    "conv_in": "input channels of a convolution",
    "conv_out": "output channels of a convolution",
    "time": "frames (pixel or latent) of a video",
    "modulation": "adaLN modulation slots (shift/scale/gate)",
    "rel_buckets": "relative-position buckets of T5 attention bias",
    "height": "pixel / latent rows of a video activation (the VAE's spatial sequence axis)",
    "width": "pixel / latent columns of a video activation",
}

MESH_AXES = ("data", "fsdp", "context", "tensor")

import contextlib
import logging
import math
import sys
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sorajax.errors import UserError

log = logging.getLogger(__name__)

# Default rules: pure data parallelism + FSDP over "embed"/"mlp"/"heads" where the fsdp axis > 1,
# tensor parallelism over heads/mlp, sequence over "context". A rule maps a logical name to a mesh
# axis, a tuple of mesh axes, or None (replicated). The first rule naming a logical axis wins.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("time", None),
    ("modulation", None),
    ("rel_buckets", None),
    ("height", "context"),
    ("width", "context"),  # used only where rows do not divide (an axis is used once per array)
)


# ----------------------------------------------------------------------------------------------
# Multi-host initialisation.
# ----------------------------------------------------------------------------------------------
def maybe_initialize_distributed() -> None:
    """Calls jax.distributed.initialize() when running multi-process.

    On Cloud TPU pods and SLURM/GPU clusters JAX discovers the coordinator from the environment;
    on other clusters set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
    (docs/SCALING.md). A single process with none of these set does nothing.
    """
    import os

    env = os.environ
    explicit = env.get("JAX_COORDINATOR_ADDRESS")
    if explicit and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        # CPU hosts (tests, fake devices) need cross-process collectives; harmless elsewhere.
        if str(jax.config.jax_cpu_collectives_implementation or "none").lower() == "none":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=explicit,
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif env.get("TPU_WORKER_HOSTNAMES") or env.get("SLURM_JOB_ID") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # JAX writes the persistent compilation cache from process 0 only, and on CPU its key
        # holds a per-process topology fingerprint, so only process 0 ever hits it. Its first
        # collective then waits for the others' full compile, past gloo's fixed 30 s rendezvous
        # timeout ("Gloo context initialization failed"). All processes compile instead.
        jax.config.update("jax_enable_compilation_cache", False)


# ----------------------------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------------------------
def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[dict, dict]:
    """Resolves ICI and DCN axis sizes (-1 = fill) into concrete sizes. Raises UserError."""
    # mesh_cfg: a config's `mesh` section, or a partial dict from code (a missing axis has size 1).
    ici = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
    dcn = {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES}
    for name, sizes, total in (("mesh", ici, num_devices // max(num_slices, 1)), ("mesh.dcn", dcn, num_slices)):
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise UserError(f"{name}: only one axis may be -1 (fill), got {fill}")
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if any(s == 0 or s < -1 for s in sizes.values()):
            raise UserError(f"{name}: axis sizes must be positive or -1, got {sizes}")
        if fill:
            if total % fixed:
                raise UserError(f"{name}: {total} devices do not divide by the fixed axes {sizes}")
            sizes[fill[0]] = total // fixed
        if math.prod(sizes.values()) != total:
            raise UserError(
                f"{name}: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                f"but there are {total} {'devices per slice' if name == 'mesh' else 'slices'}")
    return ici, dcn


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """Builds the 4-axis mesh (data, fsdp, context, tensor).

    Axis type is Auto on purpose: parameters, batches and key activations get explicit
    shardings from the rules and GSPMD propagates the rest. Explicit ("sharding in types") mode
    would make every op's output sharding part of its type, which the conv-heavy VAE and the
    ring-attention shard_maps do not need and which makes user configs brittle.
    """
    devices = list(devices if devices is not None else jax.devices())
    num_slices = 1
    if hasattr(devices[0], "slice_index"):
        num_slices = len({d.slice_index for d in devices})
    ici, dcn = mesh_shape(mesh_cfg, len(devices), num_slices)
    shape = tuple(ici[a] * dcn[a] for a in MESH_AXES)
    if num_slices > 1:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_hybrid_device_mesh(
            tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES), devices=devices)
    else:
        try:
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception as e:  # e.g. a shape the physical topology cannot embed
            arr = np.asarray(devices).reshape(shape)
            msg = (f"mesh {dict(zip(MESH_AXES, shape))} does not follow the device topology "
                   f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); using the "
                   "devices in enumeration order, so collectives may cross slower links")
            log.warning(msg)
            print(f"warning: {msg}", file=sys.stderr, flush=True)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------------------------
# Logical names -> PartitionSpecs -> shardings.
# ----------------------------------------------------------------------------------------------
def normalize_rules(rules) -> tuple:
    out = []
    for item in rules or DEFAULT_RULES:
        name, target = item
        if name not in LOGICAL_AXES:
            raise UserError(f"sharding_rules: unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}")
        if isinstance(target, list):
            target = tuple(target)
        for t in (target if isinstance(target, tuple) else (target,)):
            if t is not None and t not in MESH_AXES:
                raise UserError(f"sharding_rules: {name!r} maps to unknown mesh axis {t!r}; known: {MESH_AXES}")
        out.append((name, target))
    return tuple(out)


def logical_to_spec(names: Sequence[str | None] | None, rules, mesh=None, shape=None) -> P:
    """Maps logical names to a PartitionSpec. A mesh axis is used at most once per array; axes
    whose size does not divide the dimension (or are size 1) are dropped so any model shape
    stays valid on any mesh."""
    if not names:
        return P()
    table = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target if isinstance(target, tuple) else (target,))
        keep = []
        for a in axes:
            if a in used:
                continue
            size = mesh.shape[a] if mesh is not None else 2
            if mesh is not None and size == 1:
                continue
            dim = shape[i] if shape is not None else None
            cur = math.prod(mesh.shape[k] for k in keep) if mesh is not None else 1
            if dim is not None and mesh is not None and dim % (cur * size):
                continue
            keep.append(a)
        used.update(keep)
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return P(*out)


def _var_names(var) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh, rules) -> nnx.State:
    """NamedShardings for every leaf of an NNX State, from the variables' logical names."""
    rules = normalize_rules(rules)

    def one(var):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        spec = logical_to_spec(_var_names(var), rules, mesh, getattr(value, "shape", None))
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, rules, ndim: int) -> NamedSharding:
    spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), normalize_rules(rules), mesh)
    return NamedSharding(mesh, spec)


def axis_size(mesh, rules, name: str) -> int:
    """Devices a logical axis is split over under `rules` (before any divisibility check)."""
    table = {}
    for n, target in normalize_rules(rules):
        table.setdefault(n, target)
    target = table.get(name)
    axes = () if target is None else (target if isinstance(target, tuple) else (target,))
    return math.prod(mesh.shape[a] for a in axes)


def data_parallel_size(mesh, rules) -> int:
    spec = logical_to_spec(("batch",), normalize_rules(rules), mesh)
    axes = spec[0] if len(spec) else None
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def process_batch_rows(mesh, rules, batch_size: int) -> np.ndarray:
    """Sorted rows of a global batch of `batch_size` that this process's devices hold in the
    batch sharding: what this process's input pipeline must read (data.pipeline rows=), so the
    global batch is the same whatever the process count or mesh."""
    s = batch_sharding(mesh, rules, 1)
    rows: set[int] = set()
    for idx in s.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*idx[0].indices(batch_size)))
    return np.asarray(sorted(rows), np.int64)


def global_batch(local: dict, mesh, rules, batch_size: int | None = None) -> dict:
    """Assembles process-local numpy batches into global jax.Arrays sharded over the batch axes.

    With `batch_size` (the global batch) the local rows are `process_batch_rows(mesh, rules,
    batch_size)` of the global batch, in that order; without it each process's rows are assumed
    to be its contiguous share (jax.make_array_from_process_local_data's inference)."""
    out = {}
    for k, v in local.items():
        if not isinstance(v, np.ndarray) or v.dtype == object:
            continue
        sharding = batch_sharding(mesh, rules, v.ndim)
        if jax.process_count() == 1:
            out[k] = jax.device_put(v, sharding)
        elif batch_size is not None:
            out[k] = jax.make_array_from_process_local_data(
                sharding, v, (int(batch_size),) + v.shape[1:])
        else:
            out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single process): every process must call it, in
    the same order; used where process 0 writes files that the others then read."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# Activation shardings: model code names logical axes, the active (mesh, rules) decide.
# ----------------------------------------------------------------------------------------------
_ACTIVE: list = []  # stack of (mesh, rules); the top one is used while tracing


@contextlib.contextmanager
def activation_rules(mesh, rules):
    """Makes `constrain` and the context-parallel attention see `mesh` and `rules` while a
    function is traced (wrap the body of a jitted function, not the call)."""
    _ACTIVE.append((mesh, normalize_rules(rules)))
    try:
        yield
    finally:
        _ACTIVE.pop()


def active():
    """(mesh, rules) of the innermost `activation_rules`, or (None, None)."""
    return _ACTIVE[-1] if _ACTIVE else (None, None)


def constrain(x, names):
    """with_sharding_constraint from logical names; a no-op outside `activation_rules` or on a
    1-device mesh. Mesh axes that do not divide a dimension are dropped (logical_to_spec)."""
    mesh, rules = active()
    if mesh is None or mesh.size == 1:
        return x
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def weight(w, names, dtype):
    """A parameter `w` with logical axes `names`, cast to the compute `dtype`, for a matmul.
    Forward this is the cast (the partitioner all-gathers the FSDP shards where the matmul needs
    them); the constraint's transpose puts the same sharding on the gradient, so the partial
    gradients of the batch shards are reduced onto the parameter's shards, not replicated: a
    reduce-scatter where XLA:TPU picks one (the 14B step: every DiT weight gradient), an
    all-reduce and a slice where it judges that cheaper (toy sizes; docs/SCALING.md)."""
    return constrain(w.astype(dtype), names)


def logical_spec(names, shape=None) -> P | None:
    """PartitionSpec of logical names under the active rules (None outside activation_rules)."""
    mesh, rules = active()
    if mesh is None:
        return None
    return logical_to_spec(names, rules, mesh, shape)
