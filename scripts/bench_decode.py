"""`make bench` part ``decode`` (issue 19): decode tokens/s at batch 1, hubtool int4 (eager and compiled)
against the 16-bit model and llama.cpp on the same codes.

    python scripts/bench_decode.py [--models gemma3-270m] [--shape DIR] [--new-tokens 64] [--json OUT]

For each model, ``hubtool quantize --method rtn --group-size 32 --formats hubtool,gguf:q4_0`` writes the same
int4 codes twice: the ``hubtool`` export and a GGUF Q4_0 whose token embedding and output stay 16-bit (the
layout of the hubtool export). Then, each in a fresh process, greedy decoding of ``--new-tokens`` tokens
after a short prompt (the median of 3 timed runs after a warm-up):

* ``bf16``: the 16-bit model in transformers (eager, dynamic cache);
* ``hubtool int4``: ``hubtool.load`` of the export (eager, dynamic cache), and the same with the RMSNorms
  left to transformers (``HUBTOOL_FUSED_NORMS=0``), the per-token overhead the fused norms remove;
* ``hubtool int4 compiled``: the same with a static cache and transformers' auto-compile of the decode step
  (``CompileConfig(fullgraph=True, dynamic=False)``; the warm-up compiles, the timed runs do not);
* ``hubtool int4, int8 head`` (eager and compiled): the same codes with ``--quantize-lm-head int8``;
* ``llama.cpp``: ``llama-bench -p 0 -n N`` on the GGUF (``make llama-cpp``'s build).

Each run decodes exactly ``--new-tokens`` tokens with no end-of-sequence token, as llama-bench does.

Every row uses ``--threads`` threads. Printed as tokens/s and ratios (int4 over bf16, int4 over llama.cpp).
``--shape DIR`` adds a random-weight shaped model (``scripts/make_shaped.py``), whose bf16 is that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
CACHE = Path(os.environ.get("HUBTOOL_BENCH_CACHE", Path.home() / ".cache" / "hubtool-bench")) / "decode"

CHILD = """
import json, statistics, sys, time, torch
path, kind, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
from transformers import AutoTokenizer
import hubtool
if kind == "bf16":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
else:
    model = hubtool.load(path, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(path)
ids = tok("The history of the Python programming language", return_tensors="pt")
# exactly n tokens, as llama-bench decodes: no end-of-sequence token (not min_new_tokens, whose logits
# processor scans the whole vocabulary at every step: 262144 entries on Gemma 3)
model.generation_config.eos_token_id = None
kw = dict(max_new_tokens=n, do_sample=False)
if kind == "int4-compiled":
    from transformers import CompileConfig
    cc = CompileConfig(fullgraph=True, dynamic=False)
    cc._compile_all_devices = True
    kw.update(cache_implementation="static", compile_config=cc)
times = []
with torch.inference_mode():
    t0 = time.perf_counter()
    out = model.generate(**ids, **kw)  # warm-up: kernel layouts, and the compile of the decode step
    warm = time.perf_counter() - t0
    assert out.shape[1] == ids["input_ids"].shape[1] + n, out.shape
    for _ in range(3):
        t0 = time.perf_counter()
        model.generate(**ids, **kw)
        times.append(time.perf_counter() - t0)
print("BENCH " + json.dumps({"tokens_per_s": n / statistics.median(times), "warmup_s": warm}))
"""


def _child(path: Path, kind: str, tokens: int, threads: int, **env_more: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", **env_more}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), kind, str(tokens), str(threads)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode:
        if kind == "int4-compiled":  # reported, not fatal: e.g. transformers' sliding-window static cache
            last = [ln for ln in done.stderr.splitlines() if ln.strip()][-1]
            return {"error": last[:300]}
        raise SystemExit(f"decode child ({kind}) failed:\n{done.stderr[-3000:]}")
    return json.loads([x for x in done.stdout.splitlines() if x.startswith("BENCH ")][-1][6:])


def _quantized(source: str, work: Path, head: str | None = None) -> Path:
    """The run folder holding the same RTN codes as a hubtool export and a GGUF Q4_0 (made once); with
    ``head``, the hubtool export alone, its lm_head quantized so (``--quantize-lm-head``)."""
    run = work / ("run" if head is None else f"run-head-{head}")
    if not (run / "run.json").is_file():
        cmd = [sys.executable, "-m", "hubtool", "quantize", source, "-o", str(run), "--method", "rtn"]
        formats = "hubtool,gguf:q4_0" if head is None else "hubtool"
        cmd += ["--group-size", "32", "--formats", formats, "--overwrite"]
        cmd += ["--quantize-lm-head", head] if head else []
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return run


def bench(label: str, source: str, bf16: Path | None, args: argparse.Namespace, bin_dir: Path) -> dict:
    """Every row of one model."""
    from bench_gguf import _decode_tps

    work = args.cache / label
    work.mkdir(parents=True, exist_ok=True)
    run = _quantized(source, work)
    if bf16 is None:  # a pypi: source: hubtool's converted 16-bit folder
        from hubtool import cache
        from hubtool.source import locate

        bf16 = cache.load_converted(locate(source).sha256, "bfloat16")[0]
    export = run / "formats" / "hubtool"
    int8_head = _quantized(source, work, "int8") / "formats" / "hubtool"
    (gguf,) = (run / "formats" / "gguf_q4_0").glob("*.gguf")
    rows = {}
    for name, path, kind, env in (
        ("bf16", bf16, "bf16", {}),
        ("hubtool int4, norms unfused", export, "int4", {"HUBTOOL_FUSED_NORMS": "0"}),
        ("hubtool int4", export, "int4", {}),
        ("hubtool int4 compiled", export, "int4-compiled", {}),
        ("hubtool int4, int8 head", int8_head, "int4", {}),
        ("hubtool int4, int8 head, compiled", int8_head, "int4-compiled", {}),
    ):
        print(f"  {label}: {name}", flush=True)
        rows[name] = _child(Path(path), kind, args.new_tokens, args.threads, **env)
    print(f"  {label}: llama.cpp", flush=True)
    rows["llama.cpp Q4_0"] = _decode_tps(
        bin_dir, gguf, args.new_tokens, args.threads, work / "llama-bench.log"
    )
    return {"model": label, "new_tokens": args.new_tokens, "threads": args.threads, "rows": rows}


def print_decode(r: dict) -> None:
    """One table per model: tokens/s, and ratios against bf16 and llama.cpp."""
    rows = r["rows"]
    base, lcpp = rows["bf16"]["tokens_per_s"], rows["llama.cpp Q4_0"]["tokens_per_s"]
    print(f"\n== decode: {r['model']}, batch 1, {r['new_tokens']} new tokens, {r['threads']} threads ==")
    print(f"{'':<30} {'tok/s':>8} {'/ bf16':>7} {'/ llama.cpp':>12}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<30} failed: {row['error']}")
            continue
        tps = row["tokens_per_s"]
        print(f"{name:<30} {tps:>8.2f} {tps / base:>7.2f} {tps / lcpp:>12.2f}")


def main() -> int:
    """Command line."""
    from bench_gguf import llama_cpp_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gemma3-270m,smollm2-135m", help="pypi: models (comma-separated)")
    ap.add_argument("--shape", type=Path, help="also a shaped model folder (scripts/make_shaped.py)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    bin_dir = llama_cpp_dir() / "build" / "bin"
    results = {}
    for alias in [m.strip() for m in args.models.split(",") if m.strip()]:
        results[alias] = bench(alias, f"pypi:{alias}", None, args, bin_dir)
        print_decode(results[alias])
    if args.shape:
        results[args.shape.name] = bench(args.shape.name, str(args.shape), args.shape, args, bin_dir)
        print_decode(results[args.shape.name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
