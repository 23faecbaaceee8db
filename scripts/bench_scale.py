"""`make bench` part ``scale`` (issue 18): quantize, load and decode a random-weight model of a published shape.

    python scripts/bench_scale.py [--big] [--json OUT] [--cache DIR]

On the Llama-3.2-3B shape (and Llama-3.1-8B with ``--big``), written once by ``scripts/make_shaped.py``
into ``--cache``, it measures in one run, each step in a fresh child process:

* wall time and peak RSS of ``hubtool quantize`` with ``--method rtn``, ``--method opt-rtn`` and SignRound
  with ``--iters 2 --nsamples 4 --seqlen 128`` (a smoke figure per block), as a share of the 16-bit
  model's size, above the interpreter's own baseline (the same imports, the architecture's modeling code
  included, nothing loaded);
* time and peak RSS of loading the int4 export (``hubtool.load`` and a first one-token forward, which
  reads every weight and builds the kernels' layouts) against its size on disk;
* decode tokens/s at batch 1 (64 new tokens, greedy) of the int4 model on the ``hubtool`` kernels and of the
  16-bit model, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")
CACHE = Path(os.environ.get("HUBTOOL_BENCH_CACHE", Path.home() / ".cache" / "hubtool-bench"))
SIGNROUND = [
    "--method",
    "signround",
    "--iters",
    "2",
    "--nsamples",
    "4",
    "--seqlen",
    "128",
    "--batch-size",
    "4",
]
OPT_RTN = ["--method", "opt-rtn", "--nsamples", "32", "--seqlen", "512", "--batch-size", "8"]


def _child(code: str, *args: str, cgroup: Path | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (sys.argv[1:] = args), inside the cgroup v1 memory group
    ``cgroup`` if given; return its JSON line plus wall s and peak RSS (and the group's peak usage)."""
    wrapper = (
        "import json, resource, sys, time\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        "out = dict(globals().get('RESULT') or {})\n"
        "out['wall_s'] = time.perf_counter() - t0\n"
        "out['peak_rss'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print('BENCH ' + json.dumps(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", wrapper, *args]
    if cgroup is not None:
        (cgroup / "memory.max_usage_in_bytes").write_text("0")
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"benchmark step failed ({done.returncode}):\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("BENCH ")][-1]
    out = json.loads(line[6:])
    if cgroup is not None:
        out["cgroup_peak"] = int((cgroup / "memory.max_usage_in_bytes").read_text())
    return out


def memory_group(limit_gib: float) -> Path:
    """A cgroup v1 memory group limited to ``limit_gib`` GiB (swap included where it can be), for quantize."""
    group = Path("/sys/fs/cgroup/memory") / f"hubtool-bench-{os.getpid()}"
    group.mkdir()
    limit = str(int(limit_gib * 2**30))
    (group / "memory.limit_in_bytes").write_text(limit)
    if (group / "memory.memsw.limit_in_bytes").is_file():
        (group / "memory.memsw.limit_in_bytes").write_text(limit)
    return group


# What every step imports, nothing loaded: torch, transformers, hubtool, and the architecture's modeling code
# (importing it brings torch._dynamo, sympy and pandas along: about 0.2 GiB that no weight accounts for).
BASELINE = """
import sys, torch, transformers, hubtool.cli
from transformers import AutoConfig, AutoModelForCausalLM
AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(sys.argv[1]))]
"""
QUANTIZE = """
import sys
from hubtool.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:  # the CLI exits with its status
    assert not exc.code, exc.code
"""
LOAD = """
import sys, torch, hubtool
m = hubtool.load(sys.argv[1], dtype=torch.bfloat16)
with torch.inference_mode():  # one token: every layer's weights read and in its kernel's layout
    m(input_ids=torch.tensor([[1]]))
"""
DECODE = """
import statistics, sys, time, torch
from transformers import AutoTokenizer
import hubtool
path, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "int4":
    model = hubtool.load(path, dtype=torch.bfloat16)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
tok = AutoTokenizer.from_pretrained(path)
ids = tok("The history of the Python programming language", return_tensors="pt")
model.generation_config.eos_token_id = None  # exactly n tokens, with no vocabulary-wide min-length processor
times = []
with torch.inference_mode():
    model.generate(**ids, max_new_tokens=4, do_sample=False)
    for _ in range(2):
        t0 = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
        times.append(time.perf_counter() - t0)
        assert out.shape[1] == ids["input_ids"].shape[1] + n, out.shape
RESULT = {"tokens_per_s": n / statistics.median(times)}
"""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def shaped(preset: str, cache: Path) -> Path:
    """The shaped model folder, written once (make_shaped.py) and reused."""
    out = cache / preset
    if not (out / "model.safetensors.index.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_shaped.py"), preset, str(out)], check=True
        )
    return out


METHODS = {"rtn": ["--method", "rtn"], "opt-rtn": OPT_RTN, "signround-smoke": SIGNROUND}


def bench_shape(
    preset: str, cache: Path, work: Path, new_tokens: int, methods: list[str], cgroup: Path | None = None
) -> dict:
    """Every figure of the scale part on one shape (quantize with each of ``methods``; rtn always)."""
    model = shaped(preset, cache)
    size16 = _dir_bytes(model)
    base = _child(BASELINE, str(model))["peak_rss"]
    out: dict = {"shape": preset, "bf16_bytes": size16, "baseline_rss": base, "quantize": {}}
    for name in ["rtn"] + [m for m in methods if m != "rtn"]:
        args = METHODS[name]
        run = work / name
        r = _child(
            QUANTIZE, "quantize", str(model), "-o", str(run), "--formats", "hubtool", *args, cgroup=cgroup
        )
        above = r["peak_rss"] - base
        out["quantize"][name] = {
            "wall_s": r["wall_s"],
            "peak_rss": r["peak_rss"],
            "above_baseline": above,
            "share_of_bf16": above / size16,
            "cgroup_peak": r.get("cgroup_peak"),
        }
        print(
            f"  {preset} quantize {name}: {r['wall_s']:.0f} s, +{above / 2**30:.2f} GiB ({above / size16:.1%})"
        )
        if name != "rtn":
            shutil.rmtree(run, ignore_errors=True)
    export = work / "rtn" / "formats" / "hubtool"
    disk = _dir_bytes(export)
    r = _child(LOAD, str(export))
    out["load_int4"] = {
        "wall_s": r["wall_s"],
        "peak_rss": r["peak_rss"],
        "disk_bytes": disk,
        "rss_over_disk": (r["peak_rss"] - base) / disk,
    }
    tps = {
        kind: _child(DECODE, str(path), kind, str(new_tokens))["tokens_per_s"]
        for kind, path in (("int4", export), ("bf16", model))
    }
    out["decode"] = {**tps, "int4_over_bf16": tps["int4"] / tps["bf16"], "new_tokens": new_tokens}
    shutil.rmtree(work / "rtn", ignore_errors=True)
    return out


def print_scale(r: dict) -> None:
    """Print one shape's figures, as ratios."""
    gb = 2**30
    print(
        f"\n== scale: {r['shape']} (random weights, bf16 {r['bf16_bytes'] / gb:.2f} GiB; baseline RSS {r['baseline_rss'] / gb:.2f} GiB) =="
    )
    if r.get("memory_limit_gib"):
        print(f"quantize ran inside a cgroup memory limit of {r['memory_limit_gib']:g} GiB")
    for name, q in r["quantize"].items():
        print(
            f"quantize {name:16s} {q['wall_s']:7.0f} s  peak RSS {q['peak_rss'] / gb:5.2f} GiB  "
            f"above baseline {q['above_baseline'] / gb:5.2f} GiB = {q['share_of_bf16']:.1%} of the bf16 model"
            + (f"  (cgroup peak {q['cgroup_peak'] / gb:.2f} GiB)" if q.get("cgroup_peak") else "")
        )
    ld = r["load_int4"]
    print(
        f"load int4 export + one token: {ld['wall_s']:.1f} s, peak RSS above baseline {ld['rss_over_disk']:.2f}x its "
        f"{ld['disk_bytes'] / gb:.2f} GiB on disk"
    )
    d = r["decode"]
    print(
        f"decode ({d['new_tokens']} tokens, batch 1): int4[hubtool] {d['int4']:.2f} tok/s  bf16 {d['bf16']:.2f} "
        f"tok/s  ratio {d['int4_over_bf16']:.2f}x"
    )


def run(
    big: bool,
    cache: Path,
    new_tokens: int = 64,
    methods: list[str] | None = None,
    memory_limit: float | None = None,
    only_big: bool = False,
) -> dict:
    """The scale part: the 3B shape, and the 8B shape with ``big`` (only it with ``only_big``); quantize
    runs inside a cgroup v1 limit of ``memory_limit`` GiB when given (root)."""
    methods = methods or list(METHODS)
    results = {}
    presets = ([] if only_big else ["llama-3.2-3b"]) + (["llama-3.1-8b"] if big or only_big else [])
    group = memory_group(memory_limit) if memory_limit else None
    try:
        for preset in presets:
            work = Path(tempfile.mkdtemp(prefix="hubtool-scale-"))
            try:
                results[preset] = bench_shape(preset, cache, work, new_tokens, methods, group)
                results[preset]["memory_limit_gib"] = memory_limit
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print_scale(results[preset])
    finally:
        if group is not None:
            group.rmdir()
    return results


def main() -> int:
    """Command line: run the scale part and print (and optionally write) its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", action="store_true", help="also the Llama-3.1-8B shape (16 GB on disk)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the shaped models are kept")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS), help="quantize methods to time (rtn always)")
    ap.add_argument("--only-big", action="store_true", help="the Llama-3.1-8B shape alone")
    ap.add_argument(
        "--memory-limit", type=float, help="quantize inside a cgroup v1 limit of this many GiB (root)"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}: use {', '.join(METHODS)}")
    results = run(args.big, args.cache, args.new_tokens, methods, args.memory_limit, args.only_big)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
