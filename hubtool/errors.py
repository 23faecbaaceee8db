"""One error type for everything a user can fix: a message, a hint, exit code 2."""

from __future__ import annotations


class HubtoolError(Exception):
    """A problem with the user's input or environment, shown as one line with a hint (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def line(self) -> str:
        """Return the single line the CLI prints for this error (line breaks inside become spaces)."""
        text = f"error: {self.message}" + (f" (hint: {self.hint})" if self.hint else "")
        return " ".join(part.strip() for part in text.splitlines() if part.strip())
