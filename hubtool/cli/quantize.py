"""`hubtool quantize`: SOURCE -> run folder with the int4 exports and run.json."""

from __future__ import annotations

import inspect
import sys
from dataclasses import MISSING
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..quant.driver import ProgressEvent
from ..rundir import output_path
from ..stages.quantize import QuantizeOptions, check_options, option_fields, option_types, run_quantize
from .common import console, err_console, human_bytes


def option_parameters(*, publish: bool = False) -> list[inspect.Parameter]:
    """The Typer parameters declared by QuantizeOptions' fields (flags, help, defaults, in field order).

    ``publish``: only the options `hubtool publish` shares, each defaulting to None (hubtool.toml fills it).
    A path is taken as a string (``Path("")`` would be the current directory) and a ``sep`` list as one
    value; the command turns them into fields with ``check_options``.
    """
    params = []
    types = option_types()
    for f in option_fields():
        if publish and not f.metadata["publish"]:
            continue
        if publish or f.default is not MISSING:
            default = None if publish else f.default
        elif f.default_factory is not MISSING:
            default = f.metadata["sep"].join(f.default_factory()) if f.metadata["sep"] else None
        else:
            default = ...  # required
        if f.metadata["argument"]:
            info = typer.Argument(default, help=f.metadata["help"])
        else:
            info = typer.Option(default, *f.metadata["flags"], help=f.metadata["help"])
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=info, annotation=_cli_type(f, types[f.name])))
    return params


def _cli_type(f, hint):
    """The type Typer parses an option as: ``X`` for ``X | None``, ``str`` for a path or a ``sep`` list."""
    if f.metadata["sep"] or hint is Path:
        return str
    if get_origin(hint) in (Union, UnionType):
        return next(t for t in get_args(hint) if t is not type(None))
    return hint


def takes_options(*, publish: bool = False, before: str | None = None):
    """Give a command the QuantizeOptions parameters (``option_parameters``) in place of its ``**options``.

    They go before the parameter named ``before`` (default: last). Typer reads ``__signature__``.
    """

    def wrap(func):
        sig = inspect.signature(func)
        kind = inspect.Parameter.KEYWORD_ONLY
        own = [p.replace(kind=kind) for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = next((k for k, p in enumerate(own) if p.name == before), len(own))
        func.__signature__ = sig.replace(parameters=own[:at] + option_parameters(publish=publish) + own[at:])
        return func

    return wrap


@takes_options()
def quantize(**values: Any) -> None:
    """Quantize SOURCE to int4 and export it into RUN_DIR/formats/<format>/."""
    opts = cli_options(values, command=["hubtool", *sys.argv[1:]])
    record = run_with_progress(opts)
    print_summary(record, opts.run_dir)


def cli_options(values: dict[str, Any], command: list[str]) -> QuantizeOptions:
    """The QuantizeOptions of `hubtool quantize`'s parsed parameters (``option_parameters``)."""
    values = {**values, "run_dir": output_path(values["run_dir"])}  # Path("") would be the current folder
    return QuantizeOptions(**check_options(values), command=command)


def run_with_progress(opts: QuantizeOptions):
    """Run the quantize stage under a rich progress bar over blocks (ETA and current loss)."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} blocks"),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    bar = Progress(*columns, console=err_console, transient=False)
    task = None

    def on_event(ev: ProgressEvent) -> None:
        nonlocal task
        if task is None:  # start drawing only once blocks are being quantized
            bar.start()
            task = bar.add_task("quantize", total=ev.total, loss="")
        loss = f"loss {ev.loss:.4g}" if ev.loss is not None else ""
        if ev.rtn_loss is not None and ev.loss is not None:
            loss = f"loss {ev.rtn_loss:.4g} -> {ev.loss:.4g}"
        bar.update(
            task,
            total=ev.total,
            completed=ev.index + (1 if ev.done else 0),
            description=ev.block + (f" it {ev.iteration}/{ev.iters}" if ev.iters else ""),
            loss=loss,
        )

    try:
        return run_quantize(opts, progress=on_event)
    finally:
        if task is not None:  # Progress.stop() prints a blank line even when nothing was drawn
            bar.stop()


def print_summary(record, run_dir: Path) -> None:
    """Print what the run made: variants, formats, sizes, block losses."""
    for v in record.variants:
        console.print(
            f"[bold]{v.name}[/]: {v.method}, {len(v.quantized)} linears int4, {len(v.skipped)} kept 16-bit, "
            f"{v.seconds:.1f} s, peak RSS {human_bytes(v.peak_rss_bytes)}"
        )
        if v.block_losses:
            table = Table("block", "RTN loss", "tuned loss", "ratio", title="on the first calibration batch")
            for b in v.block_losses:
                table.add_row(
                    b.block, f"{b.rtn:.5g}", f"{b.tuned:.5g}", f"{b.tuned / b.rtn:.3f}" if b.rtn else "-"
                )
            console.print(table)
        for f in v.formats:
            size = sum(x.size for x in f.files)
            console.print(
                f"  {f.name:<11} {run_dir / f.path}  ({human_bytes(size)}, quant_method {f.quant_method})"
            )
    console.print(f"record: {run_dir / 'run.json'}")


def register(app: typer.Typer) -> None:
    """Add `quantize` to the app."""
    app.command("quantize")(quantize)
