"""``hubtool publish``: the stages chained — quantize, compare, evaluate, verify, card, upload.

Each stage reads and writes the run folder; a stage whose results ``run.json`` already holds is kept
(a finished run is reused only when it was made with the options asked for). Everything that can fail
without quantizing (the Hub token and namespace, the dry-run folder, the card template) is checked first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import record as rec
from .errors import HubtoolError
from .stages.card import check_template
from .stages.compare import run_compare
from .stages.evaluate import run_eval
from .stages.hub import check_access, check_dry_run_dir, check_repo_id, upload
from .stages.public import check_base_model
from .stages.quantize import parse_formats, quantize_options, run_quantize
from .stages.revisions import check_layout
from .stages.verify import run_verify

log = logging.getLogger(__name__)


def check_reuse(record: rec.RunRecord, run_dir: Path, source: str, opts: Any, given: set[str]) -> None:
    """Refuse to reuse a finished run made otherwise than ``opts`` asks; the line names what differs.

    Always compared: the source, method, bits, group size, symmetry and calibration sets. Compared when
    asked for (``given``): the revision, formats, dtype, skip, quantize_vision and the recipe (the recipe
    named, with its overrides, against each variant's recorded recipe).
    """
    made_from = record.command[2] if record.command[:2] == ["hubtool", "quantize"] else None
    if made_from is not None and source not in (made_from, record.source.name):
        raise HubtoolError(
            f"{run_dir} holds a run of {made_from}, not of {source}",
            "pass --overwrite to redo it, or choose another --run-dir",
        )
    have, want = dict(record.spec), {}
    for key in ("method", "bits", "group_size", "sym"):
        want[key] = getattr(opts, key)
    for key in ("dtype", "skip", "quantize_vision"):
        if key in given:
            want[key] = getattr(opts, key)
    if "formats" in given:
        have["formats"] = sorted(have.get("formats") or {f.name for v in record.variants for f in v.formats})
        want["formats"] = sorted(parse_formats(opts.formats))
    if "revision" in given:
        have["revision"], want["revision"] = record.source.revision, opts.revision
    recipe_keys = ("recipe", "iters", "nsamples", "seqlen", "batch_size", "lr", "seed")
    if opts.method != "rtn" and given & set(recipe_keys):
        from dataclasses import asdict

        from .quant.spec import make_recipe

        asked = asdict(make_recipe(opts.recipe, **{k: getattr(opts, k) for k in recipe_keys[1:]}))
        recorded = (record.variants[0].recipe or {}) if record.variants else {}
        for key, name in zip(("name", *recipe_keys[1:]), recipe_keys, strict=True):
            if key in recorded:
                have[name], want[name] = recorded[key], asked[key]
    if opts.method != "rtn":
        have["calibration"] = [v.calibration.source if v.calibration else None for v in record.variants]
        want["calibration"] = _calibration_sources(opts.calib, have["calibration"])
    diffs = [f"{k} {have.get(k)!r} (asked {v!r})" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise HubtoolError(
            f"{run_dir} holds a finished run made otherwise: " + "; ".join(diffs),
            "pass --overwrite to redo it, or choose another --run-dir",
        )


def _calibration_sources(calib: list[str], recorded: list[str | None]) -> list[str | None]:
    """The calibration sources run.json would record for ``calib`` (none given: the default set)."""
    from .quant.calib import BUILTIN_ALIASES, BUILTIN_SOURCE, HUB_DEFAULT

    if not calib:  # the default: the Hub's set when it was reachable, else the builtin one
        return recorded if recorded in ([BUILTIN_SOURCE], [HUB_DEFAULT]) else [BUILTIN_SOURCE]
    out: list[str | None] = []
    for c in calib:
        path = Path(c).expanduser()
        out.append(BUILTIN_SOURCE if c in BUILTIN_ALIASES else str(path.resolve()) if path.exists() else c)
    return out


def publish(
    source: str,
    repo_id: str,
    *,
    run_dir: Path | None = None,
    spec: dict[str, Any] | None = None,
    calibrations: list[str] | None = None,
    prompts: Path | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    tag: str | None = None,
    dry_run: Path | None = None,
    template: Path | None = None,
    extras: dict[str, Any] | None = None,
    default_format: str | None = None,
    overwrite: bool = False,
    quantize_fn: Callable[[Any], rec.RunRecord] | None = None,
    skip_verify: bool = False,
    layout: str | None = None,
) -> rec.PublishRecord:
    """quantize -> compare -> evaluate -> card -> upload; a stage whose results run.json already holds is kept.

    ``spec`` holds `hubtool quantize` options (QuantizeOptions fields); ``quantize_fn`` replaces
    ``pipeline.run_quantize`` (the CLI passes one that draws a progress bar); ``layout``: as for ``upload``.
    """
    run_dir = Path(run_dir or Path("runs") / repo_id.split("/")[-1])
    check_repo_id(repo_id)
    layout = check_layout(layout)
    given = {k.replace("-", "_") for k, v in (spec or {}).items() if v is not None}
    opts = quantize_options(
        source, run_dir, spec, calib=list(calibrations) if calibrations else None, overwrite=overwrite or None
    )
    # everything that can be checked before hours of quantizing: the Hub, the dry-run folder, the template
    if dry_run is None:
        check_access(repo_id, endpoint=endpoint, token=token)
    else:
        check_dry_run_dir(Path(dry_run), run_dir)
    check_template(template, (extras or {}).get("includes"))
    if (extras or {}).get("base_model") is not None:  # the card's, checked before hours of quantizing
        check_base_model(extras["base_model"], "base_model")
    if (run_dir / rec.RECORD_NAME).is_file() and not overwrite:
        record = rec.load(run_dir)
        check_reuse(record, run_dir, source, opts, given | ({"calib"} if opts.calib else set()))
        log.info("reusing the finished run in %s (same spec)", run_dir)
    else:
        log.info("quantizing %s into %s", source, run_dir)
        record = (quantize_fn or run_quantize)(opts)
    if not record.comparisons or overwrite:
        log.info("comparing int4 and 16-bit answers")
        run_compare(run_dir, prompts_path=Path(prompts) if prompts else None)
    if tasks and (not rec.load(run_dir).evals or overwrite):
        log.info("evaluating %s", ", ".join(tasks))
        run_eval(run_dir, tasks, limit=limit)
    if not skip_verify:
        record = rec.load(run_dir)
        todo = sorted(
            {
                f.name
                for v in record.variants
                for f in v.formats
                if not rec.verify_results(record, v.name, f.name)
            }
        )
        if todo:
            log.info("verifying %s with the libraries their users load them with", ", ".join(todo))
            run_verify(run_dir, formats=todo)
    return upload(
        run_dir,
        repo_id,
        endpoint=endpoint,
        token=token,
        private=private,
        tag=tag,
        dry_run=dry_run,
        template=template,
        extras=extras,
        default_format=default_format,
        skip_verify=skip_verify,
        layout=layout,
    )
