"""The one-line errors every entry point ends with: the exception a user can fix, an exception's message cut to
one line, a value quoted short."""

from __future__ import annotations

import reprlib


class InputError(ValueError):
    """Bad input file; the message is one line naming the file and the problem."""


def first_line(exc: BaseException, limit: int = 200, default: str | None = None) -> str:
    """The first line of ``exc``'s message, cut at ``limit`` characters (pydicom, torch and pandas put whole tables
    and tracebacks after it); an empty message gives ``default`` (None: the exception's type name). An error re-raised
    from a DataLoader worker carries the worker's whole traceback: its own last line is the message."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.endswith("Error") else last
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        return type(exc).__name__ if default is None else default
    return lines[0][:limit]


def quote(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message: nested and long values abbreviated (reprlib: a few items a level, a few
    levels), never past ``limit`` characters, on one line; an aliased YAML value of billions of items costs nothing."""
    text = _REPR.repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40
