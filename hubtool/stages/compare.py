"""The compare stage: the same prompts, greedy, on the 16-bit source and on every int4 variant.

Each int4 variant is loaded back from its export (the ``hubtool`` format when there is one, else its
first format), never reused from memory, so the answers are those a user of the published files gets.
Outputs, token counts, speed and agreement with the 16-bit answer go into ``run.json``.

This module also holds what compare and evaluate share: which models a run has (:func:`model_refs`),
loading one (:func:`load_model`), chat formatting and batched greedy generation (:func:`generate`).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import record
from ..core.lmhead import HEAD16_SUFFIX, HEAD_FORMAT
from ..errors import HubtoolError
from ..record import source_label
from .metrics import token_agreement
from .prompts import Prompt, default_prompts, load_prompts
from .verify_gguf import gguf_file, load_gguf_model

log = logging.getLogger(__name__)

PREFERRED_FORMAT = "hubtool"
IMAGES_DIR = "compare"


# -- progress --------------------------------------------------------------------------------------


@dataclass
class StageProgress:
    """Reported by compare and eval: which model and task, how many items of how many are done."""

    stage: str  # "compare" | "eval"
    model: str
    task: str
    done: int
    total: int
    status: str = "running"  # "loading" | "running" | "cached" | "done"


ProgressFn = Callable[[StageProgress], None]


def _notify(progress: ProgressFn | None, *args: Any, **kwargs: Any) -> None:
    if progress is not None:
        progress(StageProgress(*args, **kwargs))


# -- the models of a run ---------------------------------------------------------------------------


@dataclass
class ModelRef:
    """One model of a run: the 16-bit source or an int4 variant (by the export it is loaded back from)."""

    label: str  # "bf16" (or the source dtype's name) or the variant name
    kind: str  # "source" | "variant" | "head16" (a variant with its quantized lm_head put back to 16 bits)
    path: Path | None = None  # the variant's format folder
    format: str | None = None
    fingerprint: str = ""  # changes when the model's files change (invalidates eval caches)


HEAD16 = "head16"


def head16_refs(rec: record.RunRecord, refs: Sequence[ModelRef]) -> list[ModelRef]:
    """For each variant loaded from an export whose lm_head is quantized (``--quantize-lm-head``), the same
    variant with the 16-bit head of the source in its place: what the head's quantization costs."""
    mode = rec.spec.get("quantize_lm_head")
    if not mode:
        return []
    return [
        ModelRef(r.label + HEAD16_SUFFIX, HEAD16, r.path, r.format, r.fingerprint + ":head16")
        for r in refs
        if r.kind == "variant" and r.format == HEAD_FORMAT
    ]


def with_16bit_head(model: Any, rec: record.RunRecord, trust_remote_code: bool = False) -> None:
    """Put the source's 16-bit lm_head in place of ``model``'s quantized one (read from the source's
    checkpoint, the rest of the source left on disk)."""
    from torch import nn

    from ..core.lmhead import head_name
    from ..quant.lmhead import head_rows
    from ..runtime.dense import use_dense_kernel
    from ..source import load_source, parse_dtype

    info = record.from_dict(record.SourceInfo, record.to_dict(rec.source))
    dtype = parse_dtype(rec.source.dtype or "bfloat16")
    skeleton = load_source(info, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code, stream=True)
    name = head_name(skeleton.model)
    weight = torch.cat(list(head_rows(skeleton.model, name)))
    old = model.get_submodule(name)
    device = next(b.device for b in old.buffers())
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = nn.Parameter(weight.to(device), requires_grad=False)
    model.set_submodule(name, head)
    use_dense_kernel(head, getattr(old, "backend", None))


def pick_format(variant: record.VariantRecord) -> record.FormatRecord:
    """The export to load a variant back from: ``hubtool`` when present, else the first one."""
    if not variant.formats:
        raise HubtoolError(f"variant {variant.name!r} has no exported format", "re-run hubtool quantize")
    for f in variant.formats:
        if f.name == PREFERRED_FORMAT:
            return f
    return variant.formats[0]


def model_refs(rec: record.RunRecord, run_dir: Path, variants: Sequence[str] | None = None) -> list[ModelRef]:
    """The 16-bit source followed by the chosen int4 variants (all by default), checked to exist on disk."""
    run_dir = Path(run_dir)
    src = rec.source
    files = []
    if src.kind == "dir":  # a local folder can be re-saved in place: its weight files' sizes and times
        files = [
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(src.name).glob("*.safetensors"))
        ]
    src_fp = json.dumps([src.kind, src.name, src.revision, src.commit, src.sha256, src.dtype, files])
    refs = [ModelRef(source_label(rec), "source", fingerprint=hashlib.sha256(src_fp.encode()).hexdigest())]
    names = [v.name for v in rec.variants]
    wanted = list(variants) if variants else names
    for name in wanted:
        if name not in names:
            raise HubtoolError(f"run has no variant {name!r}", "variants: " + ", ".join(names))
    if not wanted:
        raise HubtoolError(f"{run_dir} has no int4 variant to compare", "re-run hubtool quantize")
    for name in wanted:
        v = rec.variant(name)
        fmt = pick_format(v)
        folder = run_dir / fmt.path
        if not (folder / "config.json").is_file() and gguf_file(folder) is None:
            raise HubtoolError(f"variant {name!r}: export {folder} is missing", "re-run hubtool quantize")
        h = hashlib.sha256()
        for f in fmt.files:
            h.update(f"{f.path}:{f.sha256}\n".encode())
        refs.append(ModelRef(name, "variant", folder, fmt.name, h.hexdigest()))
    return refs


@dataclass
class LoadedRef:
    """A model in memory with its processor (VLM) or tokenizer (text)."""

    ref: ModelRef
    model: Any
    processor: Any
    is_vlm: bool
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    offload: Path | None = None  # where accelerate put what did not fit in memory (removed by unload)

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer (the processor's for a VLM)."""
        return getattr(self.processor, "tokenizer", self.processor)


def load_int4(
    path: Path, device: str, dtype: torch.dtype, trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """Load an exported int4 model and its processor back from its format folder (a GGUF one: its file
    through transformers' GGUF reader, every int4 number dequantized into ``dtype``)."""
    from ..runtime.loader import load_processor, load_quantized

    if not (Path(path) / "config.json").is_file():
        found = gguf_file(Path(path))
        if found is not None:
            log.info("loading %s through transformers' GGUF reader (dequantized to %s)", found.name, dtype)
            model, tok = load_gguf_model(found, dtype)
            return model.to(device), tok

    model = load_quantized(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, load_processor(path, trust_remote_code=trust_remote_code)


def load_model(
    ref: ModelRef, rec: record.RunRecord, device: str = "cpu", trust_remote_code: bool = False
) -> LoadedRef:
    """Load one model of the run for inference (eval mode) on ``device``."""
    from ..source import load_source, parse_dtype

    dtype = parse_dtype(rec.source.dtype or "bfloat16")
    t0 = time.perf_counter()
    offload = None
    if ref.kind == "source":
        log.info("loading the 16-bit source %s (%s)", rec.source.name, rec.source.dtype)
        info = record.from_dict(record.SourceInfo, record.to_dict(rec.source))
        offload = Path(tempfile.mkdtemp(prefix="hubtool-offload-"))  # used only if it does not fit
        loaded = load_source(
            info, dtype=dtype, device=device, trust_remote_code=trust_remote_code, offload=offload
        )
        model, processor = loaded.model, loaded.processor
    else:
        log.info("loading int4 variant %s from %s", ref.label, ref.path)
        model, processor = load_int4(ref.path, device, dtype, trust_remote_code)
        if ref.kind == HEAD16:
            with_16bit_head(model, rec, trust_remote_code)
    model.eval()
    return LoadedRef(ref, model, processor, rec.source.is_vlm, time.perf_counter() - t0, offload=offload)


def unload(lm: LoadedRef | None) -> None:
    """Drop a model and give its memory back."""
    if lm is None:
        return
    lm.model = None
    gc.collect()
    if lm.offload is not None:
        shutil.rmtree(lm.offload, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- chat formatting and generation ----------------------------------------------------------------


def _messages(text: str, system: str | None, has_image: bool, vlm: bool) -> list[dict]:
    msgs: list[dict] = []
    if system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}] if vlm else system})
    if vlm:
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
        msgs.append({"role": "user", "content": content})
    else:
        msgs.append({"role": "user", "content": text})
    return msgs


def render_prompt(lm: LoadedRef, text: str, system: str | None = None, has_image: bool = False) -> str:
    """The prompt string the model sees: the processor/tokenizer's chat template, or plain text without one."""
    holder = lm.processor if getattr(lm.processor, "chat_template", None) else lm.tokenizer
    if getattr(holder, "chat_template", None):
        for sys_text in (system, None):  # some templates refuse a system turn: fold it into the user turn
            user = text if sys_text or not system else f"{system}\n\n{text}"
            try:
                return holder.apply_chat_template(
                    _messages(user, sys_text, has_image, lm.is_vlm),
                    tokenize=False,
                    add_generation_prompt=True,
                )
            except Exception as exc:  # jinja raises its own TemplateError for a refused role
                if sys_text is None:
                    raise HubtoolError(f"the chat template failed: {exc}".splitlines()[0]) from None
                log.debug("chat template refused a system turn (%s); folding it into the user turn", exc)
    body = f"{system}\n\n{text}" if system else text
    if has_image:
        token = getattr(lm.processor, "image_token", None) or "<image>"
        body = f"{token}\n{body}"
    return body


def _encode(lm: LoadedRef, prompts: list[str], images: list[Any] | None, device: Any) -> dict:
    tok = lm.tokenizer
    bos = getattr(tok, "bos_token", None)
    add_special = not (bos and all(p.startswith(bos) for p in prompts))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if lm.is_vlm:
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        try:
            enc = lm.processor(add_special_tokens=add_special, **kwargs)
        except TypeError:
            enc = lm.processor(**kwargs)
    else:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in dict(enc).items()}


def _eos_ids(lm: LoadedRef) -> set[int]:
    ids: set[int] = set()
    gc_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for v in (gc_eos, lm.tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


@dataclass
class GenOut:
    """One greedy generation: new token ids (through the first end-of-sequence token), text, wall time."""

    token_ids: list[int]
    text: str
    seconds: float


@torch.inference_mode()
def generate(
    lm: LoadedRef,
    texts: Sequence[str],
    max_new_tokens: int,
    *,
    images: Sequence[Any] | None = None,
    systems: Sequence[str | None] | None = None,
) -> list[GenOut]:
    """Greedy-generate for a batch of prompts (left padding); each output's time is the batch's time."""
    systems = list(systems) if systems is not None else [None] * len(texts)
    has_images = images is not None and all(im is not None for im in images)
    rendered = [render_prompt(lm, t, s, has_images) for t, s in zip(texts, systems, strict=True)]
    device = next(lm.model.parameters()).device
    enc = _encode(lm, rendered, list(images) if has_images else None, device)
    tok = lm.tokenizer
    t0 = time.perf_counter()
    out = lm.model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
    )
    seconds = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = _eos_ids(lm)
    results = []
    for ids in new:
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        ids = ids[:cut]
        results.append(GenOut(ids, tok.decode(ids, skip_special_tokens=True).strip(), seconds))
    return results


def generate_batched(
    lm: LoadedRef,
    texts: Sequence[str],
    max_new_tokens: int,
    *,
    images: Sequence[Any] | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, list[GenOut]], None] | None = None,
) -> list[GenOut]:
    """Generate in batches of ``batch_size``; fall back to one at a time if the model refuses a batch."""
    outs: list[GenOut] = []
    i = 0
    while i < len(texts):
        j = min(i + batch_size, len(texts))
        try:
            res = generate(lm, texts[i:j], max_new_tokens, images=images[i:j] if images is not None else None)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if j - i == 1:
                raise
            log.warning("batched generation failed for %s (%s); generating one at a time", lm.ref.label, exc)
            batch_size = 1
            continue
        outs.extend(res)
        if on_batch is not None:
            on_batch(i, res)
        i = j
    return outs


# -- the compare stage -----------------------------------------------------------------------------


def _warm_up(lm: LoadedRef, prompt: Prompt) -> None:
    """Two untimed tokens first, so kernel loading and int4 repacking are not counted as decode speed."""
    generate(lm, [prompt.text], 2, images=[prompt.image] if prompt.image is not None else None)


def kernel_backends(model: torch.nn.Module) -> str | None:
    """Which kernel backend(s) the model's int4 layers last ran on, e.g. "hubtool" or "hubtool,torch"."""
    used = sorted({b for m in model.modules() if (b := getattr(m, "last_backend", None))})
    return ",".join(used) or None


def _store_image(prompt: Prompt, i: int, run_dir: Path) -> str | None:
    """Save a prompt's image into the run folder (the card shows it); return its path relative to the run."""
    if prompt.image is None:
        return None
    name = f"prompt-{i + 1}.png"
    dest = run_dir / IMAGES_DIR / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    prompt.image.save(dest, format="PNG")
    return f"{IMAGES_DIR}/{name}"


def _key(c: record.PromptComparison) -> tuple:
    return (c.prompt, c.image_source or c.image, c.system, c.max_new_tokens)


def run_compare(
    run_dir: Path,
    prompts_path: Path | None = None,
    *,
    device: str = "cpu",
    variants: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    trust_remote_code: bool = False,
) -> list[record.PromptComparison]:
    """Greedy answers of the 16-bit source and each int4 variant to the example prompts, stored in run.json."""
    run_dir = Path(run_dir)
    rec = record.load(run_dir)
    refs = model_refs(rec, run_dir, variants)
    if prompts_path is not None:
        prompts = load_prompts(Path(prompts_path), is_vlm=rec.source.is_vlm)
    else:
        prompts = default_prompts(rec.source.is_vlm)
    gens: dict[str, list[record.Generation]] = {}
    backends: dict[str, str | None] = {}
    loaded_from: dict[str, str] = {}
    for ref in refs:
        _notify(progress, "compare", ref.label, "prompts", 0, len(prompts), "loading")
        lm = load_model(ref, rec, device, trust_remote_code)
        if ref.format:
            loaded_from[ref.label] = ref.format
        out = []
        try:
            _warm_up(lm, prompts[0])
            for k, p in enumerate(prompts):
                g = generate(
                    lm,
                    [p.text],
                    p.max_new_tokens,
                    images=[p.image] if p.image is not None else None,
                    systems=[p.system],
                )[0]
                tps = len(g.token_ids) / g.seconds if g.seconds > 0 else 0.0
                out.append(
                    record.Generation(ref.label, g.text, len(g.token_ids), g.seconds, tps, g.token_ids)
                )
                _notify(progress, "compare", ref.label, "prompts", k + 1, len(prompts))
            if ref.kind == "variant":
                backends[ref.label] = kernel_backends(lm.model)
        finally:
            unload(lm)
        gens[ref.label] = out
        _notify(progress, "compare", ref.label, "prompts", len(prompts), len(prompts), "done")
    base = refs[0].label
    rec = record.load(run_dir)  # the record as it is now (another stage may have written meanwhile)
    old = {_key(c): c for c in rec.comparisons}
    comps = []
    for i, p in enumerate(prompts):
        c = record.PromptComparison(
            prompt=p.text,
            image=_store_image(p, i, run_dir),
            system=p.system,
            max_new_tokens=p.max_new_tokens,
            image_source=p.image_ref,
        )
        fresh = {label: gens[label][i] for label in gens}
        prev = old.get(_key(c))
        kept = [g for g in (prev.generations if prev else []) if g.model not in fresh]
        order = [r.label for r in refs] + [g.model for g in kept]
        by_model = {**{g.model: g for g in kept}, **fresh}
        c.generations = [by_model[m] for m in dict.fromkeys(order) if m in by_model]
        ref_gen = by_model.get(base)
        for g in c.generations:
            if g.model == base or ref_gen is None:
                continue
            a = token_agreement(ref_gen.token_ids, g.token_ids)
            c.agreements.append(record.Agreement(g.model, a.identical, a.first_diff, a.match_share))
        comps.append(c)
    rec.comparisons = comps
    for v in rec.variants:
        if v.name in backends:
            v.kernel_backend = backends[v.name]
    rec.extras["compare"] = {
        "device": device,
        "dtype": rec.source.dtype,
        "reference": base,
        "loaded_from": loaded_from,
        "decoding": "greedy",
    }
    record.save(rec, run_dir)
    for c in comps:
        for a in c.agreements:
            log.info(
                "%s vs %s: %s (first diff at %s, %.0f%% tokens match)",
                a.model,
                base,
                "identical" if a.identical else "differs",
                a.first_diff,
                100 * a.match_share,
            )
    return comps
