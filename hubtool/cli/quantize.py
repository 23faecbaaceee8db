"""`hubtool quantize`: SOURCE -> run folder with the int4 exports and run.json."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..quant.driver import ProgressEvent
from ..rundir import output_path
from ..stages.quantize import FORMATS, QuantizeOptions, run_quantize
from .common import console, err_console, human_bytes


def quantize(
    source: str = typer.Argument(
        ..., help="Hub id (org/name), local model folder, .gguf file, or pypi:<model>."
    ),
    output: str = typer.Option(..., "-o", "--output", help="Run folder to create (RUN_DIR)."),
    revision: str = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    bits: int = typer.Option(4, help="Weight bits (4)."),
    group_size: int = typer.Option(128, help="Group size: 32, 64 or 128."),
    sym: bool = typer.Option(True, "--sym/--asym", help="Symmetric (default) or asymmetric int4."),
    method: str = typer.Option("signround", help="signround, opt-rtn or rtn."),
    recipe: str = typer.Option("default", help="SignRound recipe: best, default or light."),
    iters: int = typer.Option(None, help="Override the recipe's iterations per block."),
    nsamples: int = typer.Option(None, help="Override the number of calibration samples."),
    seqlen: int = typer.Option(None, help="Override the calibration sequence length."),
    batch_size: int = typer.Option(None, help="Override the tuning batch size."),
    lr: float = typer.Option(None, help="Override the SignSGD learning rate."),
    seed: int = typer.Option(None, help="Random seed (same seed, same bytes)."),
    calib: list[str] = typer.Option(None, help="Calibration set (repeat for one int4 variant per set)."),
    formats: str = typer.Option(",".join(FORMATS), help="Comma-separated formats to export."),
    dtype: str = typer.Option("bfloat16", help="16-bit dtype to load the source in."),
    device: str = typer.Option("cpu", help="Device to tune on (cpu, cuda, cuda:1)."),
    device_map: str = typer.Option(None, help="Spread a large block over GPUs (e.g. 'cuda:0,cuda:1')."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
    quantize_vision: bool = typer.Option(False, help="Also quantize the vision tower's blocks."),
    skip: str = typer.Option(None, help="Regex of linear names to keep 16-bit."),
    overwrite: bool = typer.Option(
        False, help="Redo a run: replace what hubtool wrote in RUN_DIR (never a folder it did not make)."
    ),
    resume: bool = typer.Option(
        False, help="Continue an interrupted run from its last finished block (same inputs only)."
    ),
) -> None:
    """Quantize SOURCE to int4 and export it into RUN_DIR/formats/<format>/."""
    run_dir = output_path(output)  # before Path(): Path("") would be the current directory
    opts = QuantizeOptions(
        source=source,
        run_dir=run_dir,
        revision=revision,
        bits=bits,
        group_size=group_size,
        sym=sym,
        method=method,
        recipe=recipe,
        iters=iters,
        nsamples=nsamples,
        seqlen=seqlen,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        calib=list(calib or []),
        formats=formats,
        dtype=dtype,
        device=device,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        quantize_vision=quantize_vision,
        skip=skip,
        overwrite=overwrite,
        resume=resume,
        command=["hubtool", *sys.argv[1:]],
    )
    record = run_with_progress(opts)
    print_summary(record, run_dir)


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
