"""Error types. Every problem with user input is an :class:`InputError`.

The CLI turns an ``InputError`` into one line on stderr and exit code 2, and so an
``OSError`` that names a file (one the run could not read or write: a full disk); any
other exception is a bug in sparseforge (exit code 1).
"""
from __future__ import annotations

import json
from pathlib import Path


class SparseforgeError(Exception):
    """Base class of every error sparseforge raises on purpose."""

    exit_code = 1


class InputError(SparseforgeError):
    """Missing, corrupt, truncated or unsupported input (exit code 2).

    ``path`` names the file or directory at fault; ``problem`` says what is wrong with it.
    """

    exit_code = 2

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class PassError(SparseforgeError):
    """A pass was asked to run on an IR that does not meet its requirements (exit code 2)."""

    exit_code = 2


def describe(exc: Exception) -> str:
    """A short account of why a JSON document was rejected, for an :class:`InputError`
    (``KeyError('spec')`` reads "no field 'spec'")."""
    if isinstance(exc, KeyError):
        return f"no field {exc.args[0]!r}" if exc.args else "a field is missing"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    return f"a field has the wrong type or value ({exc})"
