"""The verify stage: load each exported format with the library its users load it with, and check it.

For every (variant, format) of a run, each loader of ``LOADERS[format]`` loads the format's folder as its
users would (``auto_round``: transformers + auto-round; ``auto_gptq``: transformers + GPTQModel, in an
environment of its own when GPTQModel cannot share this one; ``hubtool``: transformers after
``import hubtool``, and ``hubtool.load``). On fixed prompts (text, plus an image prompt for a VLM) it checks:

* ``modules``: the layers the loaded model computes in int4 are exactly the record's list (a layer a
  loader leaves 16-bit, or one it quantizes unasked, fails);
* ``logits``: every next-token position's logits against hubtool's int4 reference (below), computed in
  the dtype the loaded model computes in: max relative error within ``REL_ERROR_BOUNDS`` and the same
  top-1 token wherever the reference's top-1 leads clearly (``decisive``);
* ``generate``: greedy generation of ``NEW_TOKENS`` tokens runs.

The int4 reference is hubtool's own: the first exported format (``hubtool`` first) that hubtool's loader
reads with exactly the record's int4 layers and the record's group size, every int4 layer replaced by a
dense layer holding its weight dequantized in fp32 by ``core.packing`` (``runtime.hf_quantizer.dequantize_int4``:
the fake-quantized model), computing with ``F.linear``. Each result (library and version, device, figures,
pass or fail and the failing check) goes into ``run.json`` (``RunRecord.verify``); ``hub.upload`` refuses a
format without a passing result for its current files. A new format (e.g. GGUF) adds its loaders to
``LOADERS``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import record as rec
from ..__about__ import __version__
from ..core.lmhead import HEAD_FORMAT, head_name
from ..errors import HubtoolError
from ..formats.table import FORMATS
from . import verify_child
from .verify_gguf import gguf_file, load_gguf_model, run_llama_cpp

log = logging.getLogger(__name__)

NEW_TOKENS = 4
TEXT_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    if n < 2:")
IMAGE_PROMPT = "Describe this picture in one sentence."
# Max |logits - reference| / max |reference logits|, by the dtype the loaded model computes in. The weights
# are the same numbers on both sides (a broken tensor moves logits by far more: see tests/test_verify.py);
# what differs is arithmetic. fp32: summation order only (auto-round on a CPU without AVX512-BF16 casts the
# model to fp32; measured 1e-6 on the tiny models). bf16: the loaded model rounds every activation to bf16
# and its int4 kernel (torch's _weight_int4pack_mm, GPTQModel's aten kernel, auto-round's dequantize +
# matmul) sums in its own order and rounds its bf16 weight or output differently from the reference's
# F.linear; one bf16 ulp of the largest logit is 2**-7 (tests/test_autoround_interop.py measured exactly
# that on the tiny models), and the bound allows a few ulps gathered over the layers of a real model:
# measured on Gemma 3 270M (18 layers, RTN, make bench's verify part) 2.9e-2 with auto-round, 2.1e-2 with
# GPTQModel and hubtool; a dropped qweight moved the tiny models' logits by 0.16-0.23.
REL_ERROR_BOUNDS = {"float32": 1e-3, "bfloat16": 0.04, "float16": 0.01}
# A position is decisive when the reference's top-1 logit leads its second by more than both sides may
# move (twice the bound, relative to the largest logit): there the top-1 token must be the same.
DECISIVE_MARGIN = 2.0
GPTQ_PYTHON_ENV = "HUBTOOL_GPTQ_PYTHON"  # the interpreter of an environment with GPTQModel
GPTQ_VENV = ".venv-gptq"  # `make setup` makes it beside .venv
CHILD_TIMEOUT_S = 900


@dataclass(frozen=True)
class Loader:
    """One way users load a format: the library recorded, the distribution whose version is recorded."""

    library: str
    dist: str
    run: Callable[[Loader, dict[str, Any]], dict[str, Any]]
    needs: tuple[str, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    import_hubtool: bool = False


def _in_process(loader: Loader, job: dict[str, Any]) -> dict[str, Any]:
    """transformers' from_pretrained in this process (verify_child.run)."""
    job = {**job, **_job_fields(loader)}
    return verify_child.run(job)


def _hubtool_load(loader: Loader, job: dict[str, Any]) -> dict[str, Any]:
    """``hubtool.load`` (the runtime's loader, kernel chosen per call)."""
    from safetensors.torch import load_file

    from ..runtime.loader import load_quantized

    result: dict[str, Any] = {"library": loader.library, "version": __version__, "device": "cpu"}
    try:
        model = load_quantized(job["folder"])
    except HubtoolError as exc:
        result["error"] = ["load", exc.message]
        return result
    prompts = verify_child.split_inputs(load_file(job["inputs"]))
    return verify_child.measure(model, prompts, job["new_tokens"], result)


def gptq_python() -> str | None:
    """The Python of an environment with GPTQModel: $HUBTOOL_GPTQ_PYTHON, this one, or ``.venv-gptq``."""
    import importlib.util

    if os.environ.get(GPTQ_PYTHON_ENV):
        return os.environ[GPTQ_PYTHON_ENV]
    if importlib.util.find_spec("gptqmodel") is not None:
        return sys.executable
    beside = Path(sys.prefix).parent / GPTQ_VENV / "bin" / "python"
    return str(beside) if beside.is_file() else None


def _gptqmodel(loader: Loader, job: dict[str, Any]) -> dict[str, Any]:
    """transformers + GPTQModel in its own environment (a subprocess); hubtool.load where there is none."""
    python = gptq_python()
    if python is None:
        out = _hubtool_load(HUBTOOL_LOAD, job)
        out["detail"] = "GPTQModel not installed here: loaded with hubtool.load instead"
        return out
    job = {**job, **_job_fields(loader), "out": str(Path(job["inputs"]).with_suffix("")) + ".gptq"}
    job_path = Path(job["out"] + ".job.json")
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    try:
        done = subprocess.run(
            [python, str(Path(verify_child.__file__)), str(job_path)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"library": loader.library, "version": "?", "device": "cpu", "error": ["load", str(exc)]}
    out_json = Path(job["out"] + ".json")
    if done.returncode != 0 or not out_json.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"library": loader.library, "version": "?", "device": "cpu", "error": ["load", tail]}
    from safetensors.torch import load_file

    result = json.loads(out_json.read_text(encoding="utf-8"))
    result["logits"] = load_file(job["out"] + ".safetensors")
    return result


def _job_fields(loader: Loader) -> dict[str, Any]:
    return {
        "library": loader.library,
        "dist": loader.dist,
        "needs": list(loader.needs),
        "kwargs": dict(loader.kwargs),
        "import_hubtool": loader.import_hubtool,
    }


HUBTOOL_LOAD = Loader("hubtool.load", "hubtool", _hubtool_load)
LOADERS: dict[str, tuple[Loader, ...]] = {
    "auto_round": (Loader("auto-round", "auto-round", _in_process, needs=("auto-round",)),),
    "auto_gptq": (Loader("gptqmodel", "gptqmodel", _gptqmodel, needs=("gptqmodel", "optimum")),),
    "hubtool": (Loader("transformers", "transformers", _in_process, import_hubtool=True), HUBTOOL_LOAD),
    "gguf_q4_0": (Loader("llama.cpp", "llama-cpp-python", run_llama_cpp),),
    "gguf_q4_k_m": (Loader("llama.cpp", "llama-cpp-python", run_llama_cpp),),
}
REFERENCE_ORDER = ("hubtool", "auto_round", "auto_gptq")
GGUF_LOADERS = ("gguf_q4_0", "gguf_q4_k_m")  # formats whose folder is one .gguf file (no config.json)


# -- the int4 reference ----------------------------------------------------------------------------
@dataclass
class Reference:
    """hubtool's fake-quantized model of one variant (fp32), and its logits per compute dtype."""

    format: str
    model: Any
    processor: Any
    expected: list[str]
    logits: dict[str, list[torch.Tensor]]

    def logits_in(self, dtype: str, prompts: list[dict[str, Any]]) -> list[torch.Tensor]:
        """The reference's logits for each prompt, computed in ``dtype`` (cached)."""
        if dtype not in self.logits:
            model = self.model if dtype == "float32" else copy.deepcopy(self.model).to(getattr(torch, dtype))
            with torch.inference_mode():
                self.logits[dtype] = [model(**_cast(p, model)).logits[0].float() for p in prompts]
        return self.logits[dtype]


def _cast(inputs: dict[str, Any], model: Any) -> dict[str, Any]:
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}


def _group_size(folder: Path) -> Any:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return (cfg.get("quantization_config") or {}).get("group_size")
    except (OSError, ValueError, AttributeError):
        return None


def stores_quantized_head(record: rec.RunRecord, fmt_name: str) -> bool:
    """Whether this format of the run stores the lm_head quantized (``--quantize-lm-head``: hubtool only)."""
    return bool(record.spec.get("quantize_lm_head")) and fmt_name == HEAD_FORMAT


def build_reference(
    record: rec.RunRecord, run_dir: Path, variant: rec.VariantRecord, quantized_head: bool = False
) -> Reference:
    """The fake-quantized fp32 model from the first format hubtool reads with the record's int4 layers.

    ``quantized_head``: the reference of the format that stores the lm_head quantized (its head dequantized
    too, and listed among the quantized modules); otherwise only formats with the 16-bit head serve.
    """
    from ..runtime.hf_quantizer import dequantize_int4
    from ..runtime.int4linear import Int4Linear
    from ..runtime.int8linear import Int8Linear
    from ..runtime.loader import load_processor, load_quantized

    expected = sorted(variant.quantized)
    order = sorted(
        variant.formats, key=lambda f: REFERENCE_ORDER.index(f.name) if f.name in REFERENCE_ORDER else 9
    )
    order = [f for f in order if stores_quantized_head(record, f.name) == quantized_head]
    why = []
    for fmt in order:
        folder = Path(run_dir) / fmt.path
        if _group_size(folder) not in (None, record.spec.get("group_size")):
            why.append(f"{fmt.name}: group_size differs from the record's")
            continue
        try:
            model = load_quantized(folder, backend="reference", dtype=torch.float32)
        except HubtoolError as exc:
            why.append(f"{fmt.name}: {exc.message}")
            continue
        listed = sorted([*expected, head_name(model)]) if quantized_head else expected  # the head: one more
        built = sorted(n for n, m in model.named_modules() if isinstance(m, Int4Linear | Int8Linear))
        if built != listed:
            why.append(f"{fmt.name}: its int4 layers differ from the record's")
            continue
        dequantize_int4(model, torch.float32)
        log.info("int4 reference: %s's codes, dequantized in fp32", fmt.name)
        return Reference(fmt.name, model.eval(), load_processor(folder), listed, {})
    gguf_ref = _gguf_reference(run_dir, order, expected)
    if gguf_ref is not None:
        return gguf_ref
    raise HubtoolError(
        f"no format of variant {variant.name!r} gives hubtool's int4 reference ({'; '.join(why)})",
        "re-run `hubtool quantize --overwrite`",
    )


def _gguf_reference(
    run_dir: Path, formats: Sequence[rec.FormatRecord], expected: list[str]
) -> Reference | None:
    """A GGUF-only variant's reference: the file's codes dequantized in fp32 by transformers' GGUF reader
    (fp16 scale times code, exact in fp32; the reader undoes the converter's permutations and shifts)."""
    for fmt in formats:
        path = gguf_file(Path(run_dir) / fmt.path) if fmt.name in GGUF_LOADERS else None
        if path is None:
            continue
        model, tok = load_gguf_model(path, torch.float32)
        log.info("int4 reference: %s's codes, dequantized in fp32 by transformers' GGUF reader", fmt.name)
        return Reference(fmt.name, model, tok, expected, {})
    return None


def prompt_inputs(reference: Reference, is_vlm: bool) -> list[dict[str, Any]]:
    """The fixed prompts as model inputs (batch of one each): the text prompts, then an image prompt (VLM)."""
    from .compare import LoadedRef, render_prompt

    proc = reference.processor
    tok = getattr(proc, "tokenizer", proc)
    out = [dict(tok(t, return_tensors="pt")) for t in TEXT_PROMPTS]
    if is_vlm:
        from PIL import Image

        from ..assets import default_image_path

        lm = LoadedRef(None, None, proc, True)  # type: ignore[arg-type]
        text = render_prompt(lm, IMAGE_PROMPT, None, has_image=True)
        with Image.open(default_image_path()) as im:
            image = im.convert("RGB")
        out.append(dict(proc(text=[text], images=[image], return_tensors="pt")))
    return [{k: v for k, v in p.items() if isinstance(v, torch.Tensor)} for p in out]


def config_mismatch(folder: Path, spec: dict[str, Any]) -> str | None:
    """What the format's config.json quantization_config says otherwise than the record (bits, group size, sym)."""
    try:
        qc = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError) as exc:
        return f"config.json cannot be read ({exc})"
    diffs = [
        f"{key} {qc.get(key)!r} (record: {spec[key]!r})"
        for key in ("bits", "group_size", "sym")
        if key in spec and key in qc and qc[key] != spec[key]
    ]
    if qc.get("quant_method") == FORMATS[HEAD_FORMAT].quant_method and qc.get("lm_head") != spec.get(
        "quantize_lm_head"
    ):
        diffs.append(f"lm_head {qc.get('lm_head')!r} (record: {spec.get('quantize_lm_head')!r})")
    return "config.json says " + ", ".join(diffs) if diffs else None


# -- one check -------------------------------------------------------------------------------------
def compare_logits(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], bound: float) -> dict[str, Any]:
    """Relative error, top-1 agreement (all positions and decisive ones) of ``got`` against ``want``."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
        return {"ok": False, "why": "logits have another shape than the reference's"}
    if not all(bool(torch.isfinite(g).all()) for g in got):
        return {"ok": False, "why": "the logits hold NaN or infinity (a layer computed from missing weights)"}
    err, scale, same, n, dec_same, dec_n = 0.0, 0.0, 0, 0, 0, 0
    for g, w in zip(got, want, strict=True):
        g, w = g.reshape(-1, g.shape[-1]).float(), w.reshape(-1, w.shape[-1]).float()
        err = max(err, (g - w).abs().max().item())
        scale = max(scale, w.abs().max().item())
    for g, w in zip(got, want, strict=True):
        g, w = g.reshape(-1, g.shape[-1]).float(), w.reshape(-1, w.shape[-1]).float()
        agree = g.argmax(-1) == w.argmax(-1)
        top2 = w.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > DECISIVE_MARGIN * bound * scale
        same += int(agree.sum())
        n += agree.numel()
        dec_same += int((agree & decisive).sum())
        dec_n += int(decisive.sum())
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    top1 = same / n if n else 1.0
    decisive_top1 = dec_same / dec_n if dec_n else 1.0
    ok = rel <= bound and decisive_top1 == 1.0 and torch.isfinite(torch.tensor(rel)).item()
    why = None
    if not ok:
        why = f"max relative error {rel:.3g} (bound {bound:g}), top-1 {top1:.3f}, decisive top-1 {decisive_top1:.3f}"
    return {"ok": ok, "rel": rel, "top1": top1, "decisive_top1": decisive_top1, "positions": n, "why": why}


def changed_files(fmt: rec.FormatRecord, folder: Path) -> str | None:
    """The first file of a format (relative to its folder) whose bytes are not those run.json recorded:
    changed, missing or added since quantize; None when all are as recorded."""
    root = Path(folder)
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    for f in fmt.files:
        rel = Path(f.path).relative_to(fmt.path).as_posix()
        path = root / rel
        if not path.is_file() or path.stat().st_size != f.size or rec.sha256_file(path) != f.sha256:
            return rel
        present.discard(rel)
    return sorted(present)[0] if present else None


def check_format(
    loader: Loader,
    variant: rec.VariantRecord,
    fmt: rec.FormatRecord,
    folder: Path,
    reference: Reference,
    prompts: list[dict[str, Any]],
    inputs_file: Path,
    model_class: str,
    spec: dict[str, Any],
) -> rec.VerifyResult:
    """Load ``folder`` with ``loader`` and run every check; the result names the first one that failed."""
    t0 = time.perf_counter()
    job = {
        "folder": str(folder),
        "model_class": model_class,
        "inputs": str(inputs_file),
        "new_tokens": NEW_TOKENS,
    }
    out = loader.run(loader, job)
    res = rec.VerifyResult(
        variant=variant.name,
        format=fmt.name,
        library=out.get("library", loader.library),
        version=out.get("version", "?"),
        device=out.get("device", "cpu"),
        passed=False,
        detail=out.get("detail"),
        reference=reference.format,
        dtype=out.get("dtype"),
        expected_modules=len(reference.expected),
        files=rec.format_fingerprint(fmt),
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    failed: list[tuple[str, str]] = []
    wrong = None if fmt.name in GGUF_LOADERS else config_mismatch(folder, spec)
    if wrong:
        failed.append(("config", wrong))
    if "error" in out and out["error"][0] in ("library", "load"):
        failed.append(tuple(out["error"]))  # type: ignore[arg-type]
    else:
        built = set(out.get("modules", []))
        want = set(reference.expected)
        res.int4_modules = len(built)
        res.missing_modules = sorted(want - built)[:8]
        res.extra_modules = sorted(built - want)[:8]
        if built != want:
            failed.append(
                (
                    "modules",
                    f"{len(want - built)} listed layer(s) not int4 (e.g. {(res.missing_modules or ['-'])[0]}), "
                    f"{len(built - want)} unlisted int4 layer(s)",
                )
            )
        logits = out.get("logits")
        if logits:
            got = [logits[str(i)] for i in range(len(logits))] if isinstance(logits, dict) else logits
            dtype = res.dtype or "bfloat16"
            bound = out.get("bound") or REL_ERROR_BOUNDS.get(dtype, REL_ERROR_BOUNDS["bfloat16"])
            cmp = compare_logits(got, reference.logits_in(dtype, prompts), bound)
            res.rel_error_bound = bound
            res.max_rel_error = cmp.get("rel")
            res.top1_agreement = cmp.get("top1")
            res.decisive_top1 = cmp.get("decisive_top1")
            res.positions = cmp.get("positions", 0)
            if not cmp["ok"]:
                failed.append(("logits", cmp["why"]))
        if "error" in out:
            failed.append(tuple(out["error"]))  # type: ignore[arg-type]
        res.generated_tokens = int(out.get("generated", 0))
        if "error" not in out and res.generated_tokens < 1:
            failed.append(("generate", "generated no token"))
    changed = changed_files(fmt, folder)
    if changed:  # last: a check above says what the change broke, when one sees it
        failed.append(("files", f"{changed} differs from the sha256 run.json recorded at quantize time"))
    if failed:
        res.failed_check, why = failed[0]
        res.detail = why
    res.passed = not failed
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


# -- the stage -------------------------------------------------------------------------------------
def run_verify(
    run_dir: Path,
    *,
    formats: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    on_result: Callable[[rec.VerifyResult], None] | None = None,
) -> list[rec.VerifyResult]:
    """Verify every (or the chosen) format of every (or the chosen) variant; results go into run.json."""
    from transformers import AutoConfig

    from ..source import auto_model_class

    run_dir = Path(run_dir)
    record = rec.load(run_dir)
    chosen = [v for v in record.variants if not variants or v.name in variants]
    if variants:
        for name in variants:
            record.variant(name)
    results: list[rec.VerifyResult] = []
    for variant in chosen:
        fmts = [f for f in variant.formats if not formats or f.name in formats]
        if not fmts:
            continue
        first = next((f for f in fmts if f.name not in GGUF_LOADERS), None)
        if first is not None:
            model_class = auto_model_class(AutoConfig.from_pretrained(run_dir / first.path)).__name__
        else:  # only GGUF asked: llama.cpp needs no class
            model_class = "AutoModelForCausalLM"
        # formats with the 16-bit head against one reference, a format storing the head quantized against
        # another (built one at a time)
        for quantized_head in (False, True):
            group = [f for f in fmts if stores_quantized_head(record, f.name) == quantized_head]
            if group:
                results += _verify_group(
                    record, run_dir, variant, group, quantized_head, model_class, on_result
                )
    record = rec.load(run_dir)  # as it is now
    keys = {(r.variant, r.format) for r in results}
    record.verify = [r for r in record.verify if (r.variant, r.format) not in keys] + results
    rec.save(record, run_dir)
    return results


def _verify_group(
    record: rec.RunRecord,
    run_dir: Path,
    variant: rec.VariantRecord,
    fmts: list[rec.FormatRecord],
    quantized_head: bool,
    model_class: str,
    on_result: Callable[[rec.VerifyResult], None] | None,
) -> list[rec.VerifyResult]:
    """Verify ``fmts`` of ``variant`` against the one reference they share."""
    results: list[rec.VerifyResult] = []
    try:
        reference = build_reference(record, run_dir, variant, quantized_head)
    except HubtoolError as exc:
        return [_no_reference(variant, f, exc.message) for f in fmts]
    prompts = prompt_inputs(reference, record.source.is_vlm)
    with tempfile.TemporaryDirectory(prefix="hubtool-verify-") as tmp:
        from safetensors.torch import save_file

        inputs_file = Path(tmp) / "inputs.safetensors"
        save_file(
            {f"{i}.{k}": v.contiguous() for i, p in enumerate(prompts) for k, v in p.items()}, inputs_file
        )
        for f in fmts:
            for loader in LOADERS.get(f.name, (HUBTOOL_LOAD,)):
                log.info("verifying %s (%s) with %s", f.name, variant.name, loader.library)
                r = check_format(
                    loader,
                    variant,
                    f,
                    run_dir / f.path,
                    reference,
                    prompts,
                    inputs_file,
                    model_class,
                    record.spec,
                )
                _log(r)
                results.append(r)
                if on_result is not None:
                    on_result(r)
    reference.model = None
    return results


def _no_reference(variant: rec.VariantRecord, fmt: rec.FormatRecord, why: str) -> rec.VerifyResult:
    return rec.VerifyResult(
        variant.name,
        fmt.name,
        library="hubtool",
        version=__version__,
        device="cpu",
        passed=False,
        failed_check="reference",
        detail=why,
        files=rec.format_fingerprint(fmt),
        at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _log(r: rec.VerifyResult) -> None:
    figures = (
        f"top-1 {r.top1_agreement:.3f}, max rel. error {r.max_rel_error:.2e} (bound {r.rel_error_bound:g})"
        if r.max_rel_error is not None
        else "no logits"
    )
    state = "passed" if r.passed else f"FAILED {r.failed_check}: {r.detail}"
    log.info(
        "verify %s (%s) with %s %s on %s: %s; int4 layers %d/%d; %d tokens generated; %.1f s",
        r.format, r.variant, r.library, r.version, r.device, state, r.int4_modules, r.expected_modules,
        r.generated_tokens, r.seconds,
    )  # fmt: skip
    log.debug("verify figures: %s", figures)


def problems(record: rec.RunRecord, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """One line per (variant, format) that may not be uploaded: the format and the failing check."""
    out = []
    for variant, fmt in pairs:
        why = rec.verify_problem(record, variant, fmt)
        if why:
            out.append(f"{fmt} ({variant}): {why}")
    return out
