"""Context-parallel attention (ring / all-to-all) and the blockwise flash kernel vs plain XLA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sorajax.models.context_parallel import VARIANTS, context_parallel_attention, flash_attention

AXES = ("data", "fsdp", "context", "tensor")
TOL = 1e-5


def make_mesh(data=1, fsdp=1, context=1, tensor=1):
    shape = (data, fsdp, context, tensor)
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def inputs(b, n, h, d, seed=0):
    """q, k, v and an output cotangent w, (b, n, h, d) f32 (numpy: no eager XLA compiles)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((b, n, h, d), np.float32)) for _ in range(4))


def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def out_and_grads(attn):
    """jit(q, k, v, w) -> (attn(q, k, v), d/d(q, k, v) of sum(attn * w)) in one compile."""
    def f(q, k, v, w):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(w)
    return jax.jit(f)


def max_errors(got, want):
    (o, grads), (o_ref, grads_ref) = got, want
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip((o, *grads), (o_ref, *grads_ref))]


@pytest.mark.parametrize("n,block_q,block_k", [(64, 16, 16), (100, 16, 32)])
def test_flash_attention_matches_xla(n, block_q, block_k):
    q, k, v, w = inputs(2, n, 4, 16)
    attn = functools.partial(flash_attention, block_q=block_q, block_k=block_k)
    errs = max_errors(out_and_grads(attn)(q, k, v, w), out_and_grads(reference)(q, k, v, w))
    assert max(errs) < TOL, dict(zip(("o", "dq", "dk", "dv"), errs))


def test_flash_attention_cross_lengths_and_bf16():
    q, _, _, _ = inputs(1, 40, 2, 8, seed=1)
    _, k, v, _ = inputs(1, 72, 2, 8, seed=2)
    want = jax.jit(reference)(q, k, v)
    got = jax.jit(functools.partial(flash_attention, block_q=64, block_k=16))(q, k, v)  # bq > Nq
    assert float(jnp.max(jnp.abs(got - want))) < TOL
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    out, grads = out_and_grads(functools.partial(flash_attention, block_q=16, block_k=16))(
        qb, kb, vb, jnp.ones_like(qb))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - want))) < 3e-2


MESHES = {
    "context8": (dict(context=8), None, None),
    "data2_context4": (dict(data=2, context=4), "data", None),
    "context4_tensor2": (dict(context=4, tensor=2), None, "tensor"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_context_parallel_matches_xla(mesh_name, variant):
    sizes, batch_axes, head_axes = MESHES[mesh_name]
    mesh = make_mesh(**sizes)
    q, k, v, w = inputs(2, 128, 8, 8)  # 8 heads: divisible by every context size here
    spec = P(batch_axes, "context", head_axes, None)
    q, k, v, w = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, w))
    assert len(q.sharding.device_set) == mesh.size and q.addressable_shards[0].data.shape[1] < 128
    attn = functools.partial(context_parallel_attention, mesh=mesh, variant=variant,
                             batch_axes=batch_axes, head_axes=head_axes, block_q=16, block_k=8)
    got = out_and_grads(attn)(q, k, v, w)
    assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, spec), 4)
    errs = max_errors(got, out_and_grads(reference)(q, k, v, w))
    assert max(errs) < TOL, dict(zip(("o", "dq", "dk", "dv"), errs))


def test_all_to_all_with_custom_kernel():
    """`attend` is any (q, k, v) -> o kernel (here plain XLA) on the full sequence of H/c heads."""
    mesh = make_mesh(data=2, context=4)
    spec = P("data", "context", None, None)
    q, k, v, w = (jax.device_put(x, NamedSharding(mesh, spec)) for x in inputs(2, 64, 8, 8))
    attn = functools.partial(context_parallel_attention, mesh=mesh, variant="all_to_all",
                             batch_axes="data", attend=reference)
    errs = max_errors(out_and_grads(attn)(q, k, v, w), out_and_grads(reference)(q, k, v, w))
    assert max(errs) < TOL, dict(zip(("o", "dq", "dk", "dv"), errs))


@pytest.mark.parametrize("variant,collective", [("ring", "collective-permute"),
                                                ("all_to_all", "all-to-all")])
def test_compiled_collectives_and_memory(variant, collective):
    """Forward + backward compile to the expected collective and keep per-device temporaries far
    below one device's share of the logits (B * H * N * N * 4 bytes / c)."""
    b, n, h, d, c = 1, 2048, 8, 8, 8
    mesh = make_mesh(context=c)
    sharding = NamedSharding(mesh, P(None, "context", None, None))
    arg = jax.ShapeDtypeStruct((b, n, h, d), jnp.float32, sharding=sharding)
    attn = functools.partial(context_parallel_attention, mesh=mesh, variant=variant,
                             block_q=64, block_k=64)
    compiled = out_and_grads(attn).lower(arg, arg, arg, arg).compile()
    assert collective in compiled.as_text()
    logits_share = b * h * n * n * 4 // c  # 16 MiB per device if the logits were materialised
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < logits_share // 4, (temp, logits_share)  # ~1.5 MB (ring), ~0.5 MB (all_to_all)


def test_all_to_all_rejects_indivisible_heads():
    mesh = make_mesh(context=4)
    q, k, v, _ = inputs(1, 32, 10, 8)
    with pytest.raises(ValueError, match=r"heads \(10\) divisible .* \(4\); use variant='ring'"):
        context_parallel_attention(q, k, v, mesh=mesh, variant="all_to_all")


def test_unknown_variant():
    q, k, v, _ = inputs(1, 32, 4, 8)
    with pytest.raises(ValueError, match="ring.*all_to_all"):
        context_parallel_attention(q, k, v, mesh=make_mesh(context=4), variant="ulysses")


# ----------------------------------------------------------------------------------------------
# Packed sequences: segment ids shard with the tokens (ring: the kv ids travel with their block).
# ----------------------------------------------------------------------------------------------
# 64 tokens (12 and 7 padding, id 0): clips straddle the shards (8 or 16 tokens per device) and
# the blocks of 4, so whole k/v shards and blocks are masked for some queries.
CP_PACKINGS = [[(1, 13), (2, 30), (3, 9)], [(4, 40), (1, 17)]]
CP_KV_PACKINGS = [[(3, 20), (1, 6), (2, 25)], [(1, 9), (4, 50)]]  # the same clips laid out otherwise


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mesh_name", ["context8", "data2_context4"])
def test_context_parallel_packed_matches_per_clip(mesh_name, variant):
    """Keys packed differently from the queries (as cross-attention would): the kv ids must
    travel with their k/v (ring) or be gathered as kv ids (all_to_all), not stand in for q's."""
    from tests.test_attention import packed_ids, packed_vs_per_clip

    sizes, batch_axes, head_axes = MESHES[mesh_name]
    mesh = make_mesh(**sizes)
    spec = P(batch_axes, "context", head_axes, None)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in inputs(2, 64, 8, 8)[:3])
    q_ids, kv_ids = packed_ids(CP_PACKINGS, 64), packed_ids(CP_KV_PACKINGS, 64)
    attn = functools.partial(context_parallel_attention, mesh=mesh, variant=variant,
                             batch_axes=batch_axes, head_axes=head_axes, block_q=4, block_k=4)
    err, grad_errs, finite = packed_vs_per_clip(attn, q, k, v, q_ids, kv_ids)
    assert max(err, *grad_errs) < TOL and finite, dict(zip(("o", "dq", "dk", "dv"), (err, *grad_errs)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_self_attention_packed_under_rules(variant):
    """The model's entry point on an fsdp=2 x context=4 mesh: segment ids sharded like the tokens
    (batch, length), all_to_all's local kernel (backend "xla": a segment mask) gets the gathered
    ids; kv ids default to the q ids."""
    from sorajax import sharding
    from sorajax.models import attention
    from tests.test_attention import packed_ids, packed_vs_per_clip

    mesh = sharding.make_mesh(dict(fsdp=2, context=4))

    def attn(q, k, v, q_segment_ids, kv_segment_ids):
        with sharding.activation_rules(mesh, sharding.normalize_rules(None)):
            return attention.self_attention(q, k, v, backend="xla", context_parallel=variant,
                                            q_segment_ids=q_segment_ids)

    q, k, v, _ = inputs(2, 64, 8, 8, seed=1)
    ids = packed_ids(CP_PACKINGS, 64)
    lowered = jax.jit(attn).lower(q, k, v, ids, ids).as_text()  # still context-parallel
    assert ("collective_permute" if variant == "ring" else "all_to_all") in lowered
    err, grad_errs, finite = packed_vs_per_clip(attn, q, k, v, ids, ids)
    assert max(err, *grad_errs) < TOL and finite, dict(zip(("o", "dq", "dk", "dv"), (err, *grad_errs)))


# ----------------------------------------------------------------------------------------------
# Context parallelism never switches itself off: tokens that do not split are an error.
# ----------------------------------------------------------------------------------------------
def _self_attention_under_rules(mesh, variant="ring"):
    from sorajax import sharding
    from sorajax.models import attention

    def f(q, k, v):
        with sharding.activation_rules(mesh, sharding.normalize_rules(None)):
            return attention.self_attention(q, k, v, backend="xla", context_parallel=variant)
    return f


@pytest.mark.parametrize("variant", VARIANTS)
def test_self_attention_rejects_tokens_not_divisible_by_context(variant):
    from sorajax import sharding

    mesh = sharding.make_mesh(dict(context=8))
    f = _self_attention_under_rules(mesh, variant)
    q, k, v, _ = inputs(1, 60, 8, 8)
    with pytest.raises(ValueError, match=r"self-attention over 60 tokens cannot be split over context=8 "
                                         r"devices: the token count must be a multiple of 8; change "
                                         r"frames/height/width or mesh\.context"):
        jax.eval_shape(f, q, k, v)
    # 64 tokens split: context-parallel (ring / all-to-all collectives) and equal to full attention.
    q, k, v, _ = inputs(1, 64, 8, 8)
    compiled = jax.jit(f).lower(q, k, v).compile()
    assert ("collective-permute" if variant == "ring" else "all-to-all") in compiled.as_text()
    out = compiled(q, k, v)
    assert float(jnp.max(jnp.abs(out - reference(q, k, v)))) < TOL


def test_dit_rejects_tokens_not_divisible_by_context():
    """The error reaches the model: the tiny DiT on a 3 x 4 x 6 latent has 3 * 2 * 3 = 18 tokens."""
    from flax import nnx

    from sorajax import sharding
    from sorajax.models import dit

    mesh = sharding.make_mesh(dict(context=8))
    cfg = dit.VARIANTS["tiny"]()

    def fwd(x):
        with sharding.activation_rules(mesh, sharding.normalize_rules(None)):
            model = dit.WanDiT(cfg, rngs=nnx.Rngs(0))
            return model(x, jnp.zeros((1,)), jnp.zeros((1, 4, cfg.text_dim)))

    with pytest.raises(ValueError, match=r"over 18 tokens cannot be split over context=8 devices"):
        jax.eval_shape(fwd, jax.ShapeDtypeStruct((1, 3, 4, 6, cfg.in_channels), jnp.float32))
    out = jax.eval_shape(fwd, jax.ShapeDtypeStruct((1, 4, 4, 8, cfg.in_channels), jnp.float32))  # 32
    assert out.shape == (1, 4, 4, 8, cfg.out_channels)


def test_kernel_shard_map_keeps_queries_sequence_sharded():
    """A per-device kernel (splash on TPU; here the XLA kernel through the same shard_map) for the
    DiT's cross-attention: the video queries stay split over context, the short text keys/values
    are whole on every device. Values and gradients equal unsharded attention, and the compiled
    program gathers no queries (before: all 4 context devices attended with all the queries and
    summed their gradients back)."""
    from sorajax import sharding
    from sorajax.models import attention

    mesh = sharding.make_mesh(dict(fsdp=2, context=4))
    rules = sharding.normalize_rules(None)
    q, _, _, w = inputs(2, 64, 8, 8, seed=3)
    k, v, _, _ = inputs(2, 16, 8, 8, seed=4)

    def cross(q, k, v):
        with sharding.activation_rules(mesh, rules):
            return attention._in_shard_map(attention._local_fn("xla", 8 ** -0.5), q, k, v)

    shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    qs = shard(P(("data", "fsdp"), "context", None, None))
    kvs = shard(P(("data", "fsdp"), None, None, None))
    f = out_and_grads(cross)
    compiled = f.lower(*(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                         for a, s in ((q, qs), (k, kvs), (v, kvs), (w, qs)))).compile().as_text()
    assert "all-gather" not in compiled
    out, grads = f(jax.device_put(q, qs), jax.device_put(k, kvs), jax.device_put(v, kvs), jax.device_put(w, qs))
    ref, ref_grads = out_and_grads(reference)(q, k, v, w)
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert float(jnp.max(jnp.abs(a - b))) < TOL
