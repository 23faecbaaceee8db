"""The `hubtool` command line: a thin Typer layer over the stage functions."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

# hubtool draws its own progress; libraries' tqdm bars (e.g. transformers' GGUF loading) stay quiet.
# tqdm reads this when it is imported, so it is set before any library loads.
os.environ.setdefault("TQDM_DISABLE", "1")

import typer
from typer._click.exceptions import ClickException

from ..__about__ import __version__
from ..errors import HubtoolError
from .common import (
    Interrupted,
    command_name,
    install_signal_handlers,
    interrupted_line,
    os_error_line,
    restore_signal_handlers,
    setup_logging,
)

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
    """Entry point: run the app; user errors print one line and exit 2, never a traceback.

    SIGINT and SIGTERM print one line saying how to go on (e.g. the `--resume` command) and exit 128+signal.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    handlers = install_signal_handlers()
    try:
        rv = app(args=args, standalone_mode=False, prog_name="hubtool")
    except HubtoolError as exc:
        _say(exc.line())
        return _exit(exc.exit_code)
    except typer.Exit as exc:
        return _exit(exc.exit_code)
    except ClickException as exc:
        exc.show()
        return _exit(exc.exit_code)
    except Interrupted as exc:
        restore_signal_handlers(handlers)
        handlers = {}
        _say(interrupted_line(args, exc.signum))
        return _exit(128 + exc.signum)
    except (typer.Abort, KeyboardInterrupt):
        _say(interrupted_line(args, signal.SIGINT))
        return _exit(130)
    except OSError as exc:
        line = os_error_line(exc, f"hubtool {command_name(args)}".strip())
        if line is None:
            raise
        _say(line)
        return _exit(2)
    finally:
        restore_signal_handlers(handlers)
    return _exit(rv if isinstance(rv, int) else 0)


def _say(line: str) -> None:
    """Print one line on stderr, as is (no markup, no wrapping)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _exit(code: int) -> int:
    logging.shutdown()
    if __name__ != "__main__":
        sys.exit(code)
    return code
