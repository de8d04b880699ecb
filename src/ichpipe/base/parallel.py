"""The one worker pool of the CPU stages (synthetic data, preprocessing): jobs in processes, one progress bar."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from multiprocessing import get_context
from typing import Any

from tqdm import tqdm


def n_workers(workers: int) -> int:
    """``data.workers``: 0 = every core."""
    return workers or os.cpu_count() or 1


def run_pool(fn: Callable[[Any], Any], jobs: Sequence, workers: int, *, total: int, size: Callable[[Any], int],
             desc: str, unit: str = "img", progress: bool = True, ordered: bool = False) -> list:
    """``[fn(job) for job in jobs]`` in ``workers`` processes (in the order finished unless ``ordered``).

    The bar advances by ``size(result)`` per finished job. One job or one worker runs in this process.
    """
    bar = tqdm(total=total, unit=unit, desc=desc, disable=not progress, smoothing=0.05)
    pool = None
    if workers == 1 or len(jobs) <= 1:
        iterator = map(fn, jobs)
    else:
        pool = get_context("spawn" if os.name == "nt" else "fork").Pool(min(workers, len(jobs)))
        iterator = (pool.imap if ordered else pool.imap_unordered)(fn, jobs)
    results = []
    try:
        for res in iterator:
            results.append(res)
            bar.update(size(res))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return results
