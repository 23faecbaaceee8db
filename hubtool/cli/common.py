"""What every CLI command shares: the console, logging set-up and turning errors into one line."""

from __future__ import annotations

import logging

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
