"""Rendering a card template in a sandbox, with bounds.

A template sees plain data (an immutable sandbox), loads only hubtool's own templates and the files its user
named (``[card] includes``; no ``..``, no symlink out of its folder), and is stopped with one line, never a
traceback, when it recurses without end, builds too much text (``MAX_CARD_BYTES``) or runs too long
(``MAX_RENDER_SECONDS``). The filters the templates use (fence, pystr, num, cell) are defined here.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jinja2 import BaseLoader, StrictUndefined, TemplateError, TemplateNotFound, TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import HubtoolError

TEMPLATE_NAME = "model_card.md.j2"
# A template sees plain data in a sandbox, loads only hubtool's templates and the files its user named, and
# is stopped (one line, no traceback) when it recurses without end, builds too much text or runs too long.
MAX_CARD_BYTES = 1 << 20  # the card, and any single value a template builds
MAX_RENDER_SECONDS = 10.0
MAX_INCLUDE_DEPTH = 50
TEMPLATES_DIR = Path(__file__).parents[1] / "templates"  # hubtool/templates
_WIDTH_CALLS = {"center", "ljust", "rjust", "zfill", "expandtabs", "indent"}
# a printf or str.format field whose width or precision is huge, or comes from an argument
_WIDE_FIELD = re.compile(r"%[-#0 +]*(?:\*|\d{7,})|%[-#0 +]*\d*\.(?:\*|\d{7,})|\{[^{}]*:[^{}]*(?:\{|\d{7,})")
_TEMPLATE_HINT = "fix the template; `hubtool card RUN_DIR --template PATH` re-renders it"
_INCLUDE_HINT = (
    "a template includes only hubtool's own (partials/NAME.md.j2) and the files listed in hubtool.toml's "
    "[card] includes"
)


class _Limit(BaseException):
    """A bound on rendering was hit; BaseException so that no ``except Exception`` inside Jinja swallows it."""


class _CardLoader(BaseLoader):
    """Templates from hubtool's templates folder and from the files the user named; every other name is refused.

    A named file is found by its file name, or by its path relative to the user template's folder. A named
    file that is a symbolic link must point inside its own folder.
    """

    def __init__(self, template: Path | None, includes: list[str] | None = None):
        self.files = {p.relative_to(TEMPLATES_DIR).as_posix(): p for p in sorted(TEMPLATES_DIR.rglob("*.j2"))}
        if template is None:
            return
        home = Path(os.path.abspath(template)).parent
        for path in [*(includes or []), template]:  # the template last: its own name wins
            absolute = Path(os.path.abspath(path))
            real = _named_file(absolute, "card template" if path is template else "card include")
            self.files[absolute.name] = real
            if absolute.is_relative_to(home):
                self.files[absolute.relative_to(home).as_posix()] = real

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Any]:
        """The source of an allowed template (Jinja's loader protocol)."""
        path = self.files.get(template)
        if path is None:
            why = (
                "paths with '..' are refused"
                if ".." in template.replace("\\", "/").split("/")
                else "it is neither one of hubtool's templates nor a file named in [card] includes"
            )
            raise TemplateNotFound(template, f"include of {template!r} refused: {why}")
        if path.stat().st_size > MAX_CARD_BYTES:
            raise _Limit(f"{template} is larger than {MAX_CARD_BYTES >> 20} MiB")
        return path.read_text(encoding="utf-8"), str(path), lambda: False

    def where(self, exc: BaseException) -> tuple[str, int] | None:
        """The template and line an error happened at (the innermost template frame of its traceback)."""
        if isinstance(exc, TemplateSyntaxError) and exc.lineno:
            return exc.name or "", exc.lineno
        names = {str(v): k for k, v in self.files.items()}
        found = None
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            compiled = frame.f_globals.get("__jinja_template__")
            if compiled is not None:  # a frame Jinja did not rewrite (a _Limit): map its line back
                found = compiled.name or "", compiled.get_corresponding_lineno(lineno)
            elif frame.f_code.co_filename in names:  # rewritten: the template's own line
                found = names[frame.f_code.co_filename], lineno
        return found


def _named_file(absolute: Path, what: str) -> Path:
    """The real path of a file the user named; a link that leads out of its folder is refused."""
    if not absolute.is_file():
        raise HubtoolError(f"{what} {absolute} not found", "pass the path of an existing file")
    real = absolute.resolve()
    if real != absolute and not real.is_relative_to(absolute.parent.resolve()):
        raise HubtoolError(
            f"{what} {absolute} is a link to {real}, outside its folder",
            "copy the file next to the template instead of linking to it",
        )
    return real


class _CardEnvironment(ImmutableSandboxedEnvironment):
    """A sandbox (that also refuses to mutate the data) with a deadline and a size bound on every value."""

    intercepted_binops = frozenset({"*", "**", "%"})
    deadline = float("inf")

    def tick(self, value: Any = None) -> Any:
        """Stop past the deadline or when ``value`` is longer than a card may be; else return ``value``."""
        if time.monotonic() > self.deadline:
            raise _Limit(f"it ran longer than {MAX_RENDER_SECONDS:g} s")
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_CARD_BYTES:
            raise _Limit(f"it built a value longer than {MAX_CARD_BYTES >> 20} MiB")
        return value

    def get_template(self, name: Any, *args: Any, **kwargs: Any) -> Any:
        """A template, refused when includes nest deeper than MAX_INCLUDE_DEPTH (e.g. one that includes itself)."""
        _check_depth()
        return super().get_template(name, *args, **kwargs)

    def select_template(self, names: Any, *args: Any, **kwargs: Any) -> Any:
        """The first template found, with the same nesting bound as ``get_template``."""
        _check_depth()
        return super().select_template(names, *args, **kwargs)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """``*``, ``**`` and ``%``, refused before they build a value beyond the bounds."""
        if operator == "*" and isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
            left, right = right, left
        if operator == "*" and isinstance(left, (str, bytes, list, tuple)) and isinstance(right, int):
            if len(left) * right > MAX_CARD_BYTES:
                raise _Limit(f"it built a value longer than {MAX_CARD_BYTES >> 20} MiB")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0 and left.bit_length() * right > 1 << 16:
                raise _Limit("it computed a power of more than 65536 bits")
        return self.tick(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """A sandboxed call, bounded (Jinja's signature)."""
        _check_width(getattr(__obj, "__name__", ""), args, kwargs)
        fmt = getattr(getattr(__obj, "__wrapped__", None), "__self__", None)  # the sandbox's str.format
        if isinstance(fmt, str):
            _check_format(fmt)
        return __self.tick(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        """A sandboxed attribute, bounded."""
        return self.tick(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        """A sandboxed item, bounded."""
        return self.tick(super().getitem(obj, argument))


def _check_depth() -> None:
    """Count the templates being rendered on the stack; too many means includes that never end."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth += "__jinja_template__" in frame.f_globals and frame.f_code.co_name == "root"
        frame = frame.f_back
    if depth > MAX_INCLUDE_DEPTH:
        raise RecursionError(f"includes nested more than {MAX_INCLUDE_DEPTH} deep")


def _environment(loader: _CardLoader | None = None) -> _CardEnvironment:
    env = _CardEnvironment(
        loader=loader or _CardLoader(None),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fence"] = _fence
    env.filters["pystr"] = _pystr
    env.filters["num"] = _num
    env.filters["cell"] = _cell
    for name, func in list(env.filters.items()):
        env.filters[name] = _bounded_filter(env, name, func)
    return env


def _check_width(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a padding or width argument, or a format field, that alone could build more than a card holds."""
    if name in _WIDTH_CALLS and any(
        isinstance(a, int) and a > MAX_CARD_BYTES for a in (*args, *kwargs.values())
    ):
        raise _Limit(f"{name}() was asked for a width above {MAX_CARD_BYTES >> 20} MiB")
    if name == "format" and args and isinstance(args[0], str):
        _check_format(args[0])


def _check_format(fmt: str) -> None:
    """Refuse a format string with a huge width or precision, or one taken from an argument."""
    if _WIDE_FIELD.search(fmt):
        raise _Limit("a format field's width or precision is huge or comes from an argument")


def _bounded_filter(env: Any, name: str, func: Any) -> Any:
    """``func`` with the width check before and the deadline and size checks after (Jinja's markers kept)."""
    import functools

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_width(name, args, kwargs)
        return env.tick(func(*args, **kwargs))

    return bounded


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Stop a template that loops without output or calls: SIGALRM, in the main thread when no timer is set."""
    usable = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    )
    if not usable:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Limit(f"it ran longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)


def render_template(ctx: dict[str, Any], template: Path | None, includes: list[str] | None = None) -> str:
    """Render hubtool's card template (or the user's ``template``) with ``ctx``, within the bounds."""
    name = TEMPLATE_NAME
    if template is not None:
        template = Path(template)
        if not template.is_file():
            raise HubtoolError(f"card template {template} not found", "pass the path of a Jinja file")
        name = template.name
    where = str(template) if template is not None else f"hubtool's {TEMPLATE_NAME}"
    loader = _CardLoader(template, includes)
    env = _environment(loader)
    env.deadline = time.monotonic() + MAX_RENDER_SECONDS
    chunks: list[str] = []
    size = 0
    try:
        with _alarm(MAX_RENDER_SECONDS):
            for chunk in env.get_template(name).generate(**ctx):
                size += len(chunk.encode("utf-8"))
                if size > MAX_CARD_BYTES:
                    raise _Limit(f"its output passed {MAX_CARD_BYTES >> 20} MiB")
                env.tick()
                chunks.append(chunk)
    except (_Limit, Exception) as exc:  # noqa: BLE001 - every template failure becomes one line
        raise _template_error(exc, where, name, loader) from None
    return re.sub(r"\n{3,}", "\n\n", "".join(chunks)).rstrip() + "\n"


def _template_error(exc: BaseException, where: str, main: str, loader: _CardLoader) -> HubtoolError:
    """One line for a template's failure: which template, which line, what went wrong, and a hint."""
    if isinstance(exc, HubtoolError):
        return exc
    head = f"card template {where}"
    at = loader.where(exc)
    if at is not None:
        head += f" line {at[1]}" if at[0] in (main, "") else f" ({at[0]} line {at[1]})"
    detail = _first_line(str(exc)) or type(exc).__name__
    if isinstance(exc, _Limit):
        return HubtoolError(f"{head}: stopped, {detail}", "make the template smaller or simpler")
    if isinstance(exc, RecursionError):
        return HubtoolError(
            f"{head}: recursion too deep (a macro or include that calls itself without end)", _TEMPLATE_HINT
        )
    if isinstance(exc, MemoryError):
        return HubtoolError(f"{head}: out of memory", "make the template smaller or simpler")
    if isinstance(exc, TemplateNotFound):
        return HubtoolError(f"{head}: {detail}", _INCLUDE_HINT)
    if isinstance(exc, SecurityError):
        return HubtoolError(
            f"{head} tried an unsafe operation: {detail}",
            "a template can only read the card's data (no attributes starting with '_', no callables)",
        )
    if isinstance(exc, TemplateError):
        return HubtoolError(f"{head}: {detail}", _TEMPLATE_HINT)
    return HubtoolError(f"{head}: {type(exc).__name__}: {detail}", _TEMPLATE_HINT)


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")[:300]


def _fence(text: str, lang: str = "text") -> str:
    """``text`` in a fenced block whose fence is longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text or "")), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{(text or '').rstrip()}\n{fence}"


def _pystr(value: Any) -> str:
    """A Python string literal for ``value``."""
    import json

    return json.dumps(str(value), ensure_ascii=False)


def _num(value: Any, digits: int = 2) -> str:
    """A number with ``digits`` decimals ("–" for None)."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) or digits else str(value)


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def check_template_file(template: Path, includes: list[str] | None = None) -> None:
    """Load and compile a user's template file and its named includes; one line if anything is wrong."""
    template = Path(template)
    if not template.is_file():
        raise HubtoolError(f"card template {template} not found", "pass the path of a Jinja file")
    loader = _CardLoader(template, includes)
    try:
        _environment(loader).get_template(template.name)
    except (_Limit, Exception) as exc:  # noqa: BLE001 - every template failure becomes one line
        raise _template_error(exc, str(template), template.name, loader) from None
