"""The `hubtool` command line: a thin Typer layer over the stage functions."""

from __future__ import annotations

import importlib
import logging
import os
import sys

# hubtool draws its own progress; libraries' tqdm bars (e.g. transformers' GGUF loading) stay quiet.
# tqdm reads this when it is imported, so it is set before any library loads.
os.environ.setdefault("TQDM_DISABLE", "1")

import typer
from typer._click.exceptions import ClickException

from ..__about__ import __version__
from ..errors import HubtoolError
from .common import err_console, setup_logging

app = typer.Typer(
    name="hubtool",
    help="Quantize a Hugging Face model to int4, export, compare, evaluate, write its card and publish it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Modules that add their commands with ``register(app)``; each owns one stage.
COMMAND_MODULES = ("quantize", "evaluate", "publish", "kernels")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hubtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """hubtool: int4 models for the Hub, from one command."""
    setup_logging(verbose)


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a stage not installed in this build
        if _exc.name != f"{__name__}.{_name}":
            raise
        continue
    _mod.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; user errors print one line and exit 2, never a traceback."""
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="hubtool")
    except HubtoolError as exc:
        err_console.print(exc.line(), markup=False, soft_wrap=True)
        return _exit(exc.exit_code)
    except typer.Exit as exc:
        return _exit(exc.exit_code)
    except ClickException as exc:
        exc.show()
        return _exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted (an unfinished run can continue with --resume)")
        return _exit(130)
    return _exit(rv if isinstance(rv, int) else 0)


def _exit(code: int) -> int:
    logging.shutdown()
    if __name__ != "__main__":
        sys.exit(code)
    return code
