"""`hubtool compare` and `hubtool eval`: thin wrappers over hubtool.stages.compare / hubtool.stages.evaluate."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..source import check_device
from ..stages.compare import StageProgress
from .common import console, err_console


@contextmanager
def _progress_bars():
    """A rich progress display (bar, count, elapsed, ETA per model x task) and the callback feeding it.

    The display starts with the first event: an error before it leaves stderr to its one line (rich's
    ``Progress.stop()`` prints a blank line even when nothing was drawn).
    """
    bars: dict[tuple[str, str], int] = {}
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )

    def update(ev: StageProgress) -> None:
        if not bars:
            bar.start()
        key = (ev.model, ev.task)
        desc = f"{ev.model} · {ev.task}" + (f" ({ev.status})" if ev.status in ("loading", "cached") else "")
        if key not in bars:
            bars[key] = bar.add_task(desc, total=max(ev.total, 1))
        bar.update(bars[key], description=desc, completed=ev.done, total=max(ev.total, 1))

    try:
        yield update
    finally:
        if bars:
            bar.stop()


def compare_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder made by `hubtool quantize`."),
    prompts: Path = typer.Option(
        None, "--prompts", help="prompts.yaml (default: one text prompt, plus an image one for a VLM)."
    ),
    device: str = typer.Option("cpu", help="Device to generate on (cpu, cuda, cuda:1)."),
    variant: list[str] = typer.Option(None, "--variant", help="Only these int4 variants (repeatable)."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
) -> None:
    """Answer the same prompts greedily with the 16-bit model and each int4 variant (stored in run.json)."""
    from ..stages.compare import run_compare

    check_device(device)  # before anything: a run whose answers are all cached never loads a model

    with _progress_bars() as update:
        comps = run_compare(
            run_dir,
            prompts,
            device=device,
            variants=variant or None,
            progress=update,
            trust_remote_code=trust_remote_code,
        )
    for i, c in enumerate(comps, 1):
        title = f"prompt {i}: {c.prompt[:80]}" + (f"  (image {c.image})" if c.image else "")
        table = Table(title=escape(title), show_lines=True)
        for col in ("model", "answer", "tokens", "tok/s", "agreement"):
            table.add_column(col, overflow="fold")
        agree = {a.model: a for a in c.agreements}
        for g in c.generations:
            a = agree.get(g.model)
            note = (
                "reference"
                if a is None
                else (
                    "identical"
                    if a.identical
                    else f"first diff @{a.first_diff}, {100 * a.match_share:.0f}% same"
                )
            )
            table.add_row(escape(g.model), escape(g.text), str(g.tokens), f"{g.tokens_per_s:.1f}", note)
        console.print(table)


def eval_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder made by `hubtool quantize`."),
    tasks: list[str] = typer.Option(
        ...,
        "--tasks",
        help="ppl, ppl:FILE, lm_eval:TASK[,TASK], mcq:FILE.tsv, yesno:FILE.tsv, vqa:FILE.tsv (repeatable).",
    ),
    limit: int = typer.Option(
        None, "--limit", help="Only the first N samples (chunks for ppl) of each task."
    ),
    device: str = typer.Option("cpu", help="Device to evaluate on (cpu, cuda, cuda:1)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Samples per batch."),
    seqlen: int = typer.Option(512, "--seqlen", help="Window length for perplexity."),
    variant: list[str] = typer.Option(None, "--variant", help="Only these int4 variants (repeatable)."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
) -> None:
    """Evaluate the 16-bit model and each int4 variant; results (cached per sample) go into run.json."""
    from .. import record
    from ..stages.evaltable import eval_table
    from ..stages.evaluate import run_eval

    check_device(device)  # before anything: a run whose samples are all cached never loads a model

    with _progress_bars() as update:
        run_eval(
            run_dir,
            tasks,
            limit=limit,
            device=device,
            batch_size=batch_size,
            seqlen=seqlen,
            variants=variant or None,
            progress=update,
            trust_remote_code=trust_remote_code,
        )
    t = eval_table(record.load(run_dir))
    table = Table(title=escape(f"eval: {run_dir}"))
    table.add_column("task")
    table.add_column("metric")
    for col in t.columns:
        table.add_column(col, justify="right")
    table.add_column("n", justify="right")
    for row in t.rows:
        cells = []
        for col in t.columns:
            se = row.stderrs.get(col)
            txt = t.format(row, col)
            if se is not None and row.values.get(col) is not None:
                txt += f" ± {100 * se:.2f}" if row.percent else f" ± {se:.2f}"
            cells.append(txt)
        n = max(row.n.values()) if row.n else 0
        table.add_row(
            escape(row.task), escape(row.metric) + ("" if row.higher_is_better else " ↓"), *cells, str(n)
        )
    if t.average_of:
        table.add_row(
            "average", ", ".join(t.average_of), *[t.format(None, c) for c in t.columns], "", style="bold"
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the compare and eval commands to the hubtool app."""
    app.command("compare")(compare_cmd)
    app.command("eval")(eval_cmd)
