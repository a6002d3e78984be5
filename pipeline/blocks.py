"""The one query-block loop: the in-process API and every dask task compute their rows with it.

Rows are grouped as a run's tasks group them (``chunk`` consecutive rows; a task is one chunk), each
group is cut into blocks of at most ``shape.rows`` rows in spatial order (:func:`query_blocks`: compact
blocks, each in its own coordinates), and each block's sums are written back to its rows' own places, so
results stay in input order and are the same bits however the groups are spread over workers or threads.

One block (:func:`block_sums`): its queries are moved to the sources' frame as the sources were
(:mod:`pipeline.sources`), its variant is chosen (:mod:`pipeline.block_precision`), and one jitted call
per ``tiles_per_call`` source tiles (:func:`pipeline.tiles.compiled_block`) returns one partial sum per
tile.  Every call is dispatched first, then the partials are added in float64, in a fixed order, so
results are reproducible bit for bit and float32 error does not grow with the number of sources.  The
summed gradient g (b, D) is in units of k per unit of q, the kernel sum v (b,) in units of k.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .block_precision import BlockSetup, block_setup, needs_x64
from .kernels import KernelSpec
from .lazy_jax import jax
from .precision import thread_x64, x64_active, x64_enabled
from .sources import PreparedSources, split_hi_lo
from .spatial import block_slices, morton_order
from .tiles import TileShape, compiled_block, compiled_items, formulation, pack_layout, split_params


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
    blocks, setups, shapes = split_wide_blocks(queries, blocks, setups, prepared, spec, mode, dtype, shape)
    g = np.empty((n, dim), dtype=dtype)
    v = np.empty(n, dtype=dtype)

    def one_block(index: int) -> None:
        rows = blocks[index]
        g[rows], v[rows] = block_sums(queries[rows], prepared, spec, mode, dtype, shapes[index], setups[index])

    run_blocks(one_block, len(blocks), needs_x64(spec, mode, dtype) or any(s.variant.uses_float64 for s in setups),
               threads)
    return g, v


SPLIT_WIDE = 4  # a float32 block that needs the "wide" variant is computed as this many smaller blocks


def split_wide_blocks(queries: np.ndarray, blocks: list, setups: list, prepared: PreparedSources, spec: KernelSpec,
                      mode: str, dtype: str, shape: TileShape) -> tuple[list, list, list]:
    """Blocks, setups and tile shapes after cutting each float32 block that needs the "wide" variant (its
    radius is above :data:`pipeline.block_precision.FAST_RADIUS_FLOAT32`: sparse regions, short
    lengthscales) into :data:`SPLIT_WIDE` blocks of consecutive rows, each with its own centre and variant.
    Smaller blocks are more compact, so most of them take the float32 tiles (about twice as fast per pair);
    the choice depends only on the block's rows, so the bits do not depend on how rows are spread over
    tasks or workers."""
    small = max(1, shape.rows // SPLIT_WIDE)
    if small == shape.rows or not any(s.variant.distances == "wide" for s in setups):
        return blocks, setups, [shape] * len(blocks)
    small_shape = TileShape(small, shape.cols, shape.tiles_per_call)
    out_blocks, out_setups, out_shapes = [], [], []
    for rows, setup in zip(blocks, setups):
        if setup.variant.distances != "wide":
            out_blocks.append(rows)
            out_setups.append(setup)
            out_shapes.append(shape)
            continue
        for start in range(0, len(rows), small):
            part = rows[start:start + small]
            out_blocks.append(part)
            out_setups.append(block_setup(queries[part], prepared, spec, mode, dtype))
            out_shapes.append(small_shape)
    return out_blocks, out_setups, out_shapes


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


def query_blocks(queries, spec: KernelSpec, rows: int) -> list[np.ndarray]:
    """Row indices of each query block of at most ``rows`` rows, in the order they are computed.

    Stationary kernels: the rows in Morton order of their coordinates scaled by the lengthscales
    (:func:`pipeline.spatial.morton_order`), so that each block is compact; others: input order.  Results
    are written back to the rows' own places, so only which rows share a block changes.
    """
    queries = np.asarray(queries)
    n = len(queries)
    if spec.kernel.stationary and n > rows:
        order = morton_order(queries.astype(np.float64) / np.asarray(spec.lengthscale, np.float64))
    else:
        order = np.arange(n, dtype=np.int64)
    return [order[s] for s in block_slices(n, rows)]


def block_sums(queries, prepared: PreparedSources, spec: KernelSpec, mode: str, dtype: str,
               shape: TileShape, setup: BlockSetup | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed gradient (b, D) and kernel sum (b,) in float64 for up to ``shape.rows`` query rows.
    Needs JAX's x64 switch on (:func:`pipeline.precision.enable_x64` or :func:`x64_enabled`) for float64 runs and for blocks
    whose variant computes in float64 (:func:`block_setup`)."""
    queries = np.asarray(queries)
    b, dim = queries.shape
    if b > shape.rows:
        raise ValueError(f"block of {b} rows exceeds the tile's {shape.rows} rows")
    setup = setup or block_setup(queries, prepared, spec, mode, dtype)
    packed, dynamic, static = _call_inputs(queries, prepared.center, setup, spec, dtype, shape.rows)
    fn = compiled_block(spec.name, static, formulation(spec, mode), mode, dtype, shape, dim, setup.variant)
    # Dispatch every call first (JAX runs them asynchronously), then add the partials in a fixed order.
    partials = [fn(packed, sources, dynamic) for sources in prepared.calls()]
    g_total = np.zeros((shape.rows, dim))
    v_total = np.zeros(shape.rows)
    for g, v in partials:
        g_total += np.sum(np.asarray(g, dtype=np.float64), axis=0)
        v_total += np.sum(np.asarray(v, dtype=np.float64), axis=0)
    return g_total[:b], v_total[:b]


def block_item_sums(queries, calls: list, center: np.ndarray, spec: KernelSpec, mode: str, dtype: str, rows: int,
                    subs: int, setup: BlockSetup) -> tuple[np.ndarray, np.ndarray]:
    """Summed gradient (b, D) and kernel sum (b,) in float64 for one query block of up to ``subs * rows``
    rows cut into ``subs`` sub-blocks of ``rows`` consecutive rows, from items (:func:`pipeline.tiles.compiled_items`):
    ``calls`` is a list of (packed sources (items, cols, S), ``item_sub`` (items,) int32, the number of real
    items: the others are padding, in sub-block order), ``center`` the sources' centre.  Each sub-block's
    rows are the sum of its items' partial sums in float64, item after item: the same bits however blocks
    are spread over tasks."""
    queries = np.asarray(queries)
    b, dim = queries.shape
    if b > subs * rows:
        raise ValueError(f"block of {b} rows exceeds {subs} sub-blocks of {rows} rows")
    packed, dynamic, static = _call_inputs(queries, center, setup, spec, dtype, subs * rows)
    fn = compiled_items(spec.name, static, formulation(spec, mode), mode, dtype, rows, subs, dim, setup.variant)
    g_total = np.zeros((subs, rows, dim))
    v_total = np.zeros((subs, rows))
    partials = [(fn(packed, sources, item_sub, dynamic), real) for sources, item_sub, real in calls]
    if partials:  # items in sub-block order: each sub-block's items are one run, summed in item order
        item_sub = np.concatenate([item_sub[:real] for _, item_sub, real in calls])
        runs = np.flatnonzero(np.diff(item_sub, prepend=-1))
        g = np.concatenate([np.asarray(g, dtype=np.float64)[:real] for (g, _), real in partials])
        v = np.concatenate([np.asarray(v, dtype=np.float64)[:real] for (_, v), real in partials])
        g_total[item_sub[runs]] += np.add.reduceat(g, runs, axis=0)
        v_total[item_sub[runs]] += np.add.reduceat(v, runs, axis=0)
    return g_total.reshape(subs * rows, dim)[:b], v_total.reshape(subs * rows)[:b]


def _call_inputs(queries: np.ndarray, sources_center: np.ndarray, setup: BlockSetup, spec: KernelSpec, dtype: str,
                 rows: int) -> tuple[np.ndarray, dict, tuple]:
    """What every compiled call of one block takes besides its sources: the packed queries
    (:func:`pack_queries`) and the kernel's (dynamic, static) parameters in the block variant's dtype."""
    variant = setup.variant
    if variant.uses_float64 and not x64_active():
        raise RuntimeError("this block computes in float64 but JAX's x64 switch is off (use x64_enabled)")
    packed = pack_queries(queries, sources_center, setup.center, dtype, rows)
    return (packed, *device_params(spec, "float64" if variant.uses_float64 else dtype, x64_active()))


def pack_queries(queries: np.ndarray, sources_center: np.ndarray, block_center: np.ndarray, dtype: str,
                 rows: int) -> np.ndarray:
    """A block's queries as one array for a compiled call: ``q`` (``rows``, relative to the sources'
    centre, padded by repeating the first row), in float32 runs then its low part ``q_lo``, then the block's
    centre minus the sources' centre as a hi/lo pair (:func:`pipeline.tiles.compiled_block`)."""
    b, dim = queries.shape
    split = dtype == "float32"
    _, per_row = pack_layout(dtype, dim)
    packed = np.zeros((per_row * rows + 2, dim), dtype=dtype)
    q, q_lo = packed[:rows], (packed[rows:2 * rows] if split else None)
    split_hi_lo(queries.astype(np.float64) - sources_center, q[:b], q_lo[:b] if split else None)
    q[b:] = q[0] if b else 0.0
    if split:
        q_lo[b:] = q_lo[0] if b else 0.0
    split_hi_lo(np.asarray(block_center, np.float64) - sources_center, packed[-2], packed[-1] if split else None)
    return packed


@functools.lru_cache(maxsize=64)
def device_params(spec: KernelSpec, dtype: str, x64: bool) -> tuple[dict, tuple]:
    """A kernel's parameters as (dynamic, static) (:func:`pipeline.tiles.split_params`), the dynamic ones
    put on the device once per process rather than copied at every call.  ``x64``: JAX's switch as the
    caller has it (a float64 array put with it off would be cast to float32: then the numpy arrays are
    returned, which the call converts itself)."""
    dynamic, static = split_params(spec, dtype)
    with thread_x64(x64):
        put = {name: jax.device_put(value) for name, value in dynamic.items()}
    if any(put[name].dtype != value.dtype for name, value in dynamic.items()):
        return dynamic, static
    return put, static
