"""`make bench`: every benchmark of hubtool, each printed as ratios against a baseline measured in the same run.

Parts (``--only`` picks some): ``rtn`` (issue 2: a real PyPI model, bf16 vs RTN int4 perplexity on held-out
text, quantization wall time and peak RSS, on-disk size, CPU decode tokens/s), ``kernels`` (int4 matmul
kernels vs bf16/fp32 matmul and torch's built-in), ``signround`` (SignRound vs auto-round on the same model),
``verify`` (issue 14: `hubtool verify` on the same model's RTN exports, seconds per format and library),
``scale`` (issue 18: quantize, load and decode the Llama-3.2-3B shape, and Llama-3.1-8B with ``--big``; see
``scripts/bench_scale.py``), ``head`` (issue 19: the 16-bit lm_head on hubtool's dense kernel vs torch's bf16
matmul and the measured DRAM bandwidth, Gemma 3 270M and Llama-3.2-3B heads, and decode tokens/s with and
without it; ``scripts/bench_head.py``), ``gguf`` (issue 16: hubtool's GGUF Q4_0 and Q4_K_M against llama.cpp's own,
with and without an importance matrix, in llama.cpp: perplexity, size, decode tokens/s;
``scripts/bench_gguf.py``), ``decode`` (issue 19: decode tokens/s at batch 1 of hubtool int4, eager and
compiled, against the 16-bit model and llama.cpp on the same codes; ``scripts/bench_decode.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")  # no library progress bars in the figures' output
MODEL = "pypi:gemma3-270m"


def _hubtool(*args: str) -> tuple[float, int]:
    """Run the hubtool CLI in a child process; return (wall seconds, the child's peak RSS in bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hubtool", *args], check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(after, before) * 1024


def _dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(f"*{suffix}"))


def _decode_tps(model, tok, new_tokens: int, repeats: int) -> float:
    """Greedy decode tokens/s for exactly ``new_tokens`` tokens (median of ``repeats``), batch 1."""
    import torch

    ids = tok("The history of the Python programming language", return_tensors="pt")
    times = []
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up (kernel build)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def bench_rtn(work: Path, ppl_chunks: int, new_tokens: int) -> dict:
    """bf16 vs RTN int4 on a real model: perplexity, quantize time/RSS, size, decode speed."""
    import torch

    from hubtool import record
    from hubtool.runtime.loader import load_processor, load_quantized
    from hubtool.source import load_source, locate
    from hubtool.stages.compare import kernel_backends

    run = work / "rtn"
    wall, rss = _hubtool(
        "quantize", MODEL, "-o", str(run), "--method", "rtn", "--formats", "hubtool", "--overwrite"
    )
    _hubtool("eval", str(run), "--tasks", "ppl", "--limit", str(ppl_chunks))
    rec = record.load(run)
    ppl = {r.model: r.value for r in rec.evals if r.metric == "perplexity"}
    src_label, int4_label = [m for m in ppl if m != "int4"][0], "int4"

    loaded = load_source(locate(MODEL), dtype=torch.bfloat16)
    bf16_dir = work / "bf16"
    loaded.model.save_pretrained(bf16_dir)
    size_bf16, size_int4 = _dir_bytes(bf16_dir), _dir_bytes(run / "formats" / "hubtool")
    tps_bf16 = _decode_tps(loaded.model, loaded.tokenizer, new_tokens, 3)
    del loaded
    out = {
        "model": MODEL,
        "ppl": {
            "bf16": ppl[src_label],
            "rtn_int4": ppl[int4_label],
            "ratio_int4_over_bf16": ppl[int4_label] / ppl[src_label],
        },
        "ppl_chunks": ppl_chunks,
        "quantize_wall_s": wall,
        "quantize_peak_rss_gb": rss / 2**30,
        "size_bytes": {"bf16": size_bf16, "int4": size_int4, "ratio_int4_over_bf16": size_int4 / size_bf16},
        "decode_tokens_per_s": {"bf16": tps_bf16},
        "threads": torch.get_num_threads(),
    }
    tok = getattr(load_processor(run / "formats" / "hubtool"), "tokenizer", None)
    for backend in ("torch", "hubtool"):
        os.environ["HUBTOOL_KERNEL"] = backend
        model = load_quantized(run / "formats" / "hubtool", dtype=torch.bfloat16)
        tps = _decode_tps(model, tok or load_processor(run / "formats" / "hubtool"), new_tokens, 3)
        used = kernel_backends(model)
        d = out["decode_tokens_per_s"]
        d[f"int4_{backend}"], d[f"int4_{backend}_over_bf16"] = tps, tps / tps_bf16
        d[f"int4_{backend}_backends_used"] = used
        del model
    os.environ.pop("HUBTOOL_KERNEL", None)
    return out


def print_rtn(r: dict) -> None:
    """Print the RTN part as a small table of ratios."""
    print(f"\n== RTN int4 vs bf16 on {r['model']} ({r['threads']} threads) ==")
    p = r["ppl"]
    print(
        f"perplexity (held-out, {r['ppl_chunks']} chunks): bf16 {p['bf16']:.2f}  int4 {p['rtn_int4']:.2f}  "
        f"ratio {p['ratio_int4_over_bf16']:.3f}"
    )
    print(f"quantize: {r['quantize_wall_s']:.1f} s wall, peak RSS {r['quantize_peak_rss_gb']:.2f} GiB")
    s = r["size_bytes"]
    print(
        f"size on disk: bf16 {s['bf16'] / 2**20:.0f} MiB  int4 {s['int4'] / 2**20:.0f} MiB  "
        f"ratio {s['ratio_int4_over_bf16']:.3f}"
    )
    d = r["decode_tokens_per_s"]
    line = f"decode tokens/s (batch 1): bf16 {d['bf16']:.1f}"
    for b in ("torch", "hubtool"):
        if f"int4_{b}" in d:
            line += f"  int4[{b}] {d[f'int4_{b}']:.1f} ({d[f'int4_{b}_over_bf16']:.2f}x)"
    print(line)


def bench_verify(work: Path) -> dict:
    """`hubtool verify` on a real model's RTN exports: seconds per format and library, and its figures."""
    from hubtool.stages.verify import run_verify

    run = work / "verify"
    wall, _ = _hubtool("quantize", MODEL, "-o", str(run), "--method", "rtn", "--overwrite")
    t0 = time.perf_counter()
    results = run_verify(run)
    total = time.perf_counter() - t0
    rows = [
        {
            "format": r.format,
            "library": f"{r.library} {r.version}",
            "seconds": r.seconds,
            "passed": r.passed,
            "failed_check": r.failed_check,
            "max_rel_error": r.max_rel_error,
            "top1": r.top1_agreement,
            "dtype": r.dtype,
        }
        for r in results
    ]
    return {"model": MODEL, "quantize_seconds": wall, "verify_seconds": total, "formats": rows}


def print_verify(r: dict) -> None:
    """Print the verify part: one line per format and library."""
    print(f"\n== hubtool verify on {r['model']} (RTN exports; {r['verify_seconds']:.1f} s in all, "
          "the int4 reference included) ==")  # fmt: skip
    for row in r["formats"]:
        err = f"{row['max_rel_error']:.2e}" if row["max_rel_error"] is not None else "-"
        top1 = f"{row['top1']:.3f}" if row["top1"] is not None else "-"
        state = "pass" if row["passed"] else f"FAIL {row['failed_check']}"
        print(f"  {row['format']:<11} {row['library']:<24} {row['seconds']:6.1f} s  top-1 {top1}  "
              f"max rel. error {err} ({row['dtype']})  {state}")  # fmt: skip


def main() -> int:
    """Run the chosen benchmark parts and print (and optionally write) their results."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--only", default="rtn,kernels,verify,signround,scale,head,gguf,decode", help="comma-separated parts"
    )
    ap.add_argument("--big", action="store_true", help="scale: also the Llama-3.1-8B shape")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--ppl-chunks", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    results: dict = {}
    work = Path(tempfile.mkdtemp(prefix="hubtool-bench-"))
    try:
        if "kernels" in parts:
            from hubtool import bench_kernels

            results["kernels"] = bench_kernels.run(None)
            print(bench_kernels.format_table(results["kernels"]))
        if "rtn" in parts:
            results["rtn"] = bench_rtn(work, args.ppl_chunks, args.new_tokens)
            print_rtn(results["rtn"])
        if "verify" in parts:
            results["verify"] = bench_verify(work)
            print_verify(results["verify"])
        big = ["--big"] if args.big else []
        for part, script, extra in (
            ("signround", "bench_signround.py", []),
            ("scale", "bench_scale.py", big),
            ("head", "bench_head.py", []),
            ("gguf", "bench_gguf.py", []),
            ("decode", "bench_decode.py", []),
        ):
            if part in parts:  # each of these is a script of its own, run with --json
                out = work / f"{part}.json"
                cmd = [sys.executable, str(ROOT / "scripts" / script), "--json", str(out), *extra]
                subprocess.run(cmd, check=True)
                results[part] = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
