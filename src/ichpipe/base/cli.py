"""Shared command-line plumbing for the numbered stage scripts: ``--config``, ``key=value`` overrides."""

from __future__ import annotations

import argparse
import copy
import errno
import sys
import tarfile
import zipfile
from collections.abc import Callable

from ichpipe.base.config import REPO_ROOT, STAGE_CONFIG, Config, ConfigError, load_config
from ichpipe.base.errors import InputError, first_line


def stage_main(description: str, run: Callable[[Config, argparse.Namespace], int | None],
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None, per_fold: bool = False) -> int:
    """Parse ``[--config FILE] [key=value ...]``, load the config and call ``run(cfg, args)``.

    ``per_fold`` stages also take ``--all-folds``: ``run`` for every fold of the metadata table in
    turn, in this one process (one start-up instead of one per fold); and in a bag of seeds (``seeds``) they run
    every seed in turn (each its own run folder), unless ``seed=<s>`` names one. Bad configs and bad input
    files end the program with a one-line ``error:`` message and exit code 2, not a traceback.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(STAGE_CONFIG),
                        help=f"YAML config (default: {STAGE_CONFIG.relative_to(REPO_ROOT)}, as the Makefile's CONFIG)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. fold=0 data.root=/mnt/rsna")
    if per_fold:
        parser.add_argument("--all-folds", action="store_true", help="every fold of the metadata table in turn")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)

    def main() -> int:
        cfg = load_config(args.config, args.overrides)
        if not per_fold:
            return run(cfg, args) or 0
        from ichpipe.base.paths import seed_configs

        one_seed = any(o.startswith("seed=") for o in args.overrides)
        for seed_cfg in [cfg] if one_seed else seed_configs(cfg):
            for k in table_folds(seed_cfg) if args.all_folds else [seed_cfg.fold]:
                cfg_k = copy.deepcopy(seed_cfg)
                cfg_k.fold = k
                code = run(cfg_k, args) or 0
                if code:
                    return code
        return 0

    return report_errors(main)


def report_errors(main: Callable[[], int]) -> int:
    """``main()``, with what a user can fix ended by one ``error:`` line on stderr and exit code 2, not a
    traceback: a bad config or input file, an operating-system error (the path it concerns and what to do: a
    full disk, a read-only or missing folder, no permission) and a damaged or unsafe archive. Every entry point
    (the stage scripts, ``python -m ichpipe``) runs through this."""
    try:
        return main()
    except (ConfigError, InputError) as exc:
        print(f"error: {first_line(exc, MESSAGE_LIMIT)}", file=sys.stderr)
    except OSError as exc:
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        print(f"error: a damaged or unsafe archive ({type(exc).__name__}: {first_line(exc)})", file=sys.stderr)
    return 2


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: the path (both for a rename), the system's words, and what to do."""
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p) or "an output file"
    what = exc.strerror or first_line(exc, MESSAGE_LIMIT)
    hint = HINTS.get(exc.errno, "")
    return f"{where}: {what}" + (f"; {hint}" if hint else "")


MESSAGE_LIMIT = 2000  # our own messages are one line of a few hundred characters; a library's are cut
ELSEWHERE = "write the outputs elsewhere with data.work_dir=PATH"
HINTS = {
    errno.ENOSPC: f"free some space there, or {ELSEWHERE} (TMPDIR for temporary files)",
    errno.EDQUOT: f"free some space there, or {ELSEWHERE}",
    errno.EROFS: ELSEWHERE, errno.EACCES: ELSEWHERE, errno.EPERM: ELSEWHERE,
    errno.ENOTDIR: "a file stands where a folder is needed: give another path",
    errno.EISDIR: "a folder stands where a file is needed: give another path",
    errno.ENOENT: "check the path",
}


def table_folds(cfg: Config) -> list[int]:
    """The folds of stage 1's metadata table (an error when stage 1 has not run)."""
    from ichpipe.base.paths import data_paths, read_metadata

    return [int(k) for k in sorted(read_metadata(data_paths(cfg)).fold.dropna().unique())]


def print_folds(cfg: Config, args: argparse.Namespace) -> None:
    """The folds of stage 1's metadata table, space-separated (``make train GPUS=N`` loops over them)."""
    print(" ".join(map(str, table_folds(cfg))))


def print_path(name: str) -> Callable[[Config, argparse.Namespace], None]:
    """Prints one of the pipeline's paths for a config (``paths.named_path``): what the Makefile asks for."""
    from ichpipe.base.paths import named_path

    return lambda cfg, args: print(named_path(cfg, name))


if __name__ == "__main__":  # python -m ichpipe.base.cli folds | path NAME, then [--config FILE] [key=value ...]
    if sys.argv[1:2] == ["folds"]:
        sys.exit(stage_main("Print the folds of the metadata table.", print_folds, argv=sys.argv[2:]))
    if sys.argv[1:2] == ["path"] and len(sys.argv) > 2:
        sys.exit(stage_main("Print one of the pipeline's paths.", print_path(sys.argv[2]), argv=sys.argv[3:]))
    sys.exit("usage: python -m ichpipe.base.cli folds | path NAME  [--config FILE] [key=value ...]")
