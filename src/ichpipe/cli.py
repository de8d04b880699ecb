"""Shared command-line plumbing for the numbered stage scripts: ``--config``, ``key=value`` overrides."""

from __future__ import annotations

import argparse
import copy
import errno
import sys
from collections.abc import Callable

from ichpipe.config import Config, ConfigError, load_config
from ichpipe.io import InputError


def stage_main(description: str, run: Callable[[Config, argparse.Namespace], int | None],
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, per_fold: bool = False) -> int:
    """Parse ``[--config FILE] [key=value ...]``, load the config and call ``run(cfg, args)``.

    ``per_fold`` stages also take ``--all-folds``: ``run`` for every fold of the metadata table in
    turn, in this one process (one start-up instead of one per fold). Bad configs and bad input
    files end the program with a one-line ``error:`` message and exit code 2, not a traceback.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fold=0 data.root=/mnt/rsna")
    if per_fold:
        parser.add_argument("--all-folds", action="store_true", help="every fold of the metadata table in turn")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not getattr(args, "all_folds", False):
            return run(cfg, args) or 0
        for k in table_folds(cfg):
            cfg_k = copy.deepcopy(cfg)
            cfg_k.fold = k
            code = run(cfg_k, args) or 0
            if code:
                return code
        return 0
    except (ConfigError, InputError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in UNWRITABLE:
            raise
        where = exc.filename or "the output folder"
        print(f"error: {where}: {exc.strerror}; write the outputs elsewhere with data.work_dir=PATH", file=sys.stderr)
        return 2


# A read-only data root (/kaggle/input), no permission, a full disk or quota: one line naming the path.
UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


def one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error re-raised from a DataLoader worker (whose message carries
    the worker's whole traceback), the original one-line message only."""
    text = str(exc)
    if "Traceback (most recent call last)" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last


def table_folds(cfg: Config) -> list[int]:
    """The folds of stage 1's metadata table (an error when stage 1 has not run)."""
    from ichpipe.paths import data_paths, read_metadata

    return [int(k) for k in sorted(read_metadata(data_paths(cfg)).fold.dropna().unique())]


def print_folds(cfg: Config, args: argparse.Namespace) -> None:
    """The folds of stage 1's metadata table, space-separated (``make train GPUS=N`` loops over them)."""
    print(" ".join(map(str, table_folds(cfg))))


if __name__ == "__main__":  # python -m ichpipe.cli folds [--config FILE] [key=value ...]
    if sys.argv[1:2] != ["folds"]:
        sys.exit("usage: python -m ichpipe.cli folds [--config FILE] [key=value ...]")
    sys.exit(stage_main("Print the folds of the metadata table.", print_folds, argv=sys.argv[2:]))
