"""The AOT planner: TPU topology names, analytic FLOPs, HLO collective counting, and a real
compile of a Wan config's tiny variant with a pod preset's parallelism for a v5p slice on this
CPU-only machine (libtpu)."""
import json

import pytest

from sorajax import aot, collectives, config_lib, flops
from sorajax.errors import UserError
from sorajax.models import video
from tests.helpers import ROOT, run_cli


@pytest.mark.parametrize("name,chips,grid", [
    ("v5p-256", 128, (4, 4, 8)), ("v5p-1024", 512, (8, 8, 8)), ("v5p-8", 4, (2, 2, 1)),
    ("v4-32", 16, (2, 2, 4)), ("v5e-16", 16, (4, 4)), ("v6e-256", 256, (16, 16)), ("v5litepod-4", 4, (2, 2)),
])
def test_topology_names(name, chips, grid):
    t = aot.parse_topology(name)
    assert (t.chips, t.grid) == (chips, grid)


@pytest.mark.parametrize("name", ["v5p-255", "v7x-8", "v5p", "tpu-8", "v5p-2", "v5e-12"])
def test_bad_topology_names_are_user_errors(name):
    with pytest.raises(UserError, match="topology"):
        aot.parse_topology(name)


def test_analytic_flops_follow_reference_formula():
    """REFERENCE.md: at 75,600 tokens attention is about 70% of the 14B DiT's forward FLOPs."""
    cfg = config_lib.load_config(str(ROOT / "configs" / "wan2_1_t2v_14b.py"))
    _, dit_cfg, _ = video.model_configs(cfg)
    n, d = 75_600, dit_cfg.dim
    total = flops.dit_forward_flops(dit_cfg, n, 512)
    attn_core = dit_cfg.num_layers * 4 * n * n * d
    assert 0.6 < attn_core / total < 0.75


def test_collective_stats_parse_hlo():
    hlo = """
  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %p), replica_groups={}
  %ar-start = (f32[256]{0}, f32[256]{0}) all-reduce-start(f32[256]{0} %x), to_apply=%add
  %cp = f32[2,1,32,3]{3,2,1,0} collective-permute(f32[2,1,32,3]{3,2,1,0} %y), source_target_pairs={{0,1}}
"""
    s = collectives.collective_stats(hlo)
    assert (s["all-gather"]["count"], s["all-gather"]["bytes"]) == (1, 8 * 1024 * 2)
    assert (s["all-reduce"]["count"], s["all-reduce"]["bytes"], s["all-reduce"]["async"]) == (1, 256 * 4, 1)
    assert (s["collective-permute"]["count"], s["collective-permute"]["bytes"]) == (1, 2 * 32 * 3 * 4)
    assert s["all-to-all"]["count"] == 0


# A compiled module's shape: a scanned layer (a while loop of 40 trips) holding an FSDP all-gather
# and two reduce-scatters -- one plain, one as XLA:TPU writes gradients: a fusion calling an
# `all-reduce-scatter` computation (all-reduce + this chip's slice) -- a combined all-reduce of 6
# operands (XLA writes /*index=5*/ inside the tuple), and a kernel's config spilling onto a line
# that starts with "}}" inside a computation.
MODULE = """HloModule jit_step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], bf16[8,1024])) -> (s32[], bf16[8,1024]) {
  %p = (s32[], bf16[8,1024]) parameter(0)
  %k = bf16[1,1024]{1,0} custom-call(), custom_call_target="tpu_custom_call", backend_config={"a":{
}}, metadata={op_name="splash"}
  %ag = bf16[8,1024]{1,0} all-gather(bf16[1,1024]{1,0} %x), replica_groups=[1,8]<=[8], dimensions={0}
  %rs = bf16[1,1024]{1,0} reduce-scatter(bf16[8,1024]{1,0} %g), replica_groups=mesh['data'=2,'fsdp'=8] {'fsdp'}, to_apply=%add
  %rsf = bf16[2,1024]{1,0} fusion(%g2), kind=kCustom, calls=%all-reduce-scatter.3
  ROOT %t = (s32[], bf16[8,1024]) tuple(%i, %ag)
}

%all-reduce-scatter.3 (input: bf16[16,1024]) -> bf16[2,1024] {
  %input = bf16[16,1024]{1,0} parameter(0)
  %all-reduce.9 = bf16[16,1024]{1,0} all-reduce(%input), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %ds = bf16[2,1024]{1,0} dynamic-slice(%all-reduce.9, %o, %z), dynamic_slice_sizes={2,1024}
}

%cond (p: (s32[], bf16[8,1024])) -> pred[] {
  %p = (s32[], bf16[8,1024]) parameter(0)
  %c = s32[] constant(40)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main.1_spmd (x: f32[256]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  %ar-start = (f32[256]{0}, f32[256]{0}) all-reduce-start(f32[256]{0} %x), replica_groups={{0,1,2,3}}, to_apply=%add
  %w = (s32[], bf16[8,1024]) while(%t0), condition=%cond, body=%body
  %big = (f32[2]{0}, f32[2]{0}, f32[2]{0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}) all-reduce(%a, %b, %c, %d, %e, %f), replica_groups=mesh['data'=2,'fsdp'=4] {'data','fsdp'}, to_apply=%add
  ROOT %r = f32[256]{0} copy(%x)
}
"""


def test_collective_stats_count_loop_trips_and_wire_bytes():
    s = collectives.collective_stats(MODULE)
    ag, rs, ar = s["all-gather"], s["reduce-scatter"], s["all-reduce"]
    # As written: each op once; the 6-operand all-reduce is found despite its /*index=5*/, the
    # all-reduce inside the reduce-scatter fusion is not an all-reduce.
    assert (ag["count"], rs["count"], ar["count"]) == (1, 2, 2)
    assert ar["bytes"] == 256 * 4 + 6 * 2 * 4 and ar["async"] == 1
    assert rs["bytes"] == 1024 * 2 + 2 * 1024 * 2
    # Per step: the loop body 40 times (the condition's trip count), the rest once.
    assert (ag["per_step_count"], ag["per_step_bytes"]) == (40, 40 * 8 * 1024 * 2)
    assert (rs["per_step_count"], rs["per_step_bytes"]) == (80, 40 * (1024 + 2 * 1024) * 2)
    assert ar["per_step_count"] == 2
    # Bytes each chip sends over a ring of n: all-gather (n-1)/n of its result, reduce-scatter
    # (n-1) shards, all-reduce 2 (n-1)/n (groups of 8, 8 and 8, then 4 and 8).
    assert ag["wire_bytes"] == 40 * 8 * 1024 * 2 * 7 // 8
    assert rs["wire_bytes"] == 40 * (1024 + 2 * 1024) * 2 * 7
    assert ar["wire_bytes"] == int(256 * 4 * 2 * 3 / 4 + 6 * 2 * 4 * 2 * 7 / 8)


def test_step_estimate_is_a_roofline_of_compute_and_collectives():
    topo = aot.parse_topology("v5p-256")
    assert topo.ici_bytes_per_s == 4800e9 / 8
    coll = {c: {"wire_bytes": 0, "async_wire_bytes": 0} for c in collectives.COLLECTIVES}
    coll["all-gather"]["wire_bytes"] = 600e9  # 1 s of ICI, not issued asynchronously
    flops = 128 * topo.peak_flops * 3.0  # 3 s at peak, 4 s with the recomputed forward
    e = aot.step_estimate(flops, coll, topo, 128, "full")
    assert e["compute_s"] == pytest.approx(4.0) and e["collective_s"] == pytest.approx(1.0)
    assert e["step_s"] == pytest.approx(5.0) and e["step_s_full_overlap"] == pytest.approx(4.0)
    assert e["mfu"] == pytest.approx(0.6) and e["mfu_full_overlap"] == pytest.approx(0.75)
    coll["all-to-all"].update(wire_bytes=1200e9, async_wire_bytes=1200e9)  # 2 s, hidden under compute
    e = aot.step_estimate(flops, coll, topo, 128, "full")
    assert e["step_s"] == pytest.approx(5.0) and e["step_s_full_overlap"] == pytest.approx(4.0)
    coll["all-gather"]["wire_bytes"] = 6000e9  # collectives dominate: max(3, 2) + 10 s; 12 s if all hidden
    e = aot.step_estimate(flops, coll, topo, 128, "none")
    assert e["mfu"] == pytest.approx(3 / 13) and e["mfu_full_overlap"] == pytest.approx(0.25)


def test_compile_time_oom_is_read_as_a_planner_result():
    a = "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory " \
        "required for HLO temporaries (102.18G) exceeds available HBM (95.73G)."
    b = "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of " \
        "memory in memory space hbm. Used 95.84G of 95.73G hbm. Exceeded hbm capacity by 112.64M."
    assert aot._oom_bytes(a) == int(102.18 * 2**30) and aot._oom_bytes(b) == int(95.84 * 2**30)
    assert aot._oom_bytes("INTERNAL: something else") is None


def test_aot_compile_cli_on_a_v5p_topology(tmp_path):
    """The real train step and sampler step of the Wan 14B config's tiny variant with the
    wan14b_v5p256 preset's parallelism (all-to-all context parallelism around the splash kernel,
    full remat, scanned layers), compiled for a v5p-16 slice (8 chips) with data x fsdp x context
    sharding. (The preset's own runlocal, on the tiny converted checkpoint, takes XLA:TPU over 2
    minutes to compile here, for no more coverage; tests/test_pods.py trains it on CPU.)"""
    out = tmp_path / "plan.json"
    r = run_cli(["scripts/aot_compile.py", "--config", "configs/wan2_1_t2v_14b.py:runlocal",
                 "--topology", "v5p-16", "--mesh", "data=2,fsdp=2,context=2,tensor=1",
                 "--global-batch", "8", "--out", str(out),
                 "--config.dit.overrides={'context_parallel': 'all_to_all', 'scan_layers': True, "
                 "'remat': 'full', 'attention': 'splash'}"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "falling back" not in r.stderr  # the mesh's TPU devices select the Pallas splash kernel
    plan = json.loads(out.read_text())
    assert plan == json.loads(r.stdout)
    assert plan["topology"]["chips"] == 8 and plan["mesh"] == {"data": 2, "fsdp": 2, "context": 2, "tensor": 1}
    ts = plan["train_step"]
    assert ts["fits"] and 0 < ts["per_chip"]["total_bytes"] < ts["hbm_bytes"]
    assert ts["hbm_bytes"] == 95 * 2**30
    assert ts["xla_flops_per_step"] > 0 and ts["model_flops_per_step"] > 0
    assert ts["collectives"]["all-to-all"]["count"] > 0  # context-parallel attention
    assert ts["collectives"]["all-reduce"]["count"] + ts["collectives"]["reduce-scatter"]["count"] > 0
    est = ts["estimate"]  # the roofline: compute at peak against collective bytes at ICI speed
    assert est["compute_s"] > 0 and est["collective_s"] > 0 and 0 < est["mfu"] <= est["mfu_full_overlap"] <= 1
    assert plan["sampler_step"]["fits"]


def test_aot_compile_plans_the_whole_sampler(tmp_path):
    """--sample: the program `sorajax.sample` runs (text encoding, the CFG denoising loop, the
    row-sharded VAE decode) of the Wan 14B config's tiny variant on a v5p-8 slice (4 chips): the
    CFG batch over data 2, tokens and VAE rows over context 2, the all-to-all around splash -- as
    configs/pods/wan14b_sample.py at 81 x 720 x 1280 (docs/SCALING.md)."""
    out = tmp_path / "plan.json"
    argv = ["scripts/aot_compile.py", "--config", "configs/wan2_1_t2v_14b.py:runlocal", "--sample",
            "--steps", "2", "--topology", "v5p-8", "--mesh", "data=1,fsdp=1,context=4,tensor=1",
            "--out", str(out), "--config.dit.overrides={'context_parallel': 'all_to_all', 'attention': 'splash'}"]
    r = run_cli(argv)  # the tiny DiT's 2 heads cannot be spread over 4 context devices
    assert r.returncode == 2 and "heads must divide by 4" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    argv[argv.index("--mesh") + 1] = "data=2,fsdp=1,context=2,tensor=1"
    r = run_cli(argv, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(out.read_text())
    s = plan["sample"]
    assert plan["topology"]["chips"] == 4 and plan["config"]["steps"] == 2
    assert s["fits"] and 0 < s["per_chip"]["total_bytes"] < s["hbm_bytes"]
    assert s["dit_flops"] > 0 and s["vae_decode_flops"] > 0
    # Context-parallel attention in the loop, halo exchanges of the row-sharded VAE.
    assert s["collectives"]["all-to-all"]["count"] > 0 and s["collectives"]["collective-permute"]["count"] > 0
    r = run_cli(["scripts/aot_compile.py", "--config", "configs/wan2_1_t2v_14b.py:runlocal", "--sample",
                 "--search", "--topology", "v5p-8"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --sample and --search")


def test_aot_compile_plans_a_packed_native_shape_step(tmp_path):
    """dit_train.packing='pack' (as configs/pods/wan14b_native_v5p256.py at scale): the planner
    compiles the packed step -- rows of one token budget, sized from every clip shape of the
    native settings (3 aspect ratios x 2 durations + images) -- with all-to-all context
    parallelism around the splash kernel, which masks by segment id."""
    out = tmp_path / "plan.json"
    r = run_cli(["scripts/aot_compile.py", "--config", "configs/wan2_1_t2v_14b.py:runlocal",
                 "--topology", "v5p-16", "--mesh", "data=2,fsdp=2,context=2,tensor=1", "--global-batch", "8",
                 "--no-sampler", "--out", str(out),
                 "--config.dit.overrides={'context_parallel': 'all_to_all', 'scan_layers': True, "
                 "'remat': 'full', 'attention': 'splash'}", "--config.dit_train.packing=pack",
                 "--config.data.aspect_ratios=(1.0, 1.5, 0.667)", "--config.data.durations=(9, 13)",
                 "--config.data.image_share=0.2", "--config.data.height=32", "--config.data.width=48",
                 "--config.vae.precompute_latents=True"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(out.read_text())
    pk = plan["config"]["packing"]
    assert pk["rows"] == 8 and pk["clips_per_row"] == 8 and len(pk["clip_shapes"]) == 9
    assert pk["tokens_per_row"] == max(c["tokens"] for c in pk["clip_shapes"]) == 24  # 13 x 32 x 48
    assert {c["frames"] for c in pk["clip_shapes"]} == {1, 9, 13}
    ts = plan["train_step"]
    assert ts["fits"] and ts["collectives"]["all-to-all"]["count"] > 0 and ts["model_flops_per_step"] > 0
    # A budget the context-parallel devices cannot split is one line, exit 2.
    r = run_cli(["scripts/aot_compile.py", "--config", "configs/wan2_1_t2v_14b.py:runlocal",
                 "--topology", "v5p-16", "--mesh", "data=2,fsdp=2,context=2,tensor=1", "--global-batch", "8",
                 "--no-sampler", "--config.dit_train.packing=pack", "--config.dit_train.pack_tokens=25",
                 "--config.vae.precompute_latents=True"])
    assert r.returncode == 2 and "pack_tokens=25: must be a multiple of 2" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_aot_compile_bad_input_is_one_line(tmp_path, wan_ckpt):
    r = run_cli(["scripts/aot_compile.py", "--config", "configs/toy.py", "--topology", "v9z-8"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --topology")
    r = run_cli(["scripts/aot_compile.py", "--config", f"configs/pods/wan14b_v5p256.py:runlocal:{wan_ckpt}",
                 "--topology", "v5p-16", "--mesh", "fsdp=3"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
