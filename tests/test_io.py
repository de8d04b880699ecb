"""io's helpers that the error messages of every stage go through."""

from __future__ import annotations


def test_an_exception_becomes_its_first_line():
    """Libraries put tables and tracebacks after the first line; an empty message (which indexing its first line
    turned into an IndexError at six call sites) gives the type's name."""
    from ichpipe.io import first_line

    assert first_line(ValueError("bad value\n  table row 1\n  table row 2")) == "bad value"
    assert first_line(ValueError("x" * 500)) == "x" * 200 and len(first_line(ValueError("y" * 500), 160)) == 160
    assert first_line(EOFError()) == "EOFError" and first_line(EOFError(), default="") == ""
    assert first_line(OSError("\nsecond")) == "OSError"
