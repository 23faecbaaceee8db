"""Benchmark hubtool's SignRound / opt-rtn against auto-round 0.16 on Gemma 3 270M (CPU, offline).

Every method runs in its own subprocess (same calibration samples, same iters / nsamples / seqlen /
batch size): the quantization's wall time and CPU time, the peak RSS while it runs (VmHWM reset just
before it) and the perplexity of the fake-quantized model on held-out text (pydoc topics that
calibration never uses, see ``hubtool.quant.calib.heldout_text``). Then hubtool SignRound on tiny Llama
models of 4, 8 and 16 layers shows how its peak RSS grows with depth.

Timings on a shared 2-core VM drift by 5-30% over minutes: ``--repeat N`` runs every timed method N times,
interleaved (A B A B, not A A B B), and reports the median with the range. The CPU kernel library is
built before the first method, and a failed build is announced (the torch fallback would be timed).

    .venv/bin/python scripts/bench_signround.py [--iters 50 --nsamples 32 --seqlen 256] [--repeat 2] [--json F]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ["bf16", "rtn", "opt-rtn", "signround", "autoround-iters0", "autoround"]
LABELS = {
    "bf16": "bf16 (16-bit baseline)",
    "rtn": "hubtool RTN",
    "opt-rtn": "hubtool opt-rtn",
    "signround": "hubtool SignRound",
    "autoround-iters0": "auto-round iters=0",
    "autoround": "auto-round SignRound",
}


# -- measurements inside a worker ------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def perplexity(model, tok, text: str, window: int, max_tokens: int) -> float:
    """Perplexity over non-overlapping windows (BOS first) of the first ``max_tokens`` tokens of ``text``."""
    import torch
    import torch.nn.functional as F

    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    body = window - len(bos)
    base = getattr(model, "model", None)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, body):
            chunk = bos + ids[start : start + body]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk])
            if base is not None and hasattr(model, "lm_head"):
                h = base(input_ids=x, use_cache=False).last_hidden_state[0]
                soft = getattr(model.config, "final_logit_softcapping", None)
                for s in range(0, h.shape[0] - 1, 128):
                    logits = model.lm_head(h[s : min(s + 128, h.shape[0] - 1)]).float()
                    if soft:
                        logits = torch.tanh(logits / soft) * soft
                    tgt = x[0, s + 1 : s + 1 + logits.shape[0]]
                    nll += float(F.cross_entropy(logits, tgt, reduction="sum"))
                    count += tgt.numel()
            else:
                logits = model(x, use_cache=False).logits[0, :-1].float()
                nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
                count += len(chunk) - 1
    import math

    return math.exp(nll / max(count, 1))


def _apply(model, weights) -> None:
    """Overwrite the model's linears with the dequantized codes (fake quantization, for perplexity)."""
    import torch

    with torch.no_grad():
        for name, iw in weights.items():
            lin = model.get_submodule(name)
            lin.weight.copy_(iw.dequantize(lin.weight.dtype))


def worker(method: str, cfg: dict) -> dict:
    """Run one method in this process and return its measurements ("signround@20": 20 iterations)."""
    import torch

    method, _, iters = method.partition("@")
    if iters:
        cfg = {**cfg, "iters": int(iters)}
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    from hubtool.core.spec import QuantSpec
    from hubtool.quant.calib import heldout_text, load_calibration
    from hubtool.quant.driver import quantize_model
    from hubtool.quant.layers import plan_layers
    from hubtool.quant.spec import make_recipe

    t0 = time.perf_counter()
    if cfg.get("tiny_layers"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tests.tiny import build_text_model

        out = Path(cfg["tmp"]) / f"tiny-{cfg['tiny_layers']}"
        if not out.exists():
            build_text_model("llama", out, layers=cfg["tiny_layers"], hidden=512, inter=1536)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        tok = AutoTokenizer.from_pretrained(out)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.bfloat16).eval()
        tok = AutoTokenizer.from_pretrained(cfg["model_dir"])
    load_s = time.perf_counter() - t0
    spec = QuantSpec(sym=True)
    recipe = make_recipe(
        "default",
        iters=cfg["iters"],
        nsamples=cfg["nsamples"],
        seqlen=cfg["seqlen"],
        batch_size=cfg["batch_size"],
        seed=cfg["seed"],
    )
    calib = load_calibration(
        "builtin",
        tok,
        nsamples=cfg["nsamples"],
        seqlen=cfg["seqlen"],
        seed=cfg["seed"],
        is_vlm=False,
        batch_size=cfg["batch_size"],
    )
    rss_before = _status_kb("VmRSS") * 1024
    reset_ok = _reset_peak()
    c0 = time.process_time()
    t1 = time.perf_counter()
    result_bytes = 0
    if method in ("rtn", "opt-rtn", "signround"):
        plan = plan_layers(model, spec)
        res = quantize_model(model, plan, spec, method, recipe, calib if method != "rtn" else None)
        quant_s = time.perf_counter() - t1
        cpu_s = time.process_time() - c0
        peak = _status_kb("VmHWM") * 1024
        result_bytes = sum(w.q.numel() + w.scale.numel() * 4 + w.zero.numel() for w in res.weights.values())
        _apply(model, res.weights)
    elif method.startswith("autoround"):
        from auto_round import AutoRound

        data = [s["input_ids"] for s in calib.samples]
        ar = AutoRound(
            model,
            tok,
            bits=4,
            group_size=128,
            sym=True,
            iters=0 if method == "autoround-iters0" else cfg["iters"],
            nsamples=cfg["nsamples"],
            seqlen=cfg["seqlen"],
            batch_size=cfg["batch_size"],
            dataset=data,
            seed=cfg["seed"],
            device_map="cpu",
        )
        ar.quantize()
        quant_s = time.perf_counter() - t1
        cpu_s = time.process_time() - c0
        peak = _status_kb("VmHWM") * 1024
    else:
        quant_s = cpu_s = 0.0
        peak = _status_kb("VmHWM") * 1024
    out = {
        "method": method,
        "load_s": load_s,
        "quant_s": quant_s,
        "cpu_s": cpu_s,
        "rss_before": rss_before,
        "peak_rss": peak if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_is_phase": reset_ok,
        "result_bytes": result_bytes,
    }
    if not cfg.get("tiny_layers"):
        text = Path(cfg["eval_file"]).read_text() if cfg.get("eval_file") else heldout_text()
        out["ppl"] = perplexity(model, tok, text, cfg["eval_window"], cfg["eval_tokens"])
    return out


# -- the driver ------------------------------------------------------------------------------------
def prepare_model(source: str, tmp: str) -> str:
    """The 16-bit model as a local safetensors folder (a GGUF / PyPI model is dequantized once, here)."""
    import torch

    from hubtool.source import load_source, locate

    info = locate(source)
    if info.kind == "dir":
        return info.name
    loaded = load_source(info, dtype=torch.bfloat16)
    out = Path(tmp) / "model"
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return str(out)


def run_worker(method: str, cfg: dict) -> dict:
    """Run ``worker(method)`` in a fresh Python process."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--worker", method, "--config", json.dumps(cfg), "--result", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker {method} failed (exit {proc.returncode})")
    data = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    return data


def _label(m: str) -> str:
    name, _, iters = m.partition("@")
    return LABELS.get(name, name) + (f" ({iters} iters)" if iters else "")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


UNTIMED = ("bf16", "rtn")  # nothing worth repeating: no quantization, or a fraction of a second


def _median_run(rs: list[dict]) -> dict:
    """One method's result over its repeated runs: median time and peak RSS, every run's time kept."""
    out = dict(rs[0])
    for key in ("quant_s", "cpu_s", "peak_rss"):
        out[key] = statistics.median(r[key] for r in rs)
    out["quant_s_runs"] = [r["quant_s"] for r in rs]
    out["peak_rss_runs"] = [r["peak_rss"] for r in rs]
    if len({r.get("ppl") for r in rs}) > 1:  # same seed, same bytes: this would be a bug worth seeing
        out["ppl_runs"] = [r.get("ppl") for r in rs]
    return out


def main() -> None:
    """Run the benchmark and print the table (and write --json)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pypi:gemma3-270m")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored")
    ap.add_argument("--eval-window", type=int, default=512)
    ap.add_argument("--eval-file", default=None, help="score this text instead of the held-out pydoc topics")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--fewer-iters",
        default="20",
        help="also run hubtool SignRound with these iteration counts (quality per time; '' to skip)",
    )
    ap.add_argument("--depths", default="4,8,16", help="tiny-model depths for the RSS check ('' to skip)")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every timed method this many times, interleaved; the table shows the median (and range)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, json.loads(args.config))
        Path(args.result).write_text(json.dumps(res))
        return

    from hubtool.kernels import cpu

    if not cpu.load():  # built here, so that a build is not counted in a method's time
        print(
            f"# WARNING: hubtool's CPU kernels did not build ({cpu.status().get('error')}): torch fallback timed"
        )
    tmp = tempfile.mkdtemp(prefix="bench-signround-")
    cfg = {
        "model": args.model,
        "model_dir": prepare_model(args.model, tmp) if args.methods or args.fewer_iters else None,
        "iters": args.iters,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
        "eval_tokens": args.eval_tokens,
        "eval_window": args.eval_window,
        "eval_file": args.eval_file,
        "tmp": tmp,
    }
    print(
        f"# {args.model}: int4 g128 sym, calibration builtin pydoc topics {args.nsamples} x {args.seqlen}, "
        f"iters {args.iters}, batch {args.batch_size}, {args.threads} threads; held-out ppl on "
        f"{args.eval_tokens} tokens ({args.eval_file or 'pydoc topics never used for calibration'})",
        flush=True,
    )
    methods = [m for m in args.methods.split(",") if m]
    methods += [f"signround@{n}" for n in args.fewer_iters.split(",") if n]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(max(1, args.repeat)):  # interleaved, so that a slow spell of the machine hits all
        for m in methods:
            if rep and m in UNTIMED:
                continue
            r = run_worker(m, cfg)
            runs[m].append(r)
            print(
                f"  {m:18s} ppl {r.get('ppl', float('nan')):8.3f}  quant {r['quant_s']:7.1f} s  "
                f"cpu {r['cpu_s']:7.1f} s  peak RSS {_gb(r['peak_rss'])} GB  (run {rep + 1})",
                flush=True,
            )
    results = {m: _median_run(rs) for m, rs in runs.items()}
    depth = {}
    for n in [int(d) for d in args.depths.split(",") if d]:
        depth[n] = run_worker("signround", {**cfg, "tiny_layers": n, "iters": min(args.iters, 10)})
        d = depth[n]
        print(
            f"  tiny llama {n:2d} layers: peak RSS {_gb(d['peak_rss'])} GB (before {_gb(d['rss_before'])} GB, "
            f"codes {d['result_bytes'] / 1e6:.1f} MB)",
            flush=True,
        )

    print()
    print("| method | held-out ppl | ppl / bf16 | quantize wall s | CPU s | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    base = results.get("bf16", {}).get("ppl")
    for m, r in results.items():
        ratio = f"{r['ppl'] / base:.3f}" if base and "ppl" in r else "-"
        wall = f"{r['quant_s']:.1f}" if m != "bf16" else "-"
        if m != "bf16" and len(r["quant_s_runs"]) > 1:
            wall += f" ({min(r['quant_s_runs']):.1f}-{max(r['quant_s_runs']):.1f})"
        cpu = f"{r['cpu_s']:.1f}" if m != "bf16" else "-"
        print(
            f"| {_label(m)} | {r.get('ppl', float('nan')):.3f} | {ratio} | {wall} | {cpu} | {_gb(r['peak_rss'])} |"
        )
    summary = {}
    if "signround" in results and "autoround" in results:
        sr, ar = results["signround"], results["autoround"]
        summary = {
            "wall_ratio_signround": sr["quant_s"] / ar["quant_s"],
            "cpu_ratio_signround": sr["cpu_s"] / ar["cpu_s"],
            "rss_ratio_signround": sr["peak_rss"] / ar["peak_rss"],
        }
        if "opt-rtn" in results and "autoround-iters0" in results:
            summary["wall_ratio_optrtn"] = (
                results["opt-rtn"]["quant_s"] / results["autoround-iters0"]["quant_s"]
            )
        best_ar = min(ar["ppl"], results.get("autoround-iters0", ar)["ppl"])
        summary["ppl_signround_vs_best_autoround"] = sr["ppl"] / best_ar
        if "opt-rtn" in results:
            summary["ppl_signround_vs_optrtn"] = sr["ppl"] / results["opt-rtn"]["ppl"]
        print()
        print(
            f"hubtool/auto-round SignRound: wall {summary['wall_ratio_signround']:.2f}x, "
            f"CPU {summary['cpu_ratio_signround']:.2f}x, peak RSS {summary['rss_ratio_signround']:.2f}x; "
            f"ppl vs best auto-round mode {summary['ppl_signround_vs_best_autoround']:.3f}x"
            + (
                f", vs hubtool opt-rtn {summary['ppl_signround_vs_optrtn']:.3f}x"
                if "ppl_signround_vs_optrtn" in summary
                else ""
            )
        )
        print(
            f"targets: ppl <= best auto-round: {summary['ppl_signround_vs_best_autoround'] <= 1.0}; "
            f"ppl < opt-rtn: {summary.get('ppl_signround_vs_optrtn', 9) < 1.0}; "
            f"wall <= 0.7x: {summary['wall_ratio_signround'] <= 0.7}; RSS <= auto-round: "
            f"{summary['rss_ratio_signround'] <= 1.0}"
        )
        for m, r in results.items():
            if m.startswith("signround@"):
                summary[f"{m}_wall_ratio"] = r["quant_s"] / ar["quant_s"]
                summary[f"{m}_ppl_vs_best_autoround"] = r["ppl"] / best_ar
                print(
                    f"{_label(m)}: ppl {r['ppl']:.3f} ({r['ppl'] / best_ar:.3f}x the best auto-round mode) "
                    f"in {r['quant_s'] / ar['quant_s']:.2f}x auto-round SignRound's wall time "
                    f"({args.iters} iters)"
                )
    if depth:
        print(
            "tiny-model peak RSS by depth (GB): "
            + ", ".join(f"{n} layers {_gb(d['peak_rss'])}" for n, d in depth.items())
            + "; growth while quantizing (peak - before, MB): "
            + ", ".join(f"{n} layers {(d['peak_rss'] - d['rss_before']) / 1e6:.0f}" for n, d in depth.items())
        )
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"config": cfg, "results": results, "depth": depth, "summary": summary}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
