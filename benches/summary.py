#!/usr/bin/env python3
"""Prints the benchmark table from criterion's output and the benches' own result files.

Run after `cargo bench`:  python3 benches/summary.py [target-dir]
Every Firebrand figure is set against a baseline measured in the same run.
"""
import json
import os
import sys

target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target")
criterion = os.path.join(target, "criterion")
extra = os.path.join(target, "firebrand-bench")


def estimate(*path):
    """Mean time of one iteration in seconds, and its throughput unit count."""
    base = os.path.join(criterion, *path)
    try:
        with open(os.path.join(base, "new", "estimates.json")) as f:
            mean = json.load(f)["mean"]["point_estimate"] / 1e9
        with open(os.path.join(base, "new", "benchmark.json")) as f:
            throughput = json.load(f).get("throughput") or {}
    except FileNotFoundError:
        return None, None
    units = throughput.get("Elements") or throughput.get("Bytes") or throughput.get("BytesDecimal")
    return mean, units


def load(name):
    try:
        with open(os.path.join(extra, name + ".json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


rows = []


def row(benchmark, firebrand, baseline, ratio, target, ok):
    verdict = "n/a" if ok is None else ("meets" if ok else "MISSES")
    rows.append((benchmark, firebrand, baseline, ratio, target, verdict))


latency = load("latency")
if latency:
    fb, qa, tcp = latency["firebrand"], latency["baseline_quic"], latency["baseline_tcp"]
    grpc = latency.get("baseline_grpc")
    r = fb["p50_us"] / qa["p50_us"]
    row("warm call p50", f'{fb["p50_us"]:.1f} µs', f'A {qa["p50_us"]:.1f} µs, B {tcp["p50_us"]:.1f} µs',
        f"{r:.2f}× A", "≤ 1.0× A", r <= 1.0)
    r = fb["p99_us"] / qa["p99_us"]
    row("warm call p99", f'{fb["p99_us"]:.1f} µs', f'A {qa["p99_us"]:.1f} µs, B {tcp["p99_us"]:.1f} µs',
        f'{r:.2f}× A', "≤ 1.5× A", r <= 1.5)
    if grpc:
        for q in ("p50", "p99"):
            r = fb[q + "_us"] / grpc[q + "_us"]
            row(f"warm call {q} against gRPC", f'{fb[q + "_us"]:.1f} µs', f'tonic {grpc[q + "_us"]:.1f} µs',
                f"{r:.2f}× tonic", "≤ 1.0× tonic", r <= 1.0)

TARGETS = {64: 1.0, 256: 0.9}
for k in (1, 8, 64, 256):
    base, units = estimate("throughput", "baseline_quic", str(k))
    if base is None:
        continue
    base_rate = units / base
    grpc, grpc_units = estimate("throughput", "baseline_grpc", str(k))
    for runners in (1, 4):
        t, u = estimate("throughput", f"firebrand_{runners}_runners", str(k))
        if t is None:
            continue
        rate = u / t
        r = rate / base_rate
        target = TARGETS.get(k)
        row(f"throughput, {k} in flight, {runners} runner{'s' if runners > 1 else ''}",
            f"{rate:,.0f} calls/s", f"A {base_rate:,.0f} calls/s", f"{r:.2f}× A",
            f"≥ {target}× A" if target else "", (r >= target) if target else None)
        if grpc and runners == 1:
            g = rate / (grpc_units / grpc)
            row(f"throughput, {k} in flight, against gRPC", f"{rate:,.0f} calls/s",
                f"tonic {grpc_units / grpc:,.0f} calls/s", f"{g:.2f}× tonic", "≥ 1.0× tonic", g >= 1.0)

raw, raw_units = estimate("throughput", "raw_client_firebrand_runner", "64")
base64, base64_units = estimate("throughput", "baseline_quic", "64")
if raw and base64:
    r = (raw_units / raw) / (base64_units / base64)
    row("diagnostic: runner alone, 64 in flight", f"{raw_units / raw:,.0f} calls/s", "A", f"{r:.2f}× A",
        "", None)

cpu = load("cpu")
if cpu:
    fb, qa = cpu["firebrand"], cpu["baseline_quic"]
    row("CPU per call, parent (calling thread)", f'{fb["parent_us"]:.1f} µs ({fb["calling_thread_us"]:.1f})',
        f'A {qa["parent_us"]:.1f} µs ({qa["calling_thread_us"]:.1f})', f'{fb["parent_us"] / qa["parent_us"]:.2f}× A',
        "", None)
    row("CPU per call, runner / echo peer", f'{fb["child_us"]:.1f} µs', f'A {qa["child_us"]:.1f} µs',
        f'{fb["child_us"] / qa["child_us"]:.2f}× A', "", None)

wakeups = load("wakeups")
if wakeups:
    fb, qa = wakeups["firebrand"], wakeups["baseline_quic"]
    grpc = wakeups.get("baseline_grpc")
    row("wake-ups per warm call, parent / runner", f'{fb["parent"]:.2f} / {fb["peer"]:.2f}',
        f'A {qa["parent"]:.2f} / {qa["peer"]:.2f}' + (f', tonic {grpc["parent"]:.2f} / {grpc["peer"]:.2f}' if grpc else ""),
        "", "", None)

busy = load("busy")
if busy:
    row(f'warm call p50, all {busy["cores"]} runner cores busy (register_blocking)', f'{busy["busy_p50_us"]:.1f} µs',
        f'idle runner {busy["idle_p50_us"]:.1f} µs', f'{busy["ratio"]:.2f}× idle', "≤ 3× idle", busy["ratio"] <= 3)

logging = load("logging")
if logging:
    row("warm call p50 while the runner logs 5 million lines", f'{logging["logging_p50_us"]:.1f} µs',
        f'idle runner {logging["idle_p50_us"]:.1f} µs', f'{logging["ratio"]:.2f}× idle', "", None)

for mib in (1, 16, 64):
    base, units = estimate("payload", "baseline_quic", str(mib))
    t, u = estimate("payload", "firebrand", str(mib))
    if base is None or t is None:
        continue
    rate, base_rate = u / t / 1e6, units / base / 1e6
    r = rate / base_rate
    row(f"payload echo, {mib} MiB", f"{rate:,.0f} MB/s", f"A {base_rate:,.0f} MB/s", f"{r:.2f}× A",
        "≥ 0.7× A" if mib == 64 else "", (r >= 0.7) if mib == 64 else None)
    grpc, grpc_units = estimate("payload", "baseline_grpc", str(mib))
    if grpc:
        g = rate / (grpc_units / grpc / 1e6)
        row(f"payload echo, {mib} MiB, against gRPC", f"{rate:,.0f} MB/s",
            f"tonic {grpc_units / grpc / 1e6:,.0f} MB/s", f"{g:.2f}× tonic", "≥ 1.0× tonic", g >= 1.0)

floor, _ = estimate("cold_start", "process_floor")
for suffix, how in [("", "exec per runner"), ("_forked", "fork server")]:
    first, _ = estimate("cold_start", "first_result" + suffix)
    if floor and first:
        extra_ms = (first - floor) * 1e3
        row(f"cold start to first result ({how})", f"{first * 1e3:.1f} ms", f"process start {floor * 1e3:.1f} ms",
            f"floor + {extra_ms:.1f} ms", "≤ floor + 15 ms", extra_ms <= 15)
    one, _ = estimate("cold_start", "1_ready" + suffix)
    eight, _ = estimate("cold_start", "8_ready" + suffix)
    if one and eight:
        r = eight / one
        row(f"8 runners ready at once ({how})", f"{eight * 1e3:.1f} ms", f"1 runner {one * 1e3:.1f} ms",
            f"{r:.2f}× one", "≤ 2× one", r <= 2)

queued, _ = estimate("queueing", "10k_calls_4x8")
memory = load("memory")
if queued:
    row("10,000 queued calls, max 4 × 8", f"{queued:.2f} s total", "", f"{10_000 / queued:,.0f} calls/s", "", None)
if memory:
    q, idle = memory["queueing"], memory["idle"]
    row("10,000 queued calls: parent peak RSS growth", f'{q["peak_growth_mib"]:.1f} MiB',
        f'second round {q.get("second_round_peak_growth_mib", 0):.1f} MiB', "", "≤ 50 MiB",
        q["peak_growth_mib"] <= 50)
    row("parent RSS per idle runner", f'{idle["per_runner_kib"]:.0f} KiB', f'{idle["runners"]} runners', "",
        "≤ 1 MiB", idle["per_runner_kib"] <= 1024)

for placement in ("spread", "pack"):
    one, _ = estimate("placement_grant", placement, "1")
    for runners in (100, 10_000):
        t, _ = estimate("placement_grant", placement, str(runners))
        if one and t:
            r = t / one
            row(f"placement alone: a grant at {runners:,} runners ({placement})", f"{t * 1e9:.0f} ns",
                f"1 runner {one * 1e9:.0f} ns", f"{r:.2f}× one", "≤ 2× one" if runners == 10_000 else "",
                (r <= 2) if runners == 10_000 else None)
one, _ = estimate("placement_handoff", "1")
many, _ = estimate("placement_handoff", "100000")
if one and many:
    row("placement alone: a freed slot handed to the oldest of 100,000 waiters", f"{many * 1e9:.0f} ns",
        f"1 waiter {one * 1e9:.0f} ns", f"{many / one:.2f}× one", "", None)
one, _ = estimate("placement_handoff", "stats", "1")
many, _ = estimate("placement_handoff", "stats", "100000")
if one and many:
    row("placement alone: stats() with 10,000 runners, 100,000 waiters", f"{many * 1e9:.1f} ns",
        f"1 waiter {one * 1e9:.1f} ns", f"{many / one:.2f}× one", "", None)

warm = load("warm")
if warm:
    resume = warm["latency_ms"]["resume"]
    create1 = warm["create_1"]["all_ms"]
    for name, how in [("suspend", "a suspended"), ("stop", "a stopped")]:
        one, eight = warm[f"{name}_1"]["all_ms"], warm[f"{name}_8"]["all_ms"]
        if name == "suspend":
            row(f"Fly fake: first result from {how} machine", f"{one:.0f} ms", f"resume latency {resume:.0f} ms",
                f"resume + {one - resume:.0f} ms", "≤ resume + 50 ms", one - resume <= 50)
        row(f"Fly fake: first result from {how} machine vs a create", f"{one:.0f} ms", f"create {create1:.0f} ms",
            f"{create1 / one:.1f}× faster", "≥ 5× faster" if name == "suspend" else "",
            (create1 / one >= 5) if name == "suspend" else None)
        row(f"Fly fake: 8 claims at once ({name})", f"{eight:.0f} ms", f"1 claim {one:.0f} ms", f"{eight / one:.2f}× one",
            "≤ 1.5× one" if name == "suspend" else "", (eight / one <= 1.5) if name == "suspend" else None)
    row("Fly fake: 8 creates at once (paced 1/s, bursts of 3)", f'{warm["create_8"]["all_ms"]:.0f} ms',
        f"1 create {create1:.0f} ms", f'{warm["create_8"]["all_ms"] / create1:.2f}× one', "", None)

kubernetes = load("kubernetes")
if kubernetes:
    for runners in [1, 8]:
        case = kubernetes[f"cold_{runners}"]
        pods, local = case["kubernetes_ms"], case["local_ms"]
        row(f"Kubernetes fake: cold boot, {runners} at once, to every call running", f"{pods:.0f} ms",
            f"local process {local:.0f} ms", f"local + {pods - local:.0f} ms", "", None)
    for runners in [1, 8]:
        case = kubernetes.get(f"cold_{runners}_control_plane")
        if case is None:
            continue
        pods, local = case["kubernetes_ms"], case["local_ms"]
        row(f"Kubernetes control plane: cold boot, {runners} at once, to every call running", f"{pods:.0f} ms",
            f"local process {local:.0f} ms", f"local + {pods - local:.0f} ms", "", None)

for value in ("head", "string_1k", "vec_u8_64k", "bytes_1m", "u64s_10k"):
    ours, _ = estimate("decode", "firebrand", value)
    theirs, _ = estimate("decode", "bincode", value)
    if ours and theirs:
        unit, scale = ("µs", 1e6) if theirs > 1e-6 else ("ns", 1e9)
        row(f"decode {value}: the bounded decoder vs bincode's", f"{ours * scale:.1f} {unit}",
            f"bincode {theirs * scale:.1f} {unit}", f"{ours / theirs:.2f}× bincode", "", None)

if not rows:
    sys.exit(f"no results under {target}: run `cargo bench` first")
header = ("benchmark", "Firebrand", "baseline", "ratio", "target", "verdict")
print("| " + " | ".join(header) + " |")
print("|" + "---|" * len(header))
for r in rows:
    print("| " + " | ".join(r) + " |")
