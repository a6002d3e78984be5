"""The one query-block loop: the in-process API and every dask task compute their rows with it.

Rows are grouped as a run's tasks group them (``chunk`` consecutive rows; a task is one chunk), each
group is cut into blocks of at most ``shape.rows`` rows in spatial order (:func:`~pipeline.gradients.
query_blocks`: compact blocks, each in its own coordinates), and each block's sums are written back to its
rows' own places, so results stay in input order and are the same bits however the groups are spread
over workers or threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .gradients import (PreparedSources, TileShape, block_setup, block_sums, needs_x64, query_blocks,
                        thread_x64, x64_enabled)
from .kernels import KernelSpec


def compute_rows(queries: np.ndarray, prepared: PreparedSources, spec: KernelSpec, mode: str, dtype: str,
                 shape: TileShape, *, chunk: int | None = None, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """g (n, D) and v (n,) in ``dtype`` for query rows (n, D) against the prepared sources.

    ``chunk``: rows per task (default all ``n``); ``threads``: blocks computed at once in this process
    (JAX releases the GIL while XLA runs; each block's bits are the same on any number of threads)."""
    queries = np.asarray(queries)
    n, dim = queries.shape
    chunk = chunk or max(n, 1)
    blocks = [start + rows for start in range(0, n, chunk)
              for rows in query_blocks(queries[start:start + chunk], spec, shape.rows)]
    setups = [block_setup(queries[rows], prepared, spec, mode, dtype) for rows in blocks]
    g = np.empty((n, dim), dtype=dtype)
    v = np.empty(n, dtype=dtype)

    def one_block(index: int) -> None:
        rows = blocks[index]
        g[rows], v[rows] = block_sums(queries[rows], prepared, spec, mode, dtype, shape, setups[index])

    run_blocks(one_block, len(blocks), needs_x64(spec, mode, dtype) or any(s.variant.float64 for s in setups),
               threads)
    return g, v


def run_blocks(one_block, count: int, x64: bool, threads: int = 1) -> None:
    """``one_block(b)`` for b in ``range(count)``, with JAX's x64 switch on if ``x64``, on up to ``threads``
    threads (each block writes only its own rows, so the bits do not depend on the threads)."""
    with x64_enabled(x64):
        if min(threads, count) <= 1:
            for index in range(count):
                one_block(index)
        else:
            _run_blocks_in_threads(one_block, range(count), min(threads, count))


def _run_blocks_in_threads(one_block, indices, threads: int) -> None:
    """One block per thread at a time.  Worker threads get the calling thread's effective x64 switch (a
    caller's ``with jax.enable_x64(...)`` is per thread).  On the first error the blocks not yet started are
    cancelled and the error is raised."""
    import jax

    x64 = bool(jax.config.read("jax_enable_x64"))

    def run(index):
        with thread_x64(x64):
            one_block(index)

    with ThreadPoolExecutor(threads, thread_name_prefix="kgrad-block") as pool:
        futures = [pool.submit(run, index) for index in indices]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
