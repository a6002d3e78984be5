"""In-process Python API: numpy in, numpy out, no cluster.  See :func:`kernel_gradients`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import InputError
from .gradients import (DTYPES, MODES, TileShape, block_setup, block_sums, formulation, on_cpu,
                        prepare_sources, query_blocks, source_center, needs_x64, thread_x64, x64_enabled)
from .inputs import as_point_array, as_weights, check_range, check_same_dim
from .kernels import make_spec
from .plan import make_plan, usable_cores


def kernel_gradients(points, sources=None, weights=None, *, kernel="rbf", lengthscale=1.0, variance=1.0,
                     dtype="float32", mode="auto", return_value=False, **params):
    """Summed input-gradients of a kernel sum, in this process.

    For queries ``q_j`` (rows of ``points``) and sources ``x_i`` with weights ``w_i``:

        g_j = sum_i w_i grad_q k(q_j, x_i)     (the derivative in the first argument only)
        v_j = sum_i w_i k(q_j, x_i)

    Parameters
    ----------
    points : array (N, D), or (N,) meaning D = 1 (the gradient then has shape (N,)).
    sources : array (M, D), default ``points``.
    weights : array (M,), default ones.
    kernel : a name from :data:`pipeline.kernels.KERNELS` or a user kernel ``"module:function"``.
    lengthscale : scalar or one per dimension (same units as the points).
    variance : the kernel's scale s2 (units of k).
    dtype : ``"float32"`` or ``"float64"``: the compute precision (sums are accumulated in float64).
    mode : ``"auto"`` (structured fast path where the kernel has one), ``"jacfwd"`` or ``"jacrev"``
        (generic ``vmap`` over rows of that JAX transform).
    return_value : also return the kernel sums ``v``.
    **params : the kernel's own parameters (``alpha``, ``c``, ``beta``, ``period``, ``degree``).

    Returns
    -------
    g, or (g, v) with ``return_value=True``; numpy arrays of ``dtype``.
    """
    queries = as_point_array(points, "points")
    one_d = np.ndim(points) == 1
    srcs = queries if sources is None else as_point_array(sources, "sources")
    check_same_dim(queries, srcs)
    w = None if weights is None else as_weights(weights, srcs.shape[0])
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is not known; use one of {', '.join(MODES)}")
    spec = make_spec(kernel, queries.shape[1], lengthscale, variance, **params)
    plan = make_plan(queries.shape[0], srcs.shape[0], queries.shape[1], dtype=dtype,
                     formulation=formulation(spec, mode))
    shape = TileShape(plan.rows, plan.cols, plan.tiles_per_call)
    center = source_center(srcs, spec)
    check_range(srcs, "sources", center, spec.lengthscale, dtype)
    check_range(queries, "points", center, spec.lengthscale, dtype)
    prepared = prepare_sources(srcs, w, spec, dtype, shape, center=center)
    g = np.empty(queries.shape, dtype=dtype)
    v = np.empty(queries.shape[0], dtype=dtype)
    # Blocks as a dask run makes them (pipeline.execute.run_task): within each of the plan's tasks, rows in
    # spatial order, so the in-process API gives the same bits as the CLI.
    blocks = [task.start + rows for task in plan.tasks
              for rows in query_blocks(queries[task.start:task.stop], spec, plan.rows)]
    setups = [block_setup(queries[rows], prepared, spec, mode, dtype) for rows in blocks]
    x64 = needs_x64(spec, mode, dtype) or any(s.variant.float64 for s in setups)

    def one_block(index):
        rows = blocks[index]
        g[rows], v[rows] = block_sums(queries[rows], prepared, spec, mode, dtype, shape, setups[index])

    starts = range(len(blocks))
    threads = min(len(starts), usable_cores()) if on_cpu() else 1
    with x64_enabled(x64):
        if threads <= 1:
            for start in starts:
                one_block(start)
        else:
            _run_blocks_in_threads(one_block, starts, threads)
    if one_d:
        g = g[:, 0]
    return (g, v) if return_value else g


def _run_blocks_in_threads(one_block, starts, threads: int) -> None:
    """One query block per core at a time (JAX releases the GIL while XLA runs); each block's bits are the
    same as on one thread.  Worker threads get the calling thread's effective x64 switch (a caller's
    ``with jax.enable_x64(...)`` is per thread).  On the first error the blocks not yet started are
    cancelled and the error is raised."""
    import jax

    x64 = bool(jax.config.read("jax_enable_x64"))

    def run(start):
        with thread_x64(x64):
            one_block(start)

    with ThreadPoolExecutor(threads, thread_name_prefix="kgrad-block") as pool:
        futures = [pool.submit(run, start) for start in starts]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
