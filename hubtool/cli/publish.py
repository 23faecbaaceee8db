"""`hubtool card`, `hubtool verify`, `hubtool upload` and `hubtool publish`: the model card and the Hub.

Options default to ./hubtool.toml (or ``--config PATH``); flags override it. The token comes from
``HF_TOKEN`` or the login cache, never from the command line (so it cannot land in run.json's command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..config import load_config, merged
from ..errors import HubtoolError
from ..rundir import output_path
from ..stages.public import check_base_model
from ..stages.revisions import check_layout
from .common import console
from .quantize import run_with_progress, takes_options

CONFIG_HELP = "hubtool.toml with the defaults (default: ./hubtool.toml if present)."
BASE_MODEL_HELP = (
    "Hub id of the model this one quantizes: the card's base_model, and how it names a local SOURCE "
    "(default: hubtool.toml's [card] base_model, else a Hub SOURCE's id, else the folder's name)."
)

SKIP_VERIFY_HELP = "Upload formats that failed `hubtool verify` or were never verified (the card says so)."
LAYOUT_HELP = (
    "revisions: one repo, each format on its own branch and tag (default). repos: a repo per format "
    "(ORG/NAME-AutoRound, ORG/NAME-GPTQ, ...), each with its own card, grouped in one collection."
)


def _config(path: Path | None) -> dict[str, Any]:
    return load_config(path)


def _card_flags(base_model: str | None) -> dict[str, Any] | None:
    """The card extras given as flags (they override hubtool.toml's [card]), checked before any work."""
    return {"base_model": check_base_model(base_model)} if base_model is not None else None


def card_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder (holds run.json)."),
    template: Path = typer.Option(None, help="Your own Jinja template (rendered sandboxed)."),
    repo_id: str = typer.Option(None, "--repo-id", help="Repo id the usage snippets load (ORG/NAME)."),
    base_model: str = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Render RUN_DIR/card/README.md (and its chart) from run.json."""
    from ..stages.card import write_card

    card = _card_flags(base_model)
    cfg = merged(_config(config), template=str(template) if template else None, repo_id=repo_id, card=card)
    path = write_card(
        run_dir,
        Path(cfg["template"]) if cfg.get("template") else None,
        extras=cfg.get("card") or None,
        repo_id=cfg.get("repo_id"),
    )
    console.print(f"card: {path}")


def upload_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder (holds run.json)."),
    repo_id: str = typer.Option(None, "--repo-id", help="Target repo, ORG/NAME."),
    endpoint: str = typer.Option(None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)."),
    private: bool = typer.Option(None, "--private/--public", help="Create the repo private."),
    tag: str = typer.Option(None, help="Tag for this release (default: the hubtool version)."),
    dry_run: Path = typer.Option(
        None,
        "--dry-run",
        help="Write each revision's tree to this folder instead (new, empty, or made by an earlier dry run).",
    ),
    template: Path = typer.Option(None, help="Your own Jinja card template (rendered sandboxed)."),
    default_format: str = typer.Option(None, help="Format that goes to main (default: auto_round)."),
    base_model: str = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    skip_verify: bool = typer.Option(False, "--skip-verify", help=SKIP_VERIFY_HELP),
    layout: str = typer.Option(None, "--layout", help=LAYOUT_HELP),
) -> None:
    """Publish RUN_DIR: each format on its own branch and tag, the card and the default format on main."""
    from ..stages.hub import upload

    card = _card_flags(base_model)
    cfg = merged(
        _config(config),
        card=card,
        repo_id=repo_id,
        endpoint=endpoint,
        private=private,
        tag=tag,
        template=str(template) if template else None,
        default_format=default_format,
        layout=check_layout(layout) if layout is not None else None,
    )
    repo = _need(cfg, "repo_id", "--repo-id")
    result = upload(
        run_dir,
        repo,
        endpoint=cfg.get("endpoint"),
        private=bool(cfg.get("private", False)),
        tag=cfg.get("tag"),
        dry_run=dry_run,
        template=Path(cfg["template"]) if cfg.get("template") else None,
        extras=cfg.get("card") or None,
        default_format=cfg.get("default_format"),
        skip_verify=skip_verify,
        layout=cfg.get("layout"),
    )
    _show(result, run_dir, dry_run)


@takes_options(publish=True, before="overwrite")
def publish_cmd(
    source: str = typer.Argument(
        None, help="Hub id, model folder, .gguf file or pypi:<model> (default: hubtool.toml's source)."
    ),
    repo_id: str = typer.Option(None, "--repo-id", help="Target repo, ORG/NAME."),
    run_dir: str = typer.Option(None, "-o", "--run-dir", help="Run folder (default: runs/<repo name>)."),
    endpoint: str = typer.Option(None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)."),
    private: bool = typer.Option(None, "--private/--public", help="Create the repo private."),
    tag: str = typer.Option(None, help="Tag for this release (default: the hubtool version)."),
    dry_run: Path = typer.Option(
        None,
        "--dry-run",
        help="Write each revision's tree to this folder instead (new, empty, or made by an earlier dry run).",
    ),
    template: Path = typer.Option(None, help="Your own Jinja card template (rendered sandboxed)."),
    default_format: str = typer.Option(None, help="Format that goes to main (default: auto_round)."),
    prompts: Path = typer.Option(None, help="prompts.yaml for the INT4 vs 16-bit comparison."),
    tasks: str = typer.Option(None, help="Comma-separated eval tasks (none: no evaluation)."),
    limit: int = typer.Option(None, help="Samples per eval task."),
    overwrite: bool = typer.Option(False, help="Redo every stage even if RUN_DIR already holds its results."),
    base_model: str = typer.Option(None, "--base-model", help=BASE_MODEL_HELP),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    skip_verify: bool = typer.Option(False, "--skip-verify", help=SKIP_VERIFY_HELP),
    layout: str = typer.Option(None, "--layout", help=LAYOUT_HELP),
    **options: Any,
) -> None:
    """quantize -> compare -> eval -> verify -> card -> upload, in one command (driven by hubtool.toml if present)."""
    from ..pipeline import publish

    card = _card_flags(base_model)
    # ``options``: the `hubtool quantize` options publish shares (QuantizeOptions declares them): the
    # calibration sets, and a spec that overrides hubtool.toml's [spec] key by key
    calib = options.pop("calib", None)
    cfg = merged(
        _config(config),
        source=source,
        repo_id=repo_id,
        run_dir=str(output_path(run_dir, "-o/--run-dir")) if run_dir is not None else None,
        endpoint=endpoint,
        private=private,
        tag=tag,
        template=str(template) if template else None,
        default_format=default_format,
        calibrations=list(calib) if calib else None,
        prompts=str(prompts) if prompts else None,
        tasks=[t for t in tasks.split(",") if t.strip()] if tasks else None,
        limit=limit,
        spec=options,
        card=card,
        layout=check_layout(layout) if layout is not None else None,
    )
    repo = _need(cfg, "repo_id", "--repo-id")
    result = publish(
        _need(cfg, "source", "SOURCE"),
        repo,
        run_dir=Path(cfg["run_dir"]) if cfg.get("run_dir") else None,
        spec=cfg.get("spec"),
        calibrations=cfg.get("calibrations"),
        prompts=Path(cfg["prompts"]) if cfg.get("prompts") else None,
        tasks=cfg.get("tasks"),
        limit=cfg.get("limit"),
        endpoint=cfg.get("endpoint"),
        private=bool(cfg.get("private", False)),
        tag=cfg.get("tag"),
        dry_run=dry_run,
        template=Path(cfg["template"]) if cfg.get("template") else None,
        extras=cfg.get("card") or None,
        default_format=cfg.get("default_format"),
        overwrite=overwrite,
        quantize_fn=run_with_progress,
        skip_verify=skip_verify,
        layout=cfg.get("layout"),
    )
    _show(result, Path(cfg["run_dir"]) if cfg.get("run_dir") else Path("runs") / repo.split("/")[-1], dry_run)


def verify_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder (holds run.json)."),
    formats: str = typer.Option(None, "--formats", help="Comma-separated formats (default: every one)."),
) -> None:
    """Load each exported format with the library its users load it with and check it (results in run.json)."""
    from ..stages.verify import run_verify

    chosen = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    results = run_verify(run_dir, formats=chosen)
    table = Table(title=f"verify {run_dir}")
    for col in ("format", "variant", "library", "device", "top-1", "max rel. error", "int4 layers", "result"):
        table.add_column(col)
    for r in results:
        err = f"{r.max_rel_error:.2e} (≤ {r.rel_error_bound:g})" if r.max_rel_error is not None else "-"
        top1 = f"{r.top1_agreement:.3f}" if r.top1_agreement is not None else "-"
        state = "pass" if r.passed else f"FAIL {r.failed_check}: {r.detail}"
        table.add_row(
            r.format, r.variant, f"{r.library} {r.version}", r.device, top1, err,
            f"{r.int4_modules}/{r.expected_modules}", state,
        )  # fmt: skip
    console.print(table)
    failed = [r for r in results if not r.passed]
    if failed:
        first = failed[0]
        raise HubtoolError(
            f"verify failed: {first.format} ({first.variant}) with {first.library}: "
            f"check {first.failed_check!r}: {first.detail}",
            "`hubtool upload` refuses it; re-export it (hubtool quantize --overwrite) or pass --skip-verify",
        )


def _need(cfg: dict[str, Any], key: str, flag: str) -> str:
    value = cfg.get(key)
    if not value:
        raise HubtoolError(f"no {key} given", f"pass {flag} or set {key} in hubtool.toml")
    return str(value)


def _show(result, run_dir: Path, dry_run: Path | None) -> None:
    repos = result.layout == "repos"
    table = Table(title=f"{result.repo_id}" + (" (dry run)" if dry_run else ""), show_lines=False)
    for col in ("repo" if repos else "revision", "tag", "format", "variant", "commit"):
        table.add_column(col)
    for r in result.revisions:
        table.add_row(r.repo_id if repos else r.revision, r.tag or "-", r.format, r.variant, r.commit or "-")
    console.print(table)
    if dry_run and repos:
        console.print(f"dry run: repo trees, each with its card, in {dry_run}/<repo name>/")
    elif dry_run:
        console.print(
            f"dry run: revision trees in {dry_run}/<revision>/, the card in {dry_run}/main/README.md"
        )
    elif repos:
        state = "verified" if result.verified else "NOT verified"
        cards = Path(run_dir) / "card" / "repos"
        console.print(
            f"{state}; collection: {result.collection}; cards: {cards}; endpoint: {result.endpoint}"
        )
    else:
        state = "verified" if result.verified else "NOT verified"
        console.print(f"{state}; card: {Path(run_dir) / 'card' / 'README.md'}; endpoint: {result.endpoint}")


def register(app: typer.Typer) -> None:
    """Add `card`, `verify`, `upload` and `publish` to the app."""
    app.command("card")(card_cmd)
    app.command("verify")(verify_cmd)
    app.command("upload")(upload_cmd)
    app.command("publish")(publish_cmd)
