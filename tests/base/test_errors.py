"""The one-line errors: an exception's first line, a value quoted short."""

from __future__ import annotations

from ichpipe.base.errors import first_line, quote


def test_an_exception_becomes_its_first_line():
    """Libraries put tables and tracebacks after the first line; an empty message (which indexing its first line
    turned into an IndexError at six call sites) gives the type's name."""
    assert first_line(ValueError("bad value\n  table row 1\n  table row 2")) == "bad value"
    assert first_line(ValueError("x" * 500)) == "x" * 200 and len(first_line(ValueError("y" * 500), 160)) == 160
    assert first_line(EOFError()) == "EOFError" and first_line(EOFError(), default="") == ""
    assert first_line(OSError("\nsecond")) == "OSError"


def test_a_dataloader_workers_traceback_gives_its_own_error_line():
    """A DataLoader re-raises a worker's error with the worker's whole traceback in the message."""
    text = ("Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise InputError(...)\nichpipe.base.errors.InputError: a.png: not a '
            "readable PNG\n")
    assert first_line(RuntimeError(text)) == "a.png: not a readable PNG"


def test_values_are_quoted_short_on_one_line():
    assert len(quote(list(range(10**6)))) <= 80 and quote("a\nb") == "'a\\nb'"
    assert quote("x" * 500) == "'" + "x" * 27 + "..." + "x" * 28 + "'"  # reprlib keeps both ends
