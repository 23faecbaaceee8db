"""`make bench`'s ``head`` part (issue 19 item 1): the 16-bit lm_head on hubtool's small-M dense kernel.

Two measurements, each against a baseline timed in the same run:

* ``kernel``: ``hubtool.bench_kernels.run_head``: the heads of Gemma 3 270M (262144 x 640) and
  Llama-3.2-3B (128256 x 3072) at M = 1, 2, 4, 8, hubtool's kernel and torch's bf16 matmul, as weight
  bytes over time, next to the DRAM read bandwidth measured over the same bytes (target: >= 80% at M=1);
  then (also alone as ``int8``) the int8 head, codes (N, K) and one fp32 scale per row, of both shapes at
  M = 1 on hubtool's int8 kernel, as GB/s of codes read and its share of the DRAM read over the same
  copies, next to the bf16 head on the dense kernel (target: >= 80% at M=1).
* ``decode``: Gemma 3 270M (the PyPI GGUF), greedy decode at batch 1: hubtool int4 (an RTN export loaded
  with ``hubtool.load``; its int4 layers on hubtool's int4 kernel) and the 16-bit model, each with its
  16-bit linears on torch and on hubtool's dense kernel, the runs interleaved; tokens/s (best and median)
  and the lm_head's share of the decode time (forward hooks).

``python scripts/bench_head.py [--parts kernel,int8,decode] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
MODEL = "pypi:gemma3-270m"
PROMPT = "The history of the Python programming language"


class HeadTimer:
    """Wall time spent inside one module's forward (pre/post forward hooks)."""

    def __init__(self, module):
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        self._hooks = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._hooks:
            h.remove()


def bench_int8_head(passes: int = 5, m: int = 1) -> dict:
    """The int8 head of each shape at M = m: hubtool's int8 kernel, the bf16 head on the dense kernel and the
    DRAM read over the int8 copies (``mem_read``, all threads), interleaved pass by pass.

    Each variant walks a rotation of copies spanning two last-level caches, so every call reads its weight
    from DRAM (as in ``bench_kernels.bench_head_shape``). Figures: weight bytes / best call (and median).
    """
    import torch

    from hubtool import bench_kernels as bk
    from hubtool.kernels import cpu

    if not cpu.load():
        return {"error": f"hubtool's CPU kernels unavailable: {cpu.status()['error']}"}
    cache = bk.llc_bytes()
    out: dict = {"threads": torch.get_num_threads(), "isa": cpu.detected_isa(), "m": m, "heads": []}
    for name, n, k in bk.HEAD_SHAPES:
        gen = torch.Generator().manual_seed(n + k)
        nb8, nb16 = n * k, 2 * n * k
        qs = [
            torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            for _ in range(max(2, math.ceil(2 * cache / nb8)))
        ]
        ws = [
            torch.randn(n, k, generator=gen, dtype=torch.bfloat16)
            for _ in range(max(2, math.ceil(2 * cache / nb16)))
        ]
        scale = torch.rand(n, generator=gen) * 0.01
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        variants = {
            "dram_read": [lambda q=q: torch.ops.hubtool.mem_read(q.view(torch.uint8)) for q in qs],
            "int8": [lambda q=q, x=x, s=scale: cpu.int8_mm(x, q, s) for q in qs],
            "bf16_dense": [lambda w=w, x=x: cpu.dense_mm(x, w) for w in ws],
        }
        with torch.inference_mode():
            times = bk._interleaved_all(variants, passes)
        del qs, ws
        best = {key: min(v) for key, v in times.items()}
        med = {key: statistics.median(v) for key, v in times.items()}
        dram = nb8 / best["dram_read"] / 1e9
        gbps, gbps16 = nb8 / best["int8"] / 1e9, nb16 / best["bf16_dense"] / 1e9
        out["heads"].append(
            {
                "name": name,
                "shape": [n, k],
                "int8_bytes": nb8,
                "copies": [len(times["int8"]) // passes, len(times["bf16_dense"]) // passes],
                "dram_read_gbps": round(dram, 2),
                "dram_read_median_gbps": round(nb8 / med["dram_read"] / 1e9, 2),
                "int8_ms": round(best["int8"] * 1e3, 3),
                "int8_median_ms": round(med["int8"] * 1e3, 3),
                "int8_gbps": round(gbps, 2),
                "int8_median_gbps": round(nb8 / med["int8"] / 1e9, 2),
                "int8_share_of_dram": round(gbps / dram, 3),
                "bf16_dense_ms": round(best["bf16_dense"] * 1e3, 3),
                "bf16_dense_gbps": round(gbps16, 2),
                "bf16_dense_share_of_dram": round(gbps16 / dram, 3),
                "int8_speedup_vs_bf16": round(best["bf16_dense"] / best["int8"], 2),
                "target": {"share": bk.HEAD_TARGET, "met": gbps / dram >= bk.HEAD_TARGET},
            }
        )
    return out


def format_int8_head(r: dict) -> str:
    """The int8 head part as text."""
    if "error" in r:
        return f"int8 head: {r['error']}"
    lines = [
        f"int8 head, (x @ q^T) * scale at M = {r['m']} (bf16 x; {r['threads']} threads, kernel ISA "
        f"{r['isa']}): GB/s = weight bytes / best call (median); % of the DRAM read over the int8 copies"
    ]
    for h in r["heads"]:
        n, k = h["shape"]
        lines.append(
            f"{h['name']} head {n} x {k}: DRAM read {h['dram_read_gbps']:.1f} GB/s (median "
            f"{h['dram_read_median_gbps']:.1f}), {h['copies'][0]} int8 / {h['copies'][1]} bf16 copies"
        )
        lines.append(
            f"  int8 ({h['int8_bytes'] / 1e6:.0f} MB): {h['int8_ms']:6.2f} ms, {h['int8_gbps']:5.1f} GB/s "
            f"({h['int8_median_gbps']:.1f}) = {100 * h['int8_share_of_dram']:3.0f}% of DRAM   "
            f"bf16 dense ({2 * h['int8_bytes'] / 1e6:.0f} MB): {h['bf16_dense_ms']:6.2f} ms, "
            f"{h['bf16_dense_gbps']:5.1f} GB/s = {100 * h['bf16_dense_share_of_dram']:3.0f}%   "
            f"int8 x{h['int8_speedup_vs_bf16']:.2f} faster"
        )
        t = h["target"]
        lines.append(
            f"  target M={r['m']} >= {100 * t['share']:.0f}% of DRAM: {100 * h['int8_share_of_dram']:.0f}% "
            f"{'MET' if t['met'] else 'NOT MET'}"
        )
    return "\n".join(lines)


def set_dense(model, on: bool) -> None:
    """Every DenseLinear of ``model`` on hubtool's kernel (on) or on torch (off)."""
    from hubtool.runtime.dense import DenseLinear

    for m in model.modules():
        if isinstance(m, DenseLinear):
            m.dense_backend = None if on else "torch"


def decode_runs(model, tok, new_tokens: int, repeats: int) -> dict:
    """Greedy decode at batch 1, the dense kernel off and on in turn: tokens/s and the head's share."""
    import torch

    ids = tok(PROMPT, return_tensors="pt")
    head = model.get_output_embeddings()
    runs: dict[str, dict[str, list[float]]] = {
        c: {"tps": [], "head_share": [], "head_ms": []} for c in ("torch", "hubtool")
    }
    used = {}
    with torch.inference_mode():
        for cfg in runs:  # warm-up (kernel load, caches)
            set_dense(model, cfg == "hubtool")
            model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            for cfg, r in runs.items():
                set_dense(model, cfg == "hubtool")
                timer = HeadTimer(head)
                t0 = time.perf_counter()
                model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                wall = time.perf_counter() - t0
                timer.remove()
                r["tps"].append(new_tokens / wall)
                r["head_share"].append(timer.seconds / wall)
                r["head_ms"].append(1e3 * timer.seconds / max(timer.calls, 1))
                used[cfg] = getattr(head, "last_backend", None)
    set_dense(model, True)
    out = {}
    for cfg, r in runs.items():
        out[cfg] = {
            "tokens_per_s_best": round(max(r["tps"]), 2),
            "tokens_per_s_median": round(statistics.median(r["tps"]), 2),
            "tokens_per_s_all": [round(v, 2) for v in r["tps"]],
            "head_share_of_decode": round(statistics.median(r["head_share"]), 3),
            "head_ms_per_token": round(statistics.median(r["head_ms"]), 2),
            "head_backend": used.get(cfg),
        }
    out["speedup_best"] = round(out["hubtool"]["tokens_per_s_best"] / out["torch"]["tokens_per_s_best"], 3)
    out["speedup_median"] = round(
        out["hubtool"]["tokens_per_s_median"] / out["torch"]["tokens_per_s_median"], 3
    )
    return out


def bench_decode(
    work: Path,
    new_tokens: int,
    repeats: int,
    export: Path | None = None,
    models: tuple[str, ...] = ("int4", "bf16"),
) -> dict:
    """Gemma 3 270M: hubtool int4 (an RTN export, made here unless ``export`` names one) and the 16-bit
    model, dense kernel off vs on."""
    import torch

    from hubtool.runtime.dense import use_dense_kernel
    from hubtool.runtime.loader import load_processor, load_quantized
    from hubtool.source import load_source, locate

    result = {
        "model": MODEL,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }
    if "int4" in models:
        folder = export
        if folder is None:
            run = work / "rtn"
            subprocess.run(
                [sys.executable, "-m", "hubtool", "quantize", MODEL, "-o", str(run), "--method", "rtn"]
                + ["--formats", "hubtool", "--overwrite"],
                check=True,
            )
            folder = run / "formats" / "hubtool"
        proc = load_processor(folder)
        tok = getattr(proc, "tokenizer", proc)
        model = load_quantized(folder, dtype=torch.bfloat16)
        result["int4"] = decode_runs(model, tok, new_tokens, repeats)
        del model
    if "bf16" in models:
        loaded = load_source(locate(MODEL), dtype=torch.bfloat16)
        result["bf16_linears_on_kernel"] = use_dense_kernel(loaded.model)
        result["bf16"] = decode_runs(loaded.model, loaded.tokenizer, new_tokens, repeats)
    return result


def format_decode(r: dict) -> str:
    """The decode part as text."""
    lines = [f"decode tokens/s, {r['model']}, batch 1, {r['new_tokens']} tokens, {r['threads']} threads "
             f"(best / median of {r['repeats']}, interleaved); head = lm_head's share of the decode time"]  # fmt: skip
    for key, label in (("int4", "hubtool int4"), ("bf16", "16-bit model")):
        if key not in r:
            continue
        d = r[key]
        t, h = d["torch"], d["hubtool"]
        lines.append(
            f"  {label:<13} 16-bit linears on torch: {t['tokens_per_s_best']:6.1f} / {t['tokens_per_s_median']:6.1f} "
            f"tok/s, head {t['head_ms_per_token']:.1f} ms/token ({100 * t['head_share_of_decode']:.0f}%)   "
            f"on hubtool's kernel: {h['tokens_per_s_best']:6.1f} / {h['tokens_per_s_median']:6.1f} tok/s, head "
            f"{h['head_ms_per_token']:.1f} ms/token ({100 * h['head_share_of_decode']:.0f}%)   "
            f"x{d['speedup_best']:.2f} (median x{d['speedup_median']:.2f})"
        )
    return "\n".join(lines)


def main() -> int:
    """Run the chosen parts, print them, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="kernel,decode")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5, help="kernel part: passes through each rotation")
    ap.add_argument(
        "--export", type=Path, help="decode: an existing hubtool export of the model (skips quantizing)"
    )
    ap.add_argument("--models", default="int4,bf16", help="decode: int4 and/or bf16")
    args = ap.parse_args()
    logging.basicConfig(level=os.environ.get("HUBTOOL_LOG", "WARNING"))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results: dict = {}
    if "kernel" in parts:
        from hubtool import bench_kernels

        results["kernel"] = bench_kernels.run_head(passes=args.passes)
        print(bench_kernels.format_head(results["kernel"]), flush=True)
    if "kernel" in parts or "int8" in parts:
        results["kernel_int8"] = bench_int8_head(passes=args.passes)
        print(format_int8_head(results["kernel_int8"]), flush=True)
    if "decode" in parts:
        work = Path(tempfile.mkdtemp(prefix="hubtool-bench-head-"))
        try:
            models = tuple(m.strip() for m in args.models.split(",") if m.strip())
            results["decode"] = bench_decode(work, args.new_tokens, args.repeats, args.export, models)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(format_decode(results["decode"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
