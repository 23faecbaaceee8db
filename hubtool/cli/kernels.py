"""`hubtool env`, `hubtool kernels build` and `hubtool bench kernels`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .common import console

kernels_app = typer.Typer(help="hubtool's own int4 kernels.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks (printed as ratios against a baseline measured in the same run).", no_args_is_help=True
)


def env(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show versions, devices and which int4 kernel backend each case would use."""
    from ..envinfo import environment

    info = environment()
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table("what", "value", show_header=False)
    for key, value in info.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console.print(table)


@kernels_app.command("build")
def build(verbose: bool = typer.Option(False, help="Show the compiler's output.")) -> None:
    """Compile (or find cached) the CPU kernel now instead of at first use."""
    from ..kernels import build_cpu_kernel

    path = build_cpu_kernel(verbose=verbose)
    console.print(f"CPU kernel ready: {path}")


@bench_app.command("kernels")
def bench_kernels(
    json_path: Path = typer.Option(None, "--json", help="Also write the results to this file."),
) -> None:
    """Time int4 matmuls (ours, torch's built-in) against bf16 and fp32 matmul at M = 1, 8, 32."""
    from .. import bench_kernels as bk

    result = bk.run(str(json_path) if json_path else None)
    console.print(bk.format_table(result))


def register(app: typer.Typer) -> None:
    """Add `env`, `kernels` and `bench` to the app."""
    app.command("env")(env)
    app.add_typer(kernels_app, name="kernels")
    app.add_typer(bench_app, name="bench")
