"""The eval stage: the 16-bit source and every int4 variant on the same tasks, results into ``run.json``.

Task kinds (see :mod:`hubtool.stages.tasks`): perplexity on held-out text, lm-evaluation-harness tasks through
its Python API (an HFLM wrapped around the model already loaded), and VLMEvalKit-layout multiple choice,
yes/no and open VQA, answered by batched greedy generation.

Every task file is read and checked before a model loads. Per-sample results go to
``RUN_DIR/eval_cache/<model>/<task>.jsonl`` as they are made, so a killed eval resumes where it stopped
and a re-run on a finished run loads no model at all. :func:`eval_table` turns the record's results into
the table the card shows (16-bit column, one column per int4 variant, an average row).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import record
from ..errors import HubtoolError
from ..record import source_label
from . import compare
from .compare import HEAD16, LoadedRef, ModelRef, ProgressFn, StageProgress, head16_refs, model_refs
from .metrics import (
    bootstrap_stderr,
    extract_choice,
    extract_yes_no,
    mean,
    mean_stderr,
    perplexity,
    short_answer,
    vqa_accuracy,
    yes_no_scores,
)
from .tasks import Sample, TaskData, load_task, parse_specs, to_json_line

log = logging.getLogger(__name__)

CACHE_DIR = "eval_cache"
CACHE_VERSION = 1
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQLEN = 512
GEN_TOKENS = {"mcq": 32, "yesno": 8, "vqa": 24}
LOGIT_BUDGET = 1 << 27  # floats of logits held at once while scoring perplexity
PRIMARY = {"mcq": "accuracy", "yesno": "f1", "vqa": "accuracy", "perplexity": "perplexity"}
LM_EVAL_PRIMARY = ("acc", "exact_match", "acc_norm", "f1", "mcc", "bleu", "word_perplexity", "perplexity")


# -- prompts of the VLM task layouts ---------------------------------------------------------------


def mcq_prompt(s: Sample) -> str:
    """MMBench-style prompt: hint, question, lettered options, and the instruction to pick one."""
    parts = [f"Hint: {s.hint}"] if s.hint else []
    parts.append(f"Question: {s.question}")
    parts.append("Options:")
    parts += [f"{k}. {v}" for k, v in s.options.items()]
    parts.append("Answer with the option's letter from the given choices directly.")
    return "\n".join(parts)


def yesno_prompt(s: Sample) -> str:
    """POPE-style prompt."""
    return f"{s.question} Please answer yes or no."


def vqa_prompt(s: Sample) -> str:
    """TextVQA-style prompt."""
    return f"{s.question}\nAnswer the question using a single word or phrase."


PROMPTS = {"mcq": mcq_prompt, "yesno": yesno_prompt, "vqa": vqa_prompt}


def score_sample(kind: str, s: Sample, prediction: str) -> dict[str, Any]:
    """The per-sample record of one VLM answer: the prediction, what was extracted, and its score."""
    if kind == "mcq":
        choice = extract_choice(prediction, s.options)
        return {"id": s.id, "prediction": prediction, "extracted": choice, "score": float(choice == s.answer)}
    if kind == "yesno":
        yn = extract_yes_no(prediction)
        return {
            "id": s.id,
            "prediction": prediction,
            "extracted": yn,
            "gold": s.answer,
            "score": float(yn == s.answer),
        }
    short = short_answer(prediction)
    return {"id": s.id, "prediction": prediction, "extracted": short, "score": vqa_accuracy(short, s.answer)}


# -- the per-sample cache --------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("_") or "task"


class SampleCache:
    """``eval_cache/<model>/<task>.jsonl``: a header line, then one line per finished sample, then "done".

    A header that does not match (other data, other model files, other settings) discards the file.
    """

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path = path
        self.header = header
        self.samples: dict[str, dict] = {}
        self.done: dict | None = None
        self._read()

    def _read(self) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            head = None
        if not head or head.get("header") != self.header:
            log.info("cache %s belongs to other data or another model; starting it over", self.path)
            self.path.unlink()
            return
        for line in lines[1:]:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if "done" in obj:
                self.done = obj["done"]
            elif "id" in obj:
                self.samples[str(obj["id"])] = obj

    def _append(self, objs: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(to_json_line({"header": self.header}))
            for o in objs:
                f.write(to_json_line(o))
            f.flush()
            os.fsync(f.fileno())

    def add(self, objs: list[dict]) -> None:
        """Store finished samples (appended and flushed at once)."""
        for o in objs:
            self.samples[str(o["id"])] = o
        self._append(objs)

    def finish(self, done: dict) -> None:
        """Mark the task finished, with what is needed to report it without a model."""
        self.done = done
        self._append([{"done": done}])


# -- the eval stage --------------------------------------------------------------------------------


@dataclass
class _Job:
    data: TaskData
    cache: SampleCache
    results: list[record.TaskResult] | None = None  # filled from the cache when already complete


def _header(ref: ModelRef, data: TaskData, params: dict) -> dict:
    return {
        "version": CACHE_VERSION,
        "task": data.spec.name,
        "kind": data.spec.kind,
        "data": data.fingerprint,
        "model": ref.label,
        "model_fingerprint": ref.fingerprint,
        "params": params,
    }


def _params(kind: str, seqlen: int) -> dict:
    if kind == "perplexity":
        return {"seqlen": seqlen}
    if kind in GEN_TOKENS:
        return {"max_new_tokens": GEN_TOKENS[kind], "prompt": PROMPTS[kind].__doc__}
    return {}


def _check_lm_eval(data: TaskData) -> None:
    """Resolve lm_eval tasks (and load their data) without a model; errors become HubtoolError."""
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        raise HubtoolError(
            "lm_eval tasks need lm-evaluation-harness", "pip install 'hubtool[eval]' (or pip install lm-eval)"
        ) from None
    tm = _task_manager(data)
    try:
        tm.load(list(data.lm_eval_tasks))
    except Exception as exc:  # lm_eval raises KeyError/ValueError/datasets errors for a bad task
        raise HubtoolError(
            f"task {data.spec.spec!r}: lm_eval cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})",
            "check the task name or YAML file; registered tasks need the Hub for their data",
        ) from None


def _task_manager(data: TaskData):
    from lm_eval.tasks import TaskManager

    only_files = all(Path(t).suffix in (".yaml", ".yml") for t in data.lm_eval_tasks)
    return TaskManager(include_path=data.lm_eval_paths or None, include_defaults=not only_files)


def run_eval(
    run_dir: Path,
    tasks: Sequence[str] | str,
    *,
    limit: int | None = None,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    seqlen: int = DEFAULT_SEQLEN,
    variants: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
    trust_remote_code: bool = False,
) -> list[record.TaskResult]:
    """Evaluate the 16-bit source and each int4 variant on ``tasks``; results (also) stored in run.json."""
    run_dir = Path(run_dir)
    if limit is not None and limit < 1:
        raise HubtoolError(f"--limit must be at least 1, not {limit}")
    if batch_size < 1:
        raise HubtoolError(f"--batch-size must be at least 1, not {batch_size}")
    rec = record.load(run_dir)
    specs = parse_specs(list(tasks) if not isinstance(tasks, str) else tasks)
    datas = [load_task(s, is_vlm=rec.source.is_vlm, limit=limit) for s in specs]
    for d in datas:
        if d.spec.kind == "lm_eval":
            _check_lm_eval(d)
    refs = model_refs(rec, run_dir, variants)
    refs += head16_refs(rec, refs)  # a quantized lm_head's perplexity cost: the same variant, 16-bit head
    settings = {
        "device": device,
        "limit": limit,
        "batch_size": batch_size,
        "seqlen": seqlen,
        "reference": source_label(rec),
        "loaded_from": {r.label: r.format for r in refs if r.format},
        "cache": CACHE_DIR,
    }
    out: list[record.TaskResult] = []
    for ref in refs:
        jobs = []
        for d in datas:
            if ref.kind == HEAD16 and d.spec.kind != "perplexity":
                continue
            path = run_dir / CACHE_DIR / _safe(ref.label) / f"{_safe(d.spec.name)}.jsonl"
            job = _Job(d, SampleCache(path, _header(ref, d, _params(d.spec.kind, seqlen))))
            job.results = _from_cache(job, ref, limit, run_dir)
            jobs.append(job)
        lm: LoadedRef | None = None
        mine: list[record.TaskResult] = []
        try:
            for job in jobs:
                name = job.data.spec.name
                if job.results is not None:
                    log.info("%s / %s: reusing the cached results (%s)", ref.label, name, job.cache.path)
                    _emit(progress, ref.label, name, 1, 1, "cached")
                    mine += job.results
                    continue
                if lm is None:
                    _emit(progress, ref.label, name, 0, 1, "loading")
                    lm = compare.load_model(ref, rec, device, trust_remote_code)
                mine += _run_job(
                    job,
                    lm,
                    limit=limit,
                    batch_size=batch_size,
                    seqlen=seqlen,
                    progress=progress,
                    run_dir=run_dir,
                )
        finally:
            compare.unload(lm)
        _store(run_dir, mine, settings)  # after each model: a later failure keeps what is done
        out += mine
    return out


def _store(run_dir: Path, results: list[record.TaskResult], settings: dict[str, Any]) -> None:
    """Merge results into run.json (replacing the same task x model) as it is on disk now."""
    rec = record.load(run_dir)
    done = {(r.task, r.model) for r in results}
    rec.evals = [r for r in rec.evals if (r.task, r.model) not in done] + results
    rec.extras["eval"] = settings
    record.save(rec, run_dir)


def _emit(
    progress: ProgressFn | None, model: str, task: str, done: int, total: int, status: str = "running"
) -> None:
    if progress is not None:
        progress(StageProgress("eval", model, task, done, total, status))


def _from_cache(job: _Job, ref: ModelRef, limit: int | None, run_dir: Path) -> list[record.TaskResult] | None:
    """The task's results from its cache alone, or None when some samples still need the model."""
    d, cache = job.data, job.cache
    if d.spec.kind in PROMPTS:
        if all(s.id in cache.samples for s in d.samples):
            return _vlm_results(d, ref.label, [cache.samples[s.id] for s in d.samples], cache.path, run_dir)
        return None
    if cache.done is not None and cache.done.get("limit") == limit:
        if d.spec.kind == "perplexity":
            rows = [cache.samples[k] for k in cache.done["ids"] if k in cache.samples]
            if len(rows) == len(cache.done["ids"]):
                return _ppl_results(d, ref.label, rows, cache.path, run_dir, cache.done)
            return None
        return [record.from_dict(record.TaskResult, r) for r in cache.done["results"]]
    return None


def _run_job(
    job: _Job, lm: LoadedRef, *, limit, batch_size, seqlen, progress, run_dir
) -> list[record.TaskResult]:
    kind = job.data.spec.kind
    if kind == "perplexity":
        return _run_ppl(
            job, lm, limit=limit, batch_size=batch_size, seqlen=seqlen, progress=progress, run_dir=run_dir
        )
    if kind == "lm_eval":
        return _run_lm_eval(job, lm, limit=limit, batch_size=batch_size, progress=progress)
    return _run_vlm(job, lm, batch_size=batch_size, progress=progress, run_dir=run_dir)


# -- VLM tasks -------------------------------------------------------------------------------------


def _run_vlm(job: _Job, lm: LoadedRef, *, batch_size, progress, run_dir) -> list[record.TaskResult]:
    from .prompts import open_image

    d, cache = job.data, job.cache
    kind, name = d.spec.kind, d.spec.name
    todo = [s for s in d.samples if s.id not in cache.samples]
    total = len(d.samples)
    done = total - len(todo)
    _emit(progress, lm.ref.label, name, done, total)
    for i in range(0, len(todo), batch_size):
        batch = todo[i : i + batch_size]
        images = [open_image(s.image, f"{d.source} line {s.line}: image") for s in batch]
        texts = [PROMPTS[kind](s) for s in batch]
        gens = compare.generate_batched(lm, texts, GEN_TOKENS[kind], images=images, batch_size=len(batch))
        cache.add(
            [
                score_sample(kind, s, g.text) | {"tokens": len(g.token_ids)}
                for s, g in zip(batch, gens, strict=True)
            ]
        )
        done += len(batch)
        _emit(progress, lm.ref.label, name, done, total)
    rows = [cache.samples[s.id] for s in d.samples]
    _emit(progress, lm.ref.label, name, total, total, "done")
    return _vlm_results(d, lm.ref.label, rows, cache.path, run_dir)


def _vlm_results(
    d: TaskData, model: str, rows: list[dict], cache_path: Path, run_dir: Path
) -> list[record.TaskResult]:
    kind, name, n = d.spec.kind, d.spec.name, len(rows)
    extra = {"source": d.source, "samples": cache_path.relative_to(run_dir).as_posix()}
    scores = [float(r["score"]) for r in rows]
    unparsed = sum(r.get("extracted") in (None, "") for r in rows)

    def tr(metric: str, value: float, stderr: float | None, **more: Any) -> record.TaskResult:
        return record.TaskResult(
            task=name,
            kind=kind,
            metric=metric,
            model=model,
            value=value,
            stderr=stderr,
            n=n,
            higher_is_better=True,
            extra={**extra, "primary": metric == PRIMARY[kind], **more},
        )

    if kind in ("mcq", "vqa"):
        return [tr("accuracy", mean(scores), mean_stderr(scores), unparsed=unparsed)]
    preds = [r.get("extracted") for r in rows]
    golds = [r["gold"] for r in rows]
    sc = yes_no_scores(preds, golds)
    pairs = list(zip(preds, golds, strict=True))

    def boot(attr: str) -> float | None:
        return bootstrap_stderr(
            lambda xs: getattr(yes_no_scores([p for p, _ in xs], [g for _, g in xs]), attr), pairs
        )

    counts = {
        "tp": sc.tp,
        "fp": sc.fp,
        "tn": sc.tn,
        "fn": sc.fn,
        "unparsed": sc.unknown,
        "yes_ratio": sc.yes_ratio,
    }
    return [
        tr("accuracy", sc.accuracy, mean_stderr(scores)),
        tr("precision", sc.precision, boot("precision")),
        tr("recall", sc.recall, boot("recall")),
        tr("f1", sc.f1, boot("f1"), **counts),
    ]


# -- perplexity ------------------------------------------------------------------------------------


def _max_positions(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "max_position_embeddings", None)


def chunk_tokens(ids: list[int], seqlen: int, bos: int | None) -> list[list[int]]:
    """Cut a token stream into windows of ``seqlen`` (a BOS first when the tokenizer has one)."""
    step = seqlen - 1 if bos is not None else seqlen
    chunks = []
    for start in range(0, len(ids), step):
        part = ids[start : start + step]
        chunk = [bos, *part] if bos is not None else part
        if len(chunk) >= 2:
            chunks.append(chunk)
    return chunks


@torch.inference_mode()
def chunk_nll(model: Any, chunks: list[list[int]], device: Any, pad_id: int = 0) -> list[tuple[float, int]]:
    """Summed next-token NLL (nats) and scored-token count per chunk, in one right-padded forward pass."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:].to(logits.device)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    valid = mask[:, 1:].to(logits.device).bool()
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    return [(float(nll[i].sum()), int(valid[i].sum())) for i in range(len(chunks))]


def _run_ppl(
    job: _Job, lm: LoadedRef, *, limit, batch_size, seqlen, progress, run_dir
) -> list[record.TaskResult]:
    d, cache = job.data, job.cache
    tok = lm.tokenizer
    maxpos = _max_positions(lm.model)
    seqlen = min(seqlen, maxpos) if maxpos else seqlen
    ids = tok(d.text, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = chunk_tokens(ids, seqlen, tok.bos_token_id)
    if limit is not None:
        chunks = chunks[:limit]
    if not chunks:
        raise HubtoolError(f"task {d.spec.spec!r}: the text is too short to score")
    keys = [str(i) for i in range(len(chunks))]
    todo = [i for i, k in enumerate(keys) if k not in cache.samples]
    vocab = int(getattr(getattr(lm.model, "config", None), "vocab_size", 0) or 0) or len(tok)
    rows_per_pass = max(1, min(batch_size, LOGIT_BUDGET // max(1, seqlen * vocab)))
    device = next(lm.model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    _emit(progress, lm.ref.label, d.spec.name, len(chunks) - len(todo), len(chunks))
    for j in range(0, len(todo), rows_per_pass):
        part = todo[j : j + rows_per_pass]
        res = chunk_nll(lm.model, [chunks[i] for i in part], device, pad)
        cache.add([{"id": keys[i], "nll": nll, "tokens": n} for i, (nll, n) in zip(part, res, strict=True)])
        _emit(progress, lm.ref.label, d.spec.name, len(chunks) - len(todo) + j + len(part), len(chunks))
    done = {"limit": limit, "ids": keys, "seqlen": seqlen, "text_tokens": len(ids)}
    cache.finish(done)
    _emit(progress, lm.ref.label, d.spec.name, len(chunks), len(chunks), "done")
    return _ppl_results(d, lm.ref.label, [cache.samples[k] for k in keys], cache.path, run_dir, done)


def _ppl_results(
    d: TaskData, model: str, rows: list[dict], cache_path: Path, run_dir: Path, done: dict
) -> list[record.TaskResult]:
    p = perplexity([r["nll"] for r in rows], [r["tokens"] for r in rows])
    return [
        record.TaskResult(
            task=d.spec.name,
            kind="perplexity",
            metric="perplexity",
            model=model,
            value=p.value,
            stderr=p.stderr,
            n=p.chunks,
            higher_is_better=False,
            extra={
                "primary": True,
                "source": d.source,
                "tokens": p.tokens,
                "nll": p.nll,
                "seqlen": done.get("seqlen"),
                "samples": cache_path.relative_to(run_dir).as_posix(),
            },
        )
    ]


# -- lm-evaluation-harness -------------------------------------------------------------------------


def _run_lm_eval(job: _Job, lm: LoadedRef, *, limit, batch_size, progress) -> list[record.TaskResult]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    d, cache = job.data, job.cache
    name = d.spec.name
    _emit(progress, lm.ref.label, name, 0, 1)
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # it warns that `pretrained` is a model object: that is the point here
    try:
        hflm = HFLM(
            pretrained=lm.model,
            tokenizer=lm.tokenizer,
            backend="causal",
            batch_size=batch_size,
            max_length=_max_positions(lm.model),
        )
    finally:
        hf_log.setLevel(level)
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    sqlite = str(cache.path.with_suffix(""))  # lm_eval appends _rank0.db: per-request cache, resumable
    out = simple_evaluate(
        model=hflm,
        tasks=list(d.lm_eval_tasks),
        limit=limit,
        task_manager=_task_manager(d),
        use_cache=sqlite,
        log_samples=False,
        bootstrap_iters=1000,
    )
    results = lm_eval_results(out, lm.ref.label, d.source)
    if not results:
        raise HubtoolError(f"task {d.spec.spec!r}: lm_eval returned no metrics")
    cache.finish({"limit": limit, "results": [record.to_dict(r) for r in results]})
    _emit(progress, lm.ref.label, name, 1, 1, "done")
    return results


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def lm_eval_results(out: dict, model: str, source: str = "") -> list[record.TaskResult]:
    """TaskResults from ``lm_eval.simple_evaluate``'s output (metric "acc,none" -> "acc", its stderr)."""
    res: list[record.TaskResult] = []
    hib = out.get("higher_is_better", {})
    nsamples = out.get("n-samples", {})
    for task, metrics in out.get("results", {}).items():
        names = []
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or _num(value) is None:
                continue
            metric, filt = key.split(",", 1)
            stderr = _num(metrics.get(f"{metric}_stderr,{filt}"))
            label = metric if filt == "none" else f"{metric} ({filt})"
            names.append(metric)
            n = nsamples.get(task, {}).get("effective") or nsamples.get(task, {}).get("original") or 0
            res.append(
                record.TaskResult(
                    task=task,
                    kind="lm_eval",
                    metric=label,
                    model=model,
                    value=float(value),
                    stderr=stderr,
                    n=int(n),
                    higher_is_better=bool(hib.get(task, {}).get(metric, True)),
                    extra={"source": source, "filter": filt},
                )
            )
        primary = next((m for m in LM_EVAL_PRIMARY if m in names), names[0] if names else None)
        for r in res:
            if r.task == task and r.metric == primary:
                r.extra["primary"] = True
                break
    return res
