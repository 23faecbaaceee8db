"""What every CLI command shares: the console, logging set-up and turning errors into one line."""

from __future__ import annotations

import errno
import logging
import os
import shlex
import signal
from pathlib import Path

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def setup_logging(verbose: bool = False) -> None:
    """Route hubtool's logs to stderr through rich; other libraries stay at WARNING."""
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("hubtool").setLevel(logging.DEBUG if verbose else logging.INFO)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # hubtool draws its own progress


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# OSErrors a user can fix (a path, its permissions, its disk): one line instead of a traceback.
USER_ERRNOS = {
    errno.EACCES: "check the permissions of that path, or choose another location",
    errno.EPERM: "check the permissions of that path, or choose another location",
    errno.EROFS: "choose a location on a writable file system",
    errno.ENOSPC: "free some space, or choose a location on another disk, then run the command again",
    errno.EDQUOT: "free some space within your quota, then run the command again",
    errno.ENOTDIR: "a part of that path is a file, not a folder: check the path",
    errno.EISDIR: "that path is a folder where a file is needed: give a file path",
    errno.EEXIST: "something is already in the way at that path: move it or choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def os_error_line(exc: OSError, command: str) -> str | None:
    """The one line for an OSError a user can fix (None for any other: a bug keeps its traceback)."""
    hint = USER_ERRNOS.get(exc.errno)
    if hint is None:
        return None
    reason = exc.strerror or os.strerror(exc.errno)
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = f"{' -> '.join(paths)}: " if paths else ""
    text = " ".join(f"error: {command} failed: {where}{reason}".split())
    return f"{text} (hint: {hint})"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds like KeyboardInterrupt, past click (which would print a blank line)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> dict[int, object]:
    """Turn SIGINT and SIGTERM into ``Interrupted``; return the handlers to put back (empty off the main thread)."""
    old: dict[int, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread (e.g. an embedding application): leave signals alone
            break
    return old


def restore_signal_handlers(old: dict[int, object]) -> None:
    """Put back the handlers ``install_signal_handlers`` replaced."""
    for sig, handler in old.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _output_arg(args: list[str]) -> str | None:
    """The -o/--output value in a quantize command line."""
    for i, a in enumerate(args):
        if a in ("-o", "--output") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--output="):
            return a.split("=", 1)[1]
        if a.startswith("-o") and not a.startswith("--") and len(a) > 2:
            return a[2:]
    return None


def command_name(args: list[str]) -> str:
    """The subcommand of a hubtool command line (the first word that is not an option), or ''."""
    return next((a for a in args if not a.startswith("-")), "")


def interrupted_line(args: list[str], signum: int) -> str:
    """The one line printed when a command is interrupted: what state it left and how to go on."""
    what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    command = command_name(args)
    if command == "quantize":
        from ..rundir import FINISHED, RESUMABLE, state

        out = _output_arg(args)
        try:
            run_state = state(Path(out)) if out and out.strip() else None
        except OSError:  # an unreadable folder: say what holds in general
            run_state = None
        if run_state == RESUMABLE:
            again = ["hubtool", *(a for a in args if a != "--overwrite")]
            if "--resume" not in again:
                again.append("--resume")
            return f"{what}: the finished blocks are saved; continue with: {shlex.join(again)}"
        if run_state == FINISHED:
            redo = "; run the same command again to redo it" if "--overwrite" in args else ""
            return f"{what}; {out} holds a finished run{redo}"
        return f"{what} before any block was saved; run the same command again to start over"
    if command == "eval":
        return f"{what}: finished samples are cached; run the same command again to continue"
    return f"{what}; run the same command again"
