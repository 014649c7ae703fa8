"""Collectives of a compiled XLA program, read from its HLO text: what each chip sends, per op
type, as written and per step (loop bodies times their trip counts). Used by the AOT planner
(sorajax/aot.py, docs/SCALING.md) on the per-chip programs XLA:TPU compiles."""
from __future__ import annotations

import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
                "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
_OP = re.compile(r"=\s*(\([^=]*?\)|[a-z0-9]+\[[^\]]*\][^ ]*)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")  # XLA marks every 5th tuple element so; dropped
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_RS_FUSION = re.compile(r"=\s*(\([^=]*?\)|[a-z0-9]+\[[^\]]*\][^ ]*)\s+fusion\(.*\bcalls=%?(all-reduce-scatter[\w.\-]*)")
_CALL = re.compile(r"\b(condition|body|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_INT_CONST = re.compile(r"[su](?:32|64)\[\]\S*\s+constant\((\d+)\)")


def _op_bytes(shapes: str, is_async: bool) -> int:
    nbytes = 0
    for dt, dims in _SHAPE.findall(shapes):
        if dt in _DTYPE_BYTES:
            nbytes += _DTYPE_BYTES[dt] * math.prod(int(x) for x in dims.split(",") if x)
    if is_async and shapes.startswith("("):  # an async *-start's tuple: (operand, result)
        nbytes //= 2
    return nbytes


def _group_size(line: str) -> int:
    """Devices in one replica group of a collective (1 when the line does not say)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:  # mesh['data'=1,'fsdp'=8,...] {'fsdp'}: the product of the named axes
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", m.group(2)))
    m = re.search(r"replica_groups=\[\d+,(\d+)\]<=", line)  # iota form [groups,size]<=[n]
    if m:
        return int(m.group(1))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    return 2 if "source_target_pairs" in line else 1


def _wire_bytes(op: str, result_bytes: int, n: int) -> float:
    """Bytes one chip sends for a collective with this result size over a group of n (ring
    algorithms): all-gather and all-to-all (n-1)/n of the result, reduce-scatter (n-1) x its
    shard, all-reduce twice (n-1)/n (a reduce-scatter then an all-gather), a permute its buffer."""
    if n <= 1:
        return 0.0
    return {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n, "reduce-scatter": n - 1.0,
            "all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}[op] * result_bytes


def _computations(hlo_text: str):
    """{name: [instruction lines]} and the ENTRY computation's name."""
    comps, entry, cur = {}, None, None
    for line in hlo_text.splitlines():
        head = _HEADER.match(line)
        if head and cur is None:
            cur = comps.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
        elif line.rstrip() == "}":
            cur = None
        elif cur is not None:  # an instruction, or a continuation line of one (a kernel's config)
            cur.append(line)
    return comps, entry


def collective_stats(hlo_text: str) -> dict:
    """Collectives of a compiled (per-chip) HLO module: for each op, `count` and `bytes` (result
    bytes per chip) as written in the program -- a while loop's body once -- and `per_step_count`,
    `per_step_bytes` and `wire_bytes` (bytes each chip sends, _wire_bytes) with every while
    body multiplied by its trip count (XLA's known_trip_count, else the largest integer constant
    of its condition: a scan over layers runs its body once per layer), and `async` /
    `async_wire_bytes`, the ops issued as *-start/*-done pairs, which XLA's scheduler can overlap
    with compute (per step, their wire bytes).

    XLA:TPU writes a reduce-scatter as a fusion calling an `all-reduce-scatter` computation (an
    all-reduce of the full buffer followed by this chip's slice, run as one reduce-scatter): such
    a fusion counts as one reduce-scatter whose result is the fusion's (sliced) output."""
    text = _INDEX_COMMENT.sub("", hlo_text)
    comps, entry = _computations(text)
    keys = ("count", "bytes", "per_step_count", "per_step_bytes", "wire_bytes", "async", "async_wire_bytes")
    out = {c: dict.fromkeys(keys, 0) for c in COLLECTIVES}
    if entry is None:  # a bare list of instructions (tests): one computation
        comps, entry = {"main": text.splitlines()}, "main"
    rs_comps = {n for n in comps if n.startswith("all-reduce-scatter")}

    def op_of(line: str):
        """(op, result bytes, group size, async) of a collective instruction, else None."""
        m = _RS_FUSION.search(line)
        if m and m.group(2) in rs_comps:
            inner = next((x for x in comps[m.group(2)] if _OP.search(x)), "")
            return "reduce-scatter", _op_bytes(m.group(1), False), _group_size(inner), False
        m = _OP.search(line)
        if m:
            return m.group(2), _op_bytes(m.group(1), bool(m.group(3))), _group_size(line), bool(m.group(3))
        return None

    def trip(cond: str, line: str) -> int:
        m = _TRIP.search(line)
        if m:
            return int(m.group(1))
        consts = [int(c) for c in _INT_CONST.findall("\n".join(comps.get(cond, [])))]
        return max(consts) if consts else 1

    memo = {}

    def per_call(name: str, depth: int = 0) -> dict:  # per-step totals of one call of `name`
        if name in memo:
            return memo[name]
        acc = {c: [0, 0.0, 0.0, 0.0] for c in COLLECTIVES}  # count, result, wire, async wire bytes
        for line in comps.get(name, []) if depth < 64 else []:
            op = op_of(line)
            if op:
                a = acc[op[0]]
                wire = _wire_bytes(op[0], op[1], op[2])
                a[0] += 1
                a[1] += op[1]
                a[2] += wire
                a[3] += wire if op[3] else 0.0
                continue
            calls = dict(_CALL.findall(line))
            subs = []
            if "body" in calls:
                subs.append((calls["body"], trip(calls.get("condition", ""), line)))
            elif "calls" in calls:
                subs.append((calls["calls"], 1))
            br = _BRANCHES.search(line)
            if br:  # a conditional runs one branch: count the costliest
                names = [x.strip().lstrip("%") for x in br.group(1).split(",") if x.strip()]
                costs = [per_call(n, depth + 1) for n in names]
                if costs:
                    best = max(costs, key=lambda c: sum(v[2] for v in c.values()))
                    for c in COLLECTIVES:
                        acc[c] = [x + y for x, y in zip(acc[c], best[c])]
            for sub, k in subs:
                sc = per_call(sub, depth + 1)
                for c in COLLECTIVES:
                    acc[c] = [x + k * y for x, y in zip(acc[c], sc[c])]
        memo[name] = acc
        return acc

    for name, lines in comps.items():  # as written: every instruction once
        if name in rs_comps:  # counted at the fusion that calls it
            continue
        for line in lines:
            op = op_of(line)
            if op:
                o = out[op[0]]
                o["count"] += 1
                o["bytes"] += op[1]
                o["async"] += int(op[3])
    total = per_call(entry)
    for c in COLLECTIVES:
        for k, v in zip(("per_step_count", "per_step_bytes", "wire_bytes", "async_wire_bytes"), total[c]):
            out[c][k] = int(v)
    return out
