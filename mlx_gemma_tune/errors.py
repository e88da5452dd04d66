"""User-facing errors.

Library code raises a UserError for anything the user can fix (bad path, bad file,
bad option). The CLI prints it as one line and exits non-zero; no traceback unless
--debug. Anything else that escapes is a bug in this tool.
"""

from __future__ import annotations

from collections.abc import Callable

# A progress callback: library code calls it with each stage of a long job (ui.status shows them).
Progress = Callable[[str], None]


class UserError(Exception):
    """A problem with the user's input, explained in one line.

    `where` names the file (and line or key) at fault when there is one;
    `hint` says what to do about it.
    """

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def one_line(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split())  # never more than one line


class InputError(UserError):
    """A file or directory the user gave us is missing, malformed or unsupported."""


class OutputError(UserError):
    """Where the user asked us to write is unusable (exists, unwritable, inside the input)."""


class UnsupportedModelError(UserError):
    """A model we do not handle (not a Gemma family this tool knows)."""


class OfflineError(UserError):
    """Something needs the network but the Hugging Face Hub is unreachable or disabled."""


class NonFiniteError(UserError):
    """Training stopped: the loss or the gradients became NaN / inf (the weights were not updated)."""
