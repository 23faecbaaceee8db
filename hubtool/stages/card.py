"""The model card: ``templates/model_card.md.j2`` (and its partials) rendered from ``run.json`` alone.

Every figure in a card comes from the run record; nothing is typed by hand. The YAML metadata is built
with huggingface_hub's ``ModelCardData`` / ``EvalResult`` so that the Hub's parser reads it back. Templates
(ours and a user's ``--template``) render in a sandboxed Jinja environment and see plain data only.

``write_card`` writes ``RUN_DIR/card/``: ``README.md``, the eval chart ``eval_chart.png`` and the prompt
images the card shows, and records their hashes in ``run.json`` (``card`` and ``card_assets``); card extras
and a user template's path are kept in ``run.json`` too, so a later re-render gives the same card.

Published as a repo per format (layout "repos", read from the record's publish entry), each repo gets its
own card (``write_repo_cards``: ``card/repos/<repo name>/README.md``): the same comparison and eval tables,
the usage snippet and metadata of its own format and variant, and a "Siblings" section that links the
other repos of the set instead of the revision table. ``card/README.md`` is then the first repo's card.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from .. import record as rec
from ..__about__ import __version__
from ..core.fsio import atomic_write_text
from ..core.lmhead import HEAD16_SUFFIX, HEAD_FORMAT
from ..errors import HubtoolError
from ..formats.table import ALL_FORMATS
from ..record import source_label
from .card_template import check_template_file, render_template
from .evaltable import EvalTable, eval_table
from .public import base_model as public_base_model
from .public import is_hub_id, public_path, public_record
from .revisions import choose_default_format, plan_revisions

log = logging.getLogger(__name__)

CARD_DIR = "card"
CARD_NAME = "README.md"
REPOS_DIR = "repos"  # layout "repos": card/repos/<repo name>/README.md, one card per repo
HUB_URL = "https://huggingface.co"  # where the card links Hub repos
CHART_NAME = "eval_chart.png"
PLACEHOLDER_REPO = "ORG/NAME"
HUB_LICENSES = {
    "apache-2.0",
    "mit",
    "openrail",
    "openrail++",
    "bigscience-openrail-m",
    "creativeml-openrail-m",
    "bsd-3-clause",
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "gpl-3.0",
    "agpl-3.0",
    "lgpl-3.0",
    "llama2",
    "llama3",
    "llama3.1",
    "llama3.2",
    "llama3.3",
    "llama4",
    "gemma",
    "qwen",
    "deepseek",
    "other",
}
METHOD_LABELS = {
    "signround": "SignRound (AutoRound)",
    "opt-rtn": "optimized round-to-nearest (AutoRound with 0 iterations)",
    "rtn": "round-to-nearest",
}
AUTOROUND_BIBTEX = """@article{cheng2023optimize,
  title={Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs},
  author={Cheng, Wenhua and Zhang, Weiwei and Shen, Haihao and Cai, Yiyang and He, Xin and Lv, Kaokao and Liu, Yi},
  journal={arXiv preprint arXiv:2309.05516},
  year={2023}
}"""


# -- public API ------------------------------------------------------------------------------------
def render_card(
    run_dir: Path,
    template: Path | None = None,
    *,
    extras: dict[str, Any] | None = None,
    repo_id: str | None = None,
    chart: str | None = None,
) -> str:
    """The card's Markdown for the run in ``run_dir``, from its run.json (``template``: a user's Jinja file)."""
    run_dir = Path(run_dir)
    record = rec.load(run_dir)
    if chart is None and _evals(record, source_label(record)):
        chart = CHART_NAME  # write_card draws it next to the card
    ctx = card_context(record, run_dir, extras=extras, repo_id=repo_id, chart=chart)
    merged = {**record.extras.get("card", {}), **(extras or {})}
    return render_template(ctx, template, merged.get("includes") if template is not None else None)


def check_card(
    run_dir: Path,
    template: Path | None = None,
    *,
    extras: dict[str, Any] | None = None,
    repo_id: str | None = None,
    publish: rec.PublishRecord | None = None,
    repo: str | None = None,
) -> str:
    """The card ``write_card`` would write, in memory only.

    ``publish``: the record's publish entry to assume; ``repo``: the repo whose card it is (layout "repos").
    """
    run_dir = Path(run_dir)
    record = rec.load(run_dir)
    if publish is not None:
        record.publish = publish
    template = _remember(record, template, extras, repo_id)
    text, _ = _render_record(record, run_dir, template, repo)
    return text


def check_template(template: Path | None, includes: list[str] | None = None) -> None:
    """Load and compile a user's template (and check its named includes) before a run exists to render it."""
    if template is not None:
        check_template_file(Path(template), includes)


def write_card(
    run_dir: Path,
    template: Path | None = None,
    *,
    extras: dict[str, Any] | None = None,
    repo_id: str | None = None,
    out_dir: Path | None = None,
    save_record: bool = True,
    publish: rec.PublishRecord | None = None,
    repo: str | None = None,
) -> Path:
    """Render the card into ``RUN_DIR/card/`` (or ``out_dir``) with its chart and images; record their hashes.

    The card is rendered before anything is written, so a template that fails leaves the folder as it was.
    ``publish`` and ``repo`` (into ``out_dir`` only, as a dry run does): as for ``check_card``.
    """
    run_dir = Path(run_dir)
    record = rec.load(run_dir)
    if publish is not None or repo is not None:
        if out_dir is None or save_record:
            raise ValueError("write_card: publish= and repo= render into out_dir, without saving the record")
        record.publish = publish or record.publish
    template = _remember(record, template, extras, repo_id)
    text, chart = _render_record(record, run_dir, template, repo)
    dest = Path(out_dir) if out_dir is not None else run_dir / CARD_DIR
    dest.mkdir(parents=True, exist_ok=True)
    if chart is None or not write_chart(record, dest / CHART_NAME):
        (dest / CHART_NAME).unlink(missing_ok=True)
    for image in _images(record):
        src = run_dir / image
        if src.is_file():
            (dest / image).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / image)
        else:
            log.warning("prompt image %s is missing from the run folder; the card links to it anyway", image)
    card_path = dest / CARD_NAME
    atomic_write_text(card_path, text)
    if save_record and out_dir is None:
        record.card = _file_record(card_path, run_dir)
        assets = ([dest / chart] if chart else []) + [
            dest / i for i in _images(record) if (dest / i).is_file()
        ]
        record.card_assets = [_file_record(p, run_dir) for p in assets]
        rec.save(record, run_dir)
    log.info("card written to %s", card_path)
    return card_path


def _remember(
    record: rec.RunRecord, template: Path | None, extras: dict[str, Any] | None, repo_id: str | None
) -> Path | None:
    """Merge ``extras`` and ``repo_id`` into the record's card extras; the template to use (given or remembered)."""
    if extras:
        record.extras["card"] = {**record.extras.get("card", {}), **extras}
    card_extras = record.extras.get("card", {})
    if card_extras.get("includes"):  # absolute, as the template path: a re-render finds the same files
        card_extras["includes"] = [os.path.abspath(p) for p in card_extras["includes"]]
    if repo_id:
        record.extras.setdefault("card", {})["repo_id"] = repo_id
    if template is not None:  # remembered: a later `hubtool upload` re-renders with the same template
        record.extras["card_template"] = os.path.abspath(template)  # not resolved: a link stays a link
    elif record.extras.get("card_template"):
        template = Path(record.extras["card_template"])
        if not template.is_file():
            log.warning("card template %s is gone; using hubtool's own", template)
            template = None
    return template


def write_repo_cards(
    run_dir: Path,
    template: Path | None = None,
    *,
    extras: dict[str, Any] | None = None,
    repo_id: str | None = None,
) -> dict[str, rec.FileRecord]:
    """Layout "repos": each repo's card into ``RUN_DIR/card/repos/<repo name>/README.md``; their files by repo.

    The repos are the record's publish entry's. The chart and the images stay in ``card/`` (``write_card``
    writes them). Every card is rendered before the first is written.
    """
    run_dir = Path(run_dir)
    record = rec.load(run_dir)
    if record.publish is None or record.publish.layout != "repos":
        raise HubtoolError(
            f"{run_dir} was not planned as a repo per format", "run `hubtool upload --layout repos`"
        )
    template = _remember(record, template, extras, repo_id)
    texts = {
        r.repo_id: _render_record(record, run_dir, template, r.repo_id)[0] for r in record.publish.revisions
    }
    out = {}
    for repo, text in texts.items():
        path = repo_card_path(run_dir, str(repo))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        out[str(repo)] = _file_record(path, run_dir)
    log.info("%d repo cards written to %s", len(out), run_dir / CARD_DIR / REPOS_DIR)
    return out


def repo_card_path(run_dir: Path, repo: str) -> Path:
    """Where ``write_repo_cards`` writes the card of ``repo``."""
    return Path(run_dir) / CARD_DIR / REPOS_DIR / repo.split("/")[-1] / CARD_NAME


def _render_record(
    record: rec.RunRecord, run_dir: Path, template: Path | None, repo: str | None = None
) -> tuple[str, str | None]:
    """The card's text for ``record`` (``repo``: that repo's, layout "repos") and the chart it links to."""
    chart = CHART_NAME if _evals(record, source_label(record)) else None
    includes = record.extras.get("card", {}).get("includes") if template is not None else None
    return render_template(card_context(record, run_dir, chart=chart, repo=repo), template, includes), chart


def card_files(record: rec.RunRecord) -> list[rec.FileRecord]:
    """The card and its assets as recorded (README.md first), paths relative to the run folder."""
    return ([record.card] if record.card else []) + list(record.card_assets)


def card_metadata(
    record: rec.RunRecord,
    extras: dict[str, Any] | None = None,
    *,
    variant: str | None = None,
    fmt: str | None = None,
) -> Any:
    """The card's YAML metadata as a ``huggingface_hub.ModelCardData``; it names no local path.

    ``base_model``: the extras' (``--base-model``, hubtool.toml's ``[card] base_model``), else a Hub
    source's id; a local source without one has none (its folder name is no Hub id). ``variant`` and
    ``fmt`` (a repo of the "repos" layout): the tags, datasets and eval results of that one alone.
    """
    from huggingface_hub import EvalResult, ModelCardData

    extras = {**record.extras.get("card", {}), **(extras or {})}
    base_model = public_base_model(record, extras)
    record = public_record(record, extras)
    license_id, license_name = _license(extras.get("license") or record.source.license)
    pipeline_tag = "image-text-to-text" if record.source.is_vlm else "text-generation"
    variants = [v for v in record.variants if variant is None or v.name == variant]
    formats = {f.name for v in variants for f in v.formats if fmt is None or f.name == fmt}
    tags = ["hubtool", "int4", "4-bit"] + list(
        dict.fromkeys(ALL_FORMATS[f].hub_tag for f in sorted(formats) if f in ALL_FORMATS)
    )
    if any(v.method in ("signround", "opt-rtn") for v in variants):
        tags.append("autoround")
    tags += list(extras.get("tags", []))
    datasets = [
        v.calibration.source
        for v in variants
        if v.calibration and not v.calibration.builtin and is_hub_id(v.calibration.source)
    ]
    datasets += [d for d in extras.get("datasets", []) if d not in datasets]
    model_name = extras.get("model_name") or _model_name(record, extras)
    default = variant or (record.variants[0].name if record.variants else None)
    results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=str(r.extra.get("dataset") or r.task),
            dataset_name=r.task,
            metric_type=r.metric,
            metric_name=r.metric,
            metric_value=r.value,
        )
        for r in record.evals
        if r.model == default
    ]
    data = ModelCardData(
        base_model=base_model,
        datasets=list(dict.fromkeys(datasets)) or None,
        eval_results=results or None,
        language=extras.get("language"),
        # a repo holding GGUF files only (layout "repos") is llama.cpp's, not transformers'
        library_name="gguf" if formats and all(f.startswith("gguf") for f in formats) else "transformers",
        license=license_id,
        license_name=license_name,
        model_name=model_name,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
    )
    if base_model:
        data.base_model_relation = "quantized"
    return data


def card_context(
    record: rec.RunRecord,
    run_dir: Path,
    *,
    extras: dict[str, Any] | None = None,
    repo_id: str | None = None,
    chart: str | None = None,
    repo: str | None = None,
) -> dict[str, Any]:
    """Everything a card template sees: plain data (dicts, lists, strings, numbers) derived from the record.

    It is derived from ``public.public_record``: whatever a template prints, it prints no local path.
    Published as a repo per format (the record's publish entry says so), it is the card of ``repo`` (default:
    the first): ``repo_id`` is that repo, ``siblings`` the others, ``usage`` its format alone.
    """
    extras = {**record.extras.get("card", {}), **(extras or {})}
    record = public_record(record, extras)
    if extras.get("includes"):
        extras = {**extras, "includes": [public_path(str(p)) for p in extras["includes"]]}
    repo_id = (
        repo_id or extras.get("repo_id") or (record.publish.repo_id if record.publish else PLACEHOLDER_REPO)
    )
    layout = record.publish.layout if record.publish else "revisions"
    revisions = _revisions(record, extras, repo_id)
    this = None
    if layout == "repos" and revisions:
        this = next((r for r in revisions if r["repo_id"] == repo), revisions[0])
        repo_id = this["repo_id"]
        for r in revisions:
            r["this"] = r is this
    focus = {"variant": this["variant"], "fmt": this["format"]} if this else {}
    meta = card_metadata(
        record, {**extras, "repo_id": repo_id} if repo_id != PLACEHOLDER_REPO else extras, **focus
    )
    source = record.source
    base_label = source_label(record)
    comparisons = _comparisons(record, base_label)
    first_image = next((c["image"] for c in comparisons if c["image"]), None)
    first_text = next((c for c in comparisons if not c["image"]), None)
    if this is not None:
        usage = [
            _usage({**this, "revision": None}, repo_id, source.is_vlm, first_text, first_image, comparisons)
        ]
    else:
        usage = [
            _usage(r, repo_id, source.is_vlm, first_text, first_image, comparisons)
            for r in revisions
            if not record.variants or r["variant"] == record.variants[0].name
        ]
    return {
        "card_data": meta.to_yaml(),
        "metadata": meta.to_dict(),
        "repo_id": repo_id,
        "model_name": meta.model_name,
        "base_model": meta.base_model,
        "hub_url": HUB_URL,
        "version": record.hubtool_version or __version__,
        "source": rec.to_dict(source),
        "source_display": _source_display(record, meta.base_model),
        "source_label": base_label,
        "is_vlm": source.is_vlm,
        "spec": dict(record.spec),
        "method_label": _method_label(record),
        "variants": [_variant(v) for v in record.variants],
        "revisions": revisions,
        "published": record.publish is not None and any(r["commit"] for r in revisions),
        "layout": layout,
        "siblings": [r for r in revisions if r is not this] if this is not None else [],
        "usage": usage,
        "other_revisions": [
            r
            for r in revisions
            if this is None and record.variants and r["variant"] != record.variants[0].name
        ],
        "comparisons": comparisons,
        "evals": _evals(record, base_label),
        "lm_head": _lm_head(record),
        "chart": chart,
        "command": shlex.join(record.command) if record.command else "",
        "hardware": {k: None for k in ("cpu", "cpus", "memory_gb", "gpu", "gpu_count", "platform")}
        | dict(record.hardware),
        "libraries": dict(record.libraries),
        "timings": dict(record.timings),
        "peak_rss_gib": _gib(record.peak_rss_bytes),
        "caveats": _caveats(record, extras, base_label),
        "citations": _citations(record, extras),
        "description": extras.get("description"),
        "extras": extras,
        "record": rec.to_dict(record),
    }


def write_chart(record: rec.RunRecord, path: Path) -> bool:
    """Draw the eval table as a PNG bar chart (one panel per task/metric); False when there are no evals."""
    table = _eval_table(record)
    if table is None or not table.rows:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    base = source_label(record)
    labels = [_column_label(c, base) for c in table.columns]
    rows = table.rows
    fig, axes = plt.subplots(1, len(rows), figsize=(max(4.0, 3.2 * len(rows)), 3.4), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, row in zip(axes[0], rows, strict=True):
        scale = 100.0 if row.percent else 1.0
        vals = [row.values.get(c) for c in table.columns]
        xs = [i for i, v in enumerate(vals) if v is not None]
        ys = [vals[i] * scale for i in xs]
        bars = ax.bar(xs, ys, color=[colors[i % len(colors)] for i in xs])
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7)
        if ys and max(ys) > 0:
            ax.set_ylim(0, max(ys) * 1.15)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        better = "higher is better" if row.higher_is_better else "lower is better"
        unit = " (%)" if row.percent else ""
        ax.set_title(f"{row.task} / {row.metric}{unit}\n({better})", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.2, top=0.82, wspace=0.3)  # fixed: fast and stable
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return True


# -- context pieces --------------------------------------------------------------------------------
def _column_label(col: str, base: str) -> str:
    return col.upper() if col == base else col


def _model_name(record: rec.RunRecord, extras: dict[str, Any]) -> str:
    if extras.get("repo_id"):
        return str(extras["repo_id"]).split("/")[-1]
    if record.publish:
        return record.publish.repo_id.split("/")[-1]
    name = record.source.gguf_file or record.source.name
    stem = Path(name).name
    for suffix in (".gguf",):
        stem = stem.removesuffix(suffix)
    return f"{stem}-int4"


def _source_display(record: rec.RunRecord, base_model: str | None) -> str:
    """How the card names the source: a Hub source by its id, a local one by ``base_model`` or its name."""
    s = record.source
    if s.kind == "hub":
        return f"[{s.name}]({HUB_URL}/{s.name})" + (f" at `{s.commit}`" if s.commit else "")
    link = f"[{base_model}]({HUB_URL}/{base_model})" if base_model else None
    if s.kind == "gguf":
        gguf = f"`{s.gguf_file or Path(s.name).name}`" + (f" (sha256 `{s.sha256}`)" if s.sha256 else "")
        return f"{gguf}, a GGUF build of {link}" if link else gguf
    return link or f"`{Path(s.name).name}` (a local folder)"


def _license(value: str | None) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    norm = value.strip().lower().replace(" ", "-")
    if norm in HUB_LICENSES:
        return norm, None
    return "other", re.sub(r"[^a-z0-9.\-]+", "-", norm).strip("-") or "other"


def _method_label(record: rec.RunRecord) -> str:
    methods = list(dict.fromkeys(v.method for v in record.variants)) or [str(record.spec.get("method", ""))]
    return ", ".join(METHOD_LABELS.get(m, m) for m in methods)


def _variant(v: rec.VariantRecord) -> dict[str, Any]:
    d = rec.to_dict(v)
    d["method_label"] = METHOD_LABELS.get(v.method, v.method)
    d["n_quantized"] = len(v.quantized)
    d["n_skipped"] = len(v.skipped)
    d["peak_rss_gib"] = _gib(v.peak_rss_bytes)
    d["skip_reasons"] = sorted({s.reason for s in v.skipped})
    return d


def _default_format(record: rec.RunRecord, extras: dict[str, Any]) -> str | None:
    return choose_default_format(record, extras.get("default_format"))


def _revisions(record: rec.RunRecord, extras: dict[str, Any], repo_id: str) -> list[dict[str, Any]]:
    """The repo's revisions (or the set's repos): published ones (with commits) if the record has them, else
    the planned layout; ``repo_id``: the repo of revisions that name none."""
    published = record.publish.revisions if record.publish else []
    planned = published or plan_revisions(record, default_format=_default_format(record, extras), tag=None)
    out = []
    for r in planned:
        variant = next((v for v in record.variants if v.name == r.variant), None)
        fmt = next((f for f in variant.formats if f.name == r.format), None) if variant else None
        info = ALL_FORMATS[r.format]
        gguf = next((Path(x.path).name for x in fmt.files if x.path.endswith(".gguf")), None) if fmt else None
        out.append(
            {
                "gguf_file": gguf,  # a GGUF format's file: its usage is llama.cpp's, Ollama's, llama_cpp's
                "gguf_type": info.packing_format if gguf else None,
                "format": r.format,
                "format_label": info.card_label,
                "quant_method": fmt.quant_method if fmt else "",
                "variant": r.variant,
                "revision": r.revision,
                "tag": r.tag,
                "commit": r.commit,
                "main": r.revision == "main",
                "install": info.card_install,
                "import": info.card_import,
                "verified": rec.verified_with(record, r.variant, r.format),
                "repo_id": r.repo_id or repo_id,
                "url": f"{HUB_URL}/{r.repo_id or repo_id}",
                "this": r.repo_id is None,
            }
        )
    return out


def _usage(
    r: dict[str, Any],
    repo_id: str,
    is_vlm: bool,
    text_comp: dict[str, Any] | None,
    image: str | None,
    comparisons: list[dict[str, Any]],
) -> dict[str, Any]:
    image_comp = next((c for c in comparisons if c["image"]), None)
    comp = (image_comp if is_vlm and image_comp else text_comp) or (comparisons[0] if comparisons else None)
    return {
        **r,
        "repo_id": repo_id,
        "prompt": comp["prompt"] if comp else "Hello!",
        "system": comp["system"] if comp else None,
        "max_new_tokens": comp["max_new_tokens"] if comp else None,
        "image": image if is_vlm else None,
    }


def _images(record: rec.RunRecord) -> list[str]:
    return list(dict.fromkeys(c.image for c in record.comparisons if c.image))


def _comparisons(record: rec.RunRecord, base: str) -> list[dict[str, Any]]:
    out = []
    for c in record.comparisons:
        agree = {a.model: a for a in c.agreements}
        gens = []
        for g in c.generations:
            a = agree.get(g.model)
            gens.append(
                {
                    **rec.to_dict(g),
                    "label": _column_label(g.model, base),
                    "is_base": g.model == base,
                    "identical": a.identical if a else None,
                    "first_diff": a.first_diff if a else None,
                    "match_share": a.match_share if a else None,
                }
            )
        out.append(
            {
                "prompt": c.prompt,
                "image": c.image,
                "image_source": c.image_source,
                "system": c.system,
                "max_new_tokens": c.max_new_tokens,
                "generations": gens,
            }
        )
    return out


def _eval_table(record: rec.RunRecord) -> EvalTable | None:
    return eval_table(record) if record.evals else None


def _evals(record: rec.RunRecord, base: str) -> dict[str, Any] | None:
    table = _eval_table(record)
    if table is None or not table.rows:
        return None
    rows = []
    for row in table.rows:
        cells = []
        for col in table.columns:
            text = table.format(row, col)
            se = row.stderrs.get(col)
            if se is not None and row.values.get(col) is not None:
                text += f" ± {100 * se if row.percent else se:.2f}"
            cells.append(text)
        n = sorted({v for v in row.n.values() if v})
        rows.append(
            {
                "task": row.task,
                "metric": row.metric + (" (%)" if row.percent else ""),
                "higher_is_better": row.higher_is_better,
                "n": ", ".join(str(x) for x in n),
                "cells": cells,
            }
        )
    has_avg = any(table.average.get(c) is not None for c in table.columns) and bool(table.average_of)
    return {
        "columns": [_column_label(c, base) for c in table.columns],
        "rows": rows,
        "average": [table.format(None, c) for c in table.columns] if has_avg else None,
        "average_of": list(table.average_of),
    }


HEAD_TEXT = {"int8": "int8, one scale per output row", "int4": "int4 in groups of the spec's size"}


def _lm_head(record: rec.RunRecord) -> dict[str, Any] | None:
    """How the lm_head is stored (``--quantize-lm-head``) and its perplexity cost as ``hubtool eval``
    measured it: each variant's perplexity beside the same variant with the 16-bit head."""
    mode = record.spec.get("quantize_lm_head")
    if not mode:
        return None
    value = {(r.model, r.task, r.metric): r.value for r in record.evals}
    variants = {v.name for v in record.variants}
    costs = []
    for r in record.evals:
        if r.model not in variants or r.kind != "perplexity" or not r.extra.get("primary", False):
            continue
        head16 = value.get((r.model + HEAD16_SUFFIX, r.task, r.metric))
        if r.value is not None and head16 is not None:
            costs.append(
                {
                    "variant": r.model,
                    "task": r.task,
                    "quantized": f"{r.value:.3f}",
                    "head16": f"{head16:.3f}",
                    "delta": f"{r.value - head16:+.3f}",
                    "relative": f"{100 * (r.value - head16) / head16:+.2f}",
                }
            )
    return {"mode": mode, "text": HEAD_TEXT[mode], "format": HEAD_FORMAT, "costs": costs}


def _caveats(record: rec.RunRecord, extras: dict[str, Any], base: str) -> list[str]:
    out = []
    s = record.source
    label = base.upper()
    if s.kind == "gguf":
        out.append(
            f"The {label} baseline is `{s.gguf_file or Path(s.name).name}` dequantized: its publisher had "
            f"already quantized those weights, so every comparison here is against that dequantized model, "
            f"not against the original 16-bit release."
        )
    if s.note and s.kind != "hub":
        out.append(f"Source note: {s.note}.")
    if s.is_vlm and not record.spec.get("quantize_vision"):
        out.append(
            "Only the language model's decoder blocks are int4; the vision tower and projector stay 16-bit."
        )
    for v in record.variants:
        if v.skipped:
            reasons = "; ".join(sorted({sk.reason for sk in v.skipped}))
            out.append(f"`{v.name}`: {len(v.skipped)} linear layer(s) stay 16-bit: {reasons}.")
    ns = sorted({r.n for r in record.evals if r.n})
    if ns:
        out.append(
            "Evaluation scores come from "
            + ", ".join(str(n) for n in ns)
            + " samples per task (see the standard errors); small differences between columns are noise."
        )
    if record.comparisons:
        out.append(
            "The example answers use greedy decoding; one differing token can change the rest of an answer."
        )
    out += [str(c) for c in extras.get("caveats", [])]
    return out


def _citations(record: rec.RunRecord, extras: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    if any(v.method in ("signround", "opt-rtn") for v in record.variants) or any(
        f.name == "auto_round" for v in record.variants for f in v.formats
    ):
        out.append({"what": "AutoRound (SignRound)", "bibtex": AUTOROUND_BIBTEX})
    if extras.get("citation"):
        out.append({"what": "the source model", "bibtex": str(extras["citation"]).strip()})
    return out


def _gib(n: int | float | None) -> str | None:
    return f"{n / 2**30:.2f}" if n else None


def _file_record(path: Path, run_dir: Path) -> rec.FileRecord:
    return rec.FileRecord(path.relative_to(run_dir).as_posix(), rec.sha256_file(path), path.stat().st_size)
