"""ichpipe: a reproducible pipeline for the RSNA Intracranial Hemorrhage Detection challenge."""

__version__ = "0.1.0"
