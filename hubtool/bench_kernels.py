"""Benchmark of the int4 kernels against dense matmuls and torch's int4 built-ins (``hubtool bench kernels``).

Shapes are (N, K) = (out_features, in_features): (4096, 4096) is a square projection, (11008, 4096) a
Llama-7B up/gate projection and (4096, 11008) its down projection. For each shape and M the benchmark
times, on the CPU: bf16 matmul, fp32 matmul, torch's ``_weight_int4pack_mm_for_cpu`` (bf16) and hubtool's
kernel with bf16, fp16 and fp32 activations. Every variant cycles through enough copies of its weight to
span 10x the last-level cache, so each call streams its weight from DRAM; a variant's time is the best,
single call over several passes through the rotation (every call is cache-cold; the minimum rejects time
slices lost to other processes on a shared machine and is applied alike to every variant). The DRAM read bandwidth (a large fp32 sum) is measured in
the same run, interleaved with the M=1 calls (fastest cache-cold 8 MiB read by a torch sum or hubtool's
streaming read), and put next to the M=1 figures. On CUDA the GPU path is timed too, each rotation captured
in a CUDA graph: cuBLAS bf16, torch's ``_weight_int4pack_mm`` and hubtool's Triton kernels.

``run_head`` (``python -m hubtool.bench_kernels head``) times the 16-bit lm_head of an int4 model: hubtool's
small-M dense kernel against torch's bf16 matmul on the heads of Gemma 3 270M (262144 x 640) and
Llama-3.2-3B (128256 x 3072), as the weight's bytes over the time, next to the DRAM read bandwidth measured
in the same run over the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096), (4096, 11008))
MS: tuple[int, ...] = (1, 8, 32)
GROUP = 128
TARGETS = {"m1_vs_torch_int4": 1.15, "m8_vs_bf16": 2.5, "m32_vs_bf16": 1.0}


def llc_bytes() -> int:
    """Size of the CPU's last-level cache (32 MiB if it cannot be read)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 * 1024**2


ROTATION_X_LLC = 10  # a rotation of weight copies spans this many last-level caches


def _copies(nbytes: int, cache: int) -> int:
    """How many copies of a weight of nbytes make a rotation of ROTATION_X_LLC caches.

    Three caches' worth is not enough on Zen 4: its L3 keeps part of a streamed working set across passes
    (measured here: 100 MB rotations read at 1.5x the DRAM bandwidth).
    """
    return max(2, math.ceil(ROTATION_X_LLC * cache / max(nbytes, 1)))


def time_rotation(fns: Sequence[Callable[[], object]], rounds: int = 5, min_s: float = 0.05) -> float:
    """Seconds per call: the fastest single call over several passes through the rotation fns."""
    return time_interleaved({"only": fns}, rounds, min_s, calls_per_pass=len(fns))["only"]


def time_interleaved(
    variants: dict[str, Sequence[Callable[[], object]]],
    passes: int = 5,
    min_s: float = 0.0,
    calls_per_pass: int = 8,
) -> dict[str, float]:
    """Seconds per call of each variant: its fastest single call, the variants interleaved pass by pass.

    Each variant's calls walk round-robin through its rotation of weight copies, so every timed call
    streams its weight from memory. Interleaving spreads interference from other processes evenly over
    the variants, and the fastest call rejects the time slices it steals; both apply alike to all.
    """
    pos = dict.fromkeys(variants, 0)
    best = dict.fromkeys(variants, math.inf)
    for fns in variants.values():
        for f in fns:
            f()
    start = time.perf_counter()
    done = 0
    while done < passes or time.perf_counter() - start < min_s:
        for name, fns in variants.items():
            for _ in range(min(calls_per_pass, len(fns))):
                f = fns[pos[name] % len(fns)]
                pos[name] += 1
                t = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t)
        done += 1
    return best


SLICE_BYTES = 8 * 1024**2


def dram_probes(cache: int, slice_bytes: int = SLICE_BYTES) -> dict[str, list[Callable[[], object]]]:
    """Read probes over cache-cold 8 MiB slices of a buffer of ROTATION_X_LLC caches: a torch fp32 sum and
    hubtool's streaming read (all threads)."""
    from .kernels import cpu

    n_slices = max(2, math.ceil(ROTATION_X_LLC * cache / slice_bytes))
    slices = list(torch.ones(n_slices * slice_bytes // 4).view(n_slices, -1))
    probes: dict[str, list[Callable[[], object]]] = {"dram_sum": [lambda s=s: s.sum() for s in slices]}
    if cpu.load():
        probes["dram_read"] = [lambda s=s.view(torch.uint8): torch.ops.hubtool.mem_read(s) for s in slices]
    return probes


def dram_bandwidth_gbps(cache: int | None = None, passes: int = 5) -> float:
    """Main-memory read bandwidth in GB/s, measured like the kernels: the fastest cache-cold 8 MiB read."""
    best = time_interleaved(dram_probes(cache or llc_bytes()), passes)
    return SLICE_BYTES / min(best.values()) / 1e9


def _random_int4(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes (N, K), signed scales (N, K/G) and symmetric zeros."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.randn(n, k // GROUP, generator=g) * 0.01).to(torch.float16).float()
    zero = torch.full((n, k // GROUP), 8, dtype=torch.uint8)
    return q, scale, zero


def _torch_int4_cpu(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU int4 layout for codes q and symmetric scales (same math as the ``torch`` backend)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).contiguous().to(torch.bfloat16)
    return packed, sz


def bench_cpu_shape(
    n: int,
    k: int,
    ms: Sequence[int],
    cache: int,
    rounds: int = 5,
    min_s: float = 0.05,
    probes: dict[str, list[Callable[[], object]]] | None = None,
) -> list[dict]:
    """Times (ms per call) of every CPU variant at each M for one (N, K); DRAM probes ride along at M=1."""
    from .kernels import cpu

    have_ours = cpu.load()
    q, scale, zero = _random_int4(n, k, seed=n + k)
    c16 = _copies(n * k * 2, cache)
    c32 = _copies(n * k * 4, cache)
    c4 = _copies(n * k // 2, cache)
    w16 = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(c16)]
    w32 = [torch.randn(n, k) for _ in range(c32)]
    t4 = [_torch_int4_cpu(q, scale) for _ in range(c4)]
    ours = [cpu.repack(q, scale, zero, GROUP) for _ in range(c4)] if have_ours else []
    ours_bytes = (ours[0].packed.numel() + ours[0].scales.numel() * 2) if have_ours else 0
    rows = []
    for m in ms:
        xb = torch.randn(m, k, dtype=torch.bfloat16)
        xh, xf = xb.to(torch.float16), xb.float()
        variants: dict[str, list[Callable[[], object]]] = {
            "bf16_matmul": [lambda w=w, x=xb: F.linear(x, w) for w in w16],
            "fp32_matmul": [lambda w=w, x=xf: F.linear(x, w) for w in w32],
            "torch_int4": [
                lambda p=p, x=xb: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p[0], GROUP, p[1]) for p in t4
            ],
        }
        if have_ours:
            for name, x in (("ours_bf16", xb), ("ours_fp16", xh), ("ours_fp32", xf)):
                variants[name] = [lambda p=p, x=x: cpu.int4_mm(x, p) for p in ours]
            # fp16/fp32 run the int16 path by default; HUBTOOL_CPU_ACT=exact splits them into bf16 hi + lo.
            variants["ours_fp16_exact"] = [lambda p=p, x=xh: cpu.int4_mm(x, p, act="exact") for p in ours]
        if probes and m == ms[0]:
            variants.update(probes)  # the bandwidth is measured under the same conditions as the M=1 calls
        times = time_interleaved(variants, rounds, min_s)
        probe_s = [times.pop(name) for name in list(times) if name.startswith("dram_")]
        times = {key: v * 1e3 for key, v in times.items()}
        row = {"shape": [n, k], "m": m, "times_ms": times, "copies": {"bf16": c16, "fp32": c32, "int4": c4}}
        if probe_s:
            row["dram_read_gbps"] = SLICE_BYTES / min(probe_s) / 1e9
        if have_ours:
            o = times["ours_bf16"]
            row["ratios"] = {
                "vs_bf16": times["bf16_matmul"] / o,
                "vs_fp32": times["fp32_matmul"] / o,
                "vs_torch_int4": times["torch_int4"] / o,
                "fp16_vs_bf16": o / times["ours_fp16"],
                "fp32_vs_bf16": o / times["ours_fp32"],
                "fp16_exact_vs_bf16": o / times["ours_fp16_exact"],
            }
            row["ours_gbps"] = ours_bytes / (o * 1e-3) / 1e9
        row["torch_int4_gbps"] = (n * k // 2 + n * (k // GROUP) * 4) / (times["torch_int4"] * 1e-3) / 1e9
        log.info("cpu %dx%d M=%d %s", n, k, m, {key: round(v, 3) for key, v in times.items()})
        rows.append(row)
    return rows


def _cuda_graph_time(fns: Sequence[Callable[[], object]], replays: int = 20) -> float:
    """Seconds per call of fns captured in one CUDA graph (one rotation), best over replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    best = math.inf
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best / len(fns)


def bench_cuda_shape(n: int, k: int, ms: Sequence[int]) -> list[dict]:
    """Times (ms per call, CUDA graphs) of cuBLAS bf16, torch's int4 kernel and ours on CUDA."""
    from .kernels import gpu
    from .kernels.gpu import triton_int4

    dev = torch.device("cuda")
    cache = torch.cuda.get_device_properties(dev).L2_cache_size or 50 * 1024**2
    q, scale, zero = _random_int4(n, k, seed=n + k)
    c16 = _copies(n * k * 2, cache)
    c4 = _copies(n * k // 2, cache)
    w16 = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) for _ in range(c16)]
    q32 = q.to(torch.int32)
    q_u8 = ((q32[:, ::2] << 4) | q32[:, 1::2]).to(torch.uint8).to(dev)
    t_packed = [torch.ops.aten._convert_weight_to_int4pack(q_u8, 8) for _ in range(c4)]
    sz = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).contiguous().to(dev, torch.bfloat16)
    from .core import packing
    from .core.intweight import IntWeight

    t = packing.pack(IntWeight(q=q, scale=scale, zero=zero, group_size=GROUP))
    ours = [gpu.prepare(t.qweight, zero.t(), t.scales, GROUP, dev) for _ in range(c4)]
    rows = []
    for m in ms:
        xb = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
        times = {
            "bf16_matmul": _cuda_graph_time([lambda w=w, x=xb: F.linear(x, w) for w in w16]),
            "torch_int4": _cuda_graph_time(
                [lambda tp=tp, x=xb: torch.ops.aten._weight_int4pack_mm(x, tp, GROUP, sz) for tp in t_packed]
            ),
            "ours_bf16": _cuda_graph_time([lambda p=p, x=xb: gpu.int4_mm(x, p) for p in ours]),
        }
        xh = xb.half()
        times["ours_fp16"] = _cuda_graph_time([lambda p=p, x=xh: gpu.int4_mm(x, p) for p in ours])
        for path in ("splitk", "tiled", "dequant"):
            times[f"ours_{path}"] = _cuda_graph_time(
                [lambda p=p, path=path, x=xb: gpu.int4_mm(x, p, path) for p in ours]
            )
        times = {key: v * 1e3 for key, v in times.items()}
        o = times["ours_bf16"]
        rows.append(
            {
                "shape": [n, k],
                "m": m,
                "path": ["splitk", "tiled", "dequant"][triton_int4.choose_path(m)],
                "times_ms": times,
                "ratios": {"vs_bf16": times["bf16_matmul"] / o, "vs_torch_int4": times["torch_int4"] / o},
                "ours_gbps": (n * k // 2 + n * (k // GROUP) * 2) / (o * 1e-3) / 1e9,
            }
        )
        log.info("cuda %dx%d M=%d %s", n, k, m, {key: round(v, 4) for key, v in times.items()})
    return rows


def _targets(rows: list[dict]) -> dict:
    """Which CPU targets of issue 4 the measured rows meet (worst case over shapes)."""
    out = {}
    by_m: dict[int, list[dict]] = {}
    for r in rows:
        if "ratios" in r:
            by_m.setdefault(r["m"], []).append(r["ratios"])
    checks = {
        1: ("vs_torch_int4", "m1_vs_torch_int4"),
        8: ("vs_bf16", "m8_vs_bf16"),
        32: ("vs_bf16", "m32_vs_bf16"),
    }
    for m, (ratio, key) in checks.items():
        if m in by_m:
            worst = min(r[ratio] for r in by_m[m])
            out[key] = {"worst": round(worst, 3), "target": TARGETS[key], "met": worst >= TARGETS[key]}
    if by_m:
        for key in ("fp16_vs_bf16", "fp32_vs_bf16"):
            per_m = {m: round(min(r[key] for r in rs), 3) for m, rs in sorted(by_m.items())}
            out[key] = {"worst_by_m": per_m, "target": 0.95, "met": all(v >= 0.95 for v in per_m.values())}
    return out


def run(
    json_path: str | None = None,
    shapes: Sequence[tuple[int, int]] = SHAPES,
    ms: Sequence[int] = MS,
    rounds: int = 8,
    cuda: bool | None = None,
    cpu: bool = True,
    cuda_ms: Sequence[int] | None = None,
    min_s: float = 1.0,
    threads: int | None = None,
) -> dict:
    """Benchmark every (N, K) shape at every M on the CPU (and CUDA if present); optionally write JSON."""
    with num_threads(threads):
        return _run(json_path, shapes, ms, rounds, cuda, cpu, cuda_ms, min_s)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's thread count set to ``threads`` (if given) while in this context, restored after it."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run(json_path, shapes, ms, rounds, cuda, cpu, cuda_ms, min_s) -> dict:
    """run() with the thread count already set."""
    from .runtime.backends import describe_kernels

    cache = llc_bytes()
    result: dict = {
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "llc_bytes": cache,
        "dram_read_gbps": 0.0,
        "shape_convention": "(N, K) = (out_features, in_features)",
        "group_size": GROUP,
        "kernels": describe_kernels(build=True),
        "cpu": [],
    }
    probes = dram_probes(cache) if cpu else None
    for n, k in shapes if cpu else ():
        result["cpu"].extend(bench_cpu_shape(n, k, ms, cache, rounds, min_s, probes))
    probed = [r["dram_read_gbps"] for r in result["cpu"] if "dram_read_gbps" in r]
    if probed or cpu:
        result["dram_read_gbps"] = round(max(probed) if probed else dram_bandwidth_gbps(cache), 2)
        log.info("DRAM read bandwidth %.1f GB/s, LLC %d MiB", result["dram_read_gbps"], cache >> 20)
    else:
        result["dram_read_gbps"] = None
    del probes
    for r in result["cpu"]:
        if r["m"] == 1 and "ours_gbps" in r:
            r["ours_pct_dram"] = round(100 * r["ours_gbps"] / result["dram_read_gbps"], 1)
    result["targets"] = _targets(result["cpu"])
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        from .kernels import gpu

        result["cuda_device"] = torch.cuda.get_device_name()
        result["cuda"] = []
        if gpu.available():
            for n, k in shapes:
                result["cuda"].extend(bench_cuda_shape(n, k, cuda_ms or ms))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    """The result as a plain-text table (what the CLI prints)."""
    lines = []
    if result["cpu"]:
        lines += _cpu_lines(result)
    if result.get("cuda"):
        lines += _cuda_lines(result)
    return "\n".join(lines)


def _cpu_lines(result: dict) -> list[str]:
    """The CPU part of format_table."""
    lines = [
        f"CPU: {result['cpu_threads']} threads, DRAM read {result['dram_read_gbps']:.1f} GB/s, "
        f"LLC {result['llc_bytes'] >> 20} MiB, kernel ISA {result['kernels']['cpu']['isa']}; "
        "times in ms per call, shapes (N, K); x = speed-up of ours (bf16) over that column",
        f"{'N x K':>12} {'M':>3} {'bf16 mm':>8} {'fp32 mm':>8} {'torch i4':>8} {'ours bf16':>9} {'fp16':>7} "
        f"{'fp32':>7} {'x bf16':>7} {'x fp32':>7} {'x ti4':>6}  M=1 GB/s (%DRAM)",
    ]
    for r in result["cpu"]:
        t = r["times_ms"]
        ra = r.get("ratios", {})
        bw = f"  {r['ours_gbps']:.1f} ({r['ours_pct_dram']:.0f}%)" if r["m"] == 1 and "ours_gbps" in r else ""
        lines.append(
            f"{r['shape'][0]:>5} x {r['shape'][1]:<5} {r['m']:>3} {t['bf16_matmul']:8.3f} {t['fp32_matmul']:8.3f} "
            f"{t['torch_int4']:8.3f} {t.get('ours_bf16', float('nan')):9.3f} {t.get('ours_fp16', float('nan')):7.3f} "
            f"{t.get('ours_fp32', float('nan')):7.3f} {ra.get('vs_bf16', float('nan')):7.2f} "
            f"{ra.get('vs_fp32', float('nan')):7.2f} {ra.get('vs_torch_int4', float('nan')):6.2f}{bw}"
        )
    for key, v in result.get("targets", {}).items():
        shown = v.get("worst", v.get("worst_by_m"))
        lines.append(f"target {key}: {shown} (>= {v['target']}) {'MET' if v['met'] else 'NOT MET'}")
    return lines


def _cuda_lines(result: dict) -> list[str]:
    """The CUDA part of format_table."""
    lines = []
    if result.get("cuda"):
        lines.append(f"CUDA ({result['cuda_device']}, CUDA graphs): ms per call")
        lines.append(
            f"{'N x K':>12} {'M':>3} {'bf16 mm':>8} {'torch i4':>8} {'ours':>8} {'path':>8} {'x bf16':>7} {'x ti4':>6}"
        )
        for r in result["cuda"]:
            t, ra = r["times_ms"], r["ratios"]
            lines.append(
                f"{r['shape'][0]:>5} x {r['shape'][1]:<5} {r['m']:>3} {t['bf16_matmul']:8.4f} {t['torch_int4']:8.4f} "
                f"{t['ours_bf16']:8.4f} {r['path']:>8} {ra['vs_bf16']:7.2f} {ra['vs_torch_int4']:6.2f}"
            )
    return lines


# (name, N, K) of the 16-bit heads timed by run_head: vocabulary x hidden size
HEAD_SHAPES: tuple[tuple[str, int, int], ...] = (("gemma3-270m", 262144, 640), ("llama-3.2-3b", 128256, 3072))
HEAD_MS: tuple[int, ...] = (1, 2, 4, 8)
HEAD_TARGET = 0.8  # the kernel's weight bytes / time at M=1, as a share of the DRAM read bandwidth


def _interleaved_all(
    variants: dict[str, Sequence[Callable[[], object]]], passes: int
) -> dict[str, list[float]]:
    """Every call's seconds per variant, the variants interleaved pass by pass (each pass: one rotation)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fns in variants.values():
        fns[0]()
    for _ in range(passes):
        for name, fns in variants.items():
            for f in fns:
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    return times


def bench_head_shape(name: str, n: int, k: int, ms: Sequence[int], cache: int, passes: int = 5) -> dict:
    """One head shape: hubtool's dense kernel and torch's matmul at each M, and DRAM probes, interleaved.

    The weight's copies span at least two last-level caches (1 GB or more), so every call reads its
    weight from DRAM; the probe streams the very same copies (hubtool's ``mem_read``, all threads; a torch
    sum where the library is missing). Figures: the best call and the median, per variant.
    """
    from .kernels import cpu

    have_ours = cpu.load()
    nbytes = n * k * 2
    copies = max(2, math.ceil(2 * cache / nbytes))
    gen = torch.Generator().manual_seed(n + k)
    ws = [torch.randn(n, k, generator=gen, dtype=torch.bfloat16) for _ in range(copies)]
    variants: dict[str, list[Callable[[], object]]] = {}
    if have_ours:
        variants["dram_read"] = [lambda w=w: torch.ops.hubtool.mem_read(w.view(torch.uint8)) for w in ws]
    else:
        variants["dram_sum"] = [lambda w=w: w.view(torch.int16).sum() for w in ws]
    for m in ms:
        x = torch.randn(m, k, generator=gen, dtype=torch.bfloat16)
        variants[f"torch_m{m}"] = [lambda w=w, x=x: F.linear(x, w) for w in ws]
        if have_ours:
            variants[f"ours_m{m}"] = [lambda w=w, x=x: cpu.dense_mm(x, w) for w in ws]
    if have_ours and 1 in ms:  # fp16 weights: the same bytes read as fp16 (only the speed counts here)
        x16 = torch.randn(1, k, generator=gen).to(torch.float16)
        variants["ours_fp16w_m1"] = [lambda w=w: cpu.dense_mm(x16, w.view(torch.float16)) for w in ws]
    with torch.inference_mode():
        times = _interleaved_all(variants, passes)
    del ws
    stats = {
        key: {"best_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3} for key, v in times.items()
    }
    probe = next(key for key in stats if key.startswith("dram_"))
    dram = nbytes / (stats[probe]["best_ms"] * 1e-3) / 1e9
    row: dict = {
        "name": name,
        "shape": [n, k],
        "weight_bytes": nbytes,
        "copies": copies,
        "dram_read_gbps": round(dram, 2),
        "dram_read_median_gbps": round(nbytes / (stats[probe]["median_ms"] * 1e-3) / 1e9, 2),
        "times_ms": {key: {s: round(v, 3) for s, v in st.items()} for key, st in stats.items()},
        "by_m": {},
    }
    for m in ms:
        t_torch = stats[f"torch_m{m}"]
        entry = {"torch_gbps": round(nbytes / (t_torch["best_ms"] * 1e-3) / 1e9, 2)}
        if have_ours:
            t_ours = stats[f"ours_m{m}"]
            gbps = nbytes / (t_ours["best_ms"] * 1e-3) / 1e9
            entry.update(
                ours_gbps=round(gbps, 2),
                ours_median_gbps=round(nbytes / (t_ours["median_ms"] * 1e-3) / 1e9, 2),
                ours_share_of_dram=round(gbps / dram, 3),
                speedup_vs_torch=round(t_torch["best_ms"] / t_ours["best_ms"], 2),
                speedup_vs_torch_median=round(t_torch["median_ms"] / t_ours["median_ms"], 2),
            )
        row["by_m"][m] = entry
    if "ours_fp16w_m1" in stats:
        row["fp16_weight_m1_share_of_dram"] = round(
            nbytes / (stats["ours_fp16w_m1"]["best_ms"] * 1e-3) / 1e9 / dram, 3
        )
    if have_ours and 1 in ms:
        share = row["by_m"][1]["ours_share_of_dram"]
        row["target"] = {"m1_share_of_dram": share, "target": HEAD_TARGET, "met": share >= HEAD_TARGET}
    log.info("head %s %dx%d: %s", name, n, k, row["by_m"])
    return row


def run_head(
    json_path: str | None = None,
    shapes: Sequence[tuple[str, int, int]] = HEAD_SHAPES,
    ms: Sequence[int] = HEAD_MS,
    passes: int = 5,
    threads: int | None = None,
) -> dict:
    """The 16-bit head benchmark: every shape at every M (see ``bench_head_shape``); optionally write JSON."""
    from .kernels import cpu

    with num_threads(threads):
        cache = llc_bytes()
        result = {
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "llc_bytes": cache,
            "isa": cpu.detected_isa() if cpu.load() else None,
            "heads": [bench_head_shape(name, n, k, ms, cache, passes) for name, n, k in shapes],
        }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_head(result: dict) -> str:
    """The head benchmark as plain text: GB/s of weight read per M, against DRAM and torch."""
    lines = [
        f"16-bit head, x @ W^T at small M (bf16; {result['cpu_threads']} threads, kernel ISA {result['isa']}): "
        "weight GB/s = weight bytes / best call (median in brackets); x = speed-up over torch's bf16 matmul"
    ]
    for r in result["heads"]:
        n, k = r["shape"]
        lines.append(
            f"{r['name']} head {n} x {k} ({r['weight_bytes'] / 1e6:.0f} MB, {r['copies']} copies): DRAM read "
            f"{r['dram_read_gbps']:.1f} GB/s (median {r['dram_read_median_gbps']:.1f})"
        )
        for m, e in r["by_m"].items():
            if "ours_gbps" in e:
                lines.append(
                    f"  M={m}: ours {e['ours_gbps']:5.1f} GB/s ({e['ours_median_gbps']:.1f}) = "
                    f"{100 * e['ours_share_of_dram']:3.0f}% of DRAM   torch {e['torch_gbps']:5.1f} GB/s   "
                    f"x{e['speedup_vs_torch']:.2f} (median x{e['speedup_vs_torch_median']:.2f})"
                )
            else:
                lines.append(f"  M={m}: torch {e['torch_gbps']:5.1f} GB/s (hubtool's kernel unavailable)")
        if "fp16_weight_m1_share_of_dram" in r:
            lines.append(f"  fp16 weight, M=1: {100 * r['fp16_weight_m1_share_of_dram']:.0f}% of DRAM")
        if "target" in r:
            t = r["target"]
            lines.append(
                f"  target M=1 >= {100 * t['target']:.0f}% of DRAM: {100 * t['m1_share_of_dram']:.0f}% "
                f"{'MET' if t['met'] else 'NOT MET'}"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hubtool.bench_kernels [head] [json_path]
    import sys

    logging.basicConfig(level=os.environ.get("HUBTOOL_LOG", "WARNING"))
    args = sys.argv[1:]
    n_threads = int(os.environ.get("HUBTOOL_BENCH_THREADS", "0"))
    if args[:1] == ["head"]:
        res = run_head(args[1] if len(args) > 1 else None, threads=n_threads)
        sys.stdout.write(format_head(res) + "\n")
    else:
        res = run(args[0] if args else None, threads=n_threads)
        sys.stdout.write(format_table(res) + "\n")
