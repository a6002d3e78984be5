"""The worker side of a run: the task that computes and stores one output chunk, and what a worker process keeps.

:func:`run_task` (and :func:`run_task_reporting`, what the runner submits) run inside dask worker
processes; they are top-level functions of this module so that dask pickles them by reference.  A
:class:`Job` is all a worker needs for any task of a run.  Each worker process keeps the prepared sources
of the current run (:func:`_prepared_sources`) and, on local clusters with ``pin_cores``, pins itself to one
core (:func:`_pin_to_core`).

Workers build their jitted functions lazily (one compile per process and tile shape, kept in the
persistent compilation cache), read their query rows and the sources from the input stores themselves,
write whole output chunks, and return only small dicts: no JAX arrays or jitted functions cross the wire.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from . import lease, store
from .output import OutputGroup, SpatialCopy
from .errors import InputError, InputsChanged, NonFiniteResultError, RunEnded, task_failure
from .blocks import compute_rows
from .finite import check_finite_result
from .tiles import TileShape
from .kernels import KernelSpec
from .plan import Task


@dataclass(frozen=True)
class Job:
    """All a worker needs for any task of a run (small, picklable, immutable)."""

    points: store.InputRef
    sources: store.InputRef | None  # None: the points are the sources
    weights: store.InputRef | None  # None: unit weights
    spec: KernelSpec
    mode: str
    dtype: str
    shape: TileShape
    center: tuple[float, ...]
    out: str
    out_options: tuple = ()
    fingerprint: str = ""
    sources_fingerprint: str | None = None  # checked by each worker after it reads the sources
    weights_fingerprint: str | None = None
    pin_cores: bool = False
    cache_dir: str | None = None
    lease_token: str | None = None  # the run's lease on ``out``: tasks write only while the run holds it
    pruned: "PrunedJob | None" = None  # a pruned run (tolerance > 0): tasks are ranges of the spatial order
    output_id: str = ""  # the output's id: tasks write only into its arrays (pipeline/fenced.py)


@dataclass(frozen=True)
class PrunedJob:
    """What the tasks of a pruned run need beyond :class:`Job` (the sorted copy is in ``OUT/order/``)."""

    budget_value: float  # pipeline.pruning.Budget, in units of the kernel's profile
    budget_slope: float
    source_count: int
    lower: tuple[float, ...]  # the sources' bounding box (input units)
    upper: tuple[float, ...]
    may_cancel: bool  # float32 terms may cancel (weights of both signs)
    separate_sources: bool  # OUT/order/sources (else the sorted points are the sources)
    source_chunk: int  # rows per chunk of the sorted sources
    copy_id: str = ""  # the sorted copy the tasks read (OUT/order/ attribute, new each time it is written)


_SOURCES: dict = {}  # this worker process's prepared sources: one run's at a time


def _prepared_sources(job: Job):
    """Sources prepared once per worker process and run (keyed by the run's fingerprint)."""
    from .sources import prepare_sources

    key = (job.fingerprint, job.dtype, job.shape)
    if key not in _SOURCES:
        _SOURCES.clear()
        ref = job.sources or job.points
        sources, fingerprint = store.load_input(ref, "sources")
        _check_same_data(ref, fingerprint, job.sources_fingerprint)
        weights = None
        if job.weights is not None:
            weights, fingerprint = store.load_input(job.weights, "weights")
            _check_same_data(job.weights, fingerprint, job.weights_fingerprint)
        _SOURCES[key] = prepare_sources(sources, weights, job.spec, job.dtype, job.shape,
                                        center=np.asarray(job.center)).to_device()
    return _SOURCES[key]


def _check_same_data(ref, found: str, expected: str | None) -> None:
    if expected is not None and found != expected:
        raise InputsChanged(f"{ref.describe()} changed since the run checked it, or is not the same file on "
                            f"every worker (fingerprint {found[:12]} != {expected[:12]})")


_PINNED = False


def _pin_to_core() -> None:
    """Pin every thread of this worker process to one core (local clusters with workers <= cores).

    XLA sizes its thread pool from the machine, not from dask; pinning stops two workers' pools from
    fighting over the same cores.  Threads started later inherit the mask of the thread that starts them.
    """
    global _PINNED
    if _PINNED or not hasattr(os, "sched_setaffinity"):
        return
    _PINNED = True
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except Exception:
        return
    cores = sorted(os.sched_getaffinity(0))
    core = {cores[index % len(cores)]}
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), core)
        except OSError:
            pass


def _check_lease(job: Job):
    """Check that the task's run still holds the output's lease (raises :class:`RunEnded`), and return the
    check, to be made again right before the task is marked done: a run that lost the output (ended, taken
    over) never writes there.  None for a job without a lease."""
    if job.lease_token is None:
        return None
    still_owner = functools.partial(lease.check_owner, job.out, job.lease_token, job.out_options)
    still_owner()
    return still_owner


def run_task(job: Job, task: Task, rows_digest: str | None = None) -> dict:
    """Compute and store one output chunk: rows ``[task.start, task.stop)`` against all sources.

    ``rows_digest``: the client's digest of these query rows; the task refuses rows that differ (points
    rewritten during the run), so a run never mixes two versions of its inputs."""
    from .cache import enable_compilation_cache
    from .precision import enable_x64

    started = time.perf_counter()
    if job.pin_cores:
        _pin_to_core()
    enable_compilation_cache(job.cache_dir)
    enable_x64()
    prepared = _prepared_sources(job)
    queries = store.read_rows(job.points, task.start, task.stop)
    if queries.shape != (task.rows, len(job.center)):
        raise InputsChanged(f"worker read points of shape {queries.shape} for rows {task.start}:{task.stop} "
                            f"of {job.points.describe()}, expected {(task.rows, len(job.center))}; "
                            f"is the path shared by all workers?")
    if rows_digest is not None and store.rows_digest(queries) != rows_digest:
        raise InputsChanged(f"points rows {task.start}:{task.stop} of {job.points.describe()} changed since "
                            f"the run checked them, or differ on this worker")
    computed = time.perf_counter()
    gradient, value = compute_rows(queries, prepared, job.spec, job.mode, job.dtype, job.shape)
    compute_seconds = time.perf_counter() - computed
    check_finite_result(gradient, value, job.dtype, job.spec.describe(), rows=(task.start, task.stop))
    still_owner = _check_lease(job)
    OutputGroup(job.out, job.out_options).write_task(task.start, task.stop, task.index, gradient, value,
                                                     job.output_id or None, before_done=still_owner)
    return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
            "compute_seconds": compute_seconds, "pid": os.getpid()}


def run_task_reporting(job: Job, task: Task, rows_digest: str | None = None) -> dict:
    """:func:`run_task`, with the failures that a retry cannot mend returned as ``{"failed": kind,
    "message": line}`` instead of raised: dask must not retry them (same inputs, same failure) and the
    worker must not log them (the client ends the run with the one line).  Anything else (a lost file
    system, a full disk) is raised, and dask retries it."""
    try:
        return run_pruned_task(job, task) if job.pruned is not None else run_task(job, task, rows_digest)
    except NonFiniteResultError as exc:
        return {"index": task.index, "failed": "nonfinite", "message": f"{exc}; the task's rows were not written",
                "step": "start it again with --dtype float64 and --overwrite"}
    except (InputsChanged, InputError, RunEnded) as exc:
        failure = task_failure(exc)
        return {"index": task.index, "failed": type(exc).__name__, "message": str(failure), "step": failure.step}


# ---------------------------------------------------------------------------------------------- pruned runs

_INDEX: dict = {}  # copy id -> the tile index of the run's sorted sources
_CHUNKS: collections.OrderedDict | None = None  # (copy id, chunk) -> (sorted source rows, weights or None)
_LOCK = threading.Lock()  # the caches are shared by a worker's threads


def _tile_index(job: Job, copy: SpatialCopy):
    from .pruning import TileIndex

    with _LOCK:
        found = _INDEX.get(job.pruned.copy_id)
    if found is None:
        found = TileIndex.from_array(copy.read("tiles"))
        with _LOCK:
            _INDEX.clear()
            _INDEX[job.pruned.copy_id] = found
    return found


def _source_rows(job: Job, copy: SpatialCopy, chunks: np.ndarray) -> dict:
    """The sorted sources' chunks ``chunks`` (rows, weights), from this process's cache or the copy.  The
    cache keeps at most :data:`pipeline.plan.PRUNED_HELD_SOURCES` rows beyond what one task needs."""
    from .plan import PRUNED_HELD_SOURCES

    global _CHUNKS
    name = "sources" if job.pruned.separate_sources else "points"
    size = job.pruned.source_chunk
    found = {}
    for chunk in (int(c) for c in chunks):
        key = (job.pruned.copy_id, chunk)
        with _LOCK:
            if _CHUNKS is None:
                _CHUNKS = collections.OrderedDict()
            cached = _CHUNKS.get(key)
            if cached is not None:
                _CHUNKS.move_to_end(key)
        if cached is None:
            start, stop = chunk * size, (chunk + 1) * size
            cached = (copy.read(name, start, stop), copy.read("weights", start, stop))
            with _LOCK:
                _CHUNKS[key] = cached
        found[chunk] = cached
    with _LOCK:
        while len(_CHUNKS) * size > PRUNED_HELD_SOURCES and len(_CHUNKS) > len(found):
            _CHUNKS.popitem(last=False)
    return found


def _check_copy(job: Job, copy: SpatialCopy) -> None:
    """The run's own sorted copy, whole: else this task's run has ended (its copy was replaced or removed)."""
    state = copy.attributes()
    if not (state.get("ready") is True and state.get("run_fingerprint") == job.fingerprint
            and state.get("copy_id") == job.pruned.copy_id):
        raise RunEnded(f"the sorted copy in {copy.location!r} was replaced or removed; this task's results "
                       f"are dropped")


def _source_tiles(job: Job, copy: SpatialCopy, index, tiles: np.ndarray):
    """The prepared source tiles ``tiles`` (global ids, ascending) for this task."""
    from .sources import PreparedSources
    from .pruned import SourceTiles
    from .pruning import INDEX_TILE
    from .spatial import tile_rows

    size = job.pruned.source_chunk
    rows = tile_rows(tiles, index.counts, INDEX_TILE)  # rows of the sorted sources, ascending
    needed = np.unique(rows // size)
    chunks = _source_rows(job, copy, needed)
    at = np.searchsorted(needed, rows // size) * size + rows % size  # the same rows in the chunks read
    sources = np.concatenate([chunks[c][0] for c in needed])[at] if len(needed) else np.zeros((0, len(job.center)))
    weights = None
    if len(needed) and chunks[needed[0]][1] is not None:  # weighted run (else unit weights)
        weights = np.concatenate([chunks[c][1] for c in needed])[at]
    p = job.pruned
    meta = PreparedSources(None, None, np.asarray(job.center), p.source_count, lower=np.asarray(p.lower),
                           upper=np.asarray(p.upper), may_cancel=p.may_cancel)
    return SourceTiles.build(tiles, sources, weights, job.spec, job.dtype, INDEX_TILE, np.asarray(job.center), meta)


def run_pruned_task(job: Job, task: Task) -> dict:
    """Compute and store one task of a pruned run: rows ``[task.start, task.stop)`` of the points in spatial
    order, each block against the source tiles it cannot skip, read from the run's sorted copy."""
    from .cache import enable_compilation_cache
    from .precision import enable_x64
    from .pruned import blocks_to_compute, compute_blocks
    from .pruning import Budget, kernel_bounds

    started = time.perf_counter()
    if job.pin_cores:
        _pin_to_core()
    enable_compilation_cache(job.cache_dir)
    enable_x64()
    copy = SpatialCopy(OutputGroup(job.out, job.out_options))
    _check_copy(job, copy)
    queries = copy.read("points", task.start, task.stop)
    index = _tile_index(job, copy)
    bounds = kernel_bounds(job.spec)
    budget = Budget(job.pruned.budget_value, job.pruned.budget_slope)
    computed = time.perf_counter()
    selection = blocks_to_compute(queries, job.spec, job.shape.rows, index, bounds, budget)
    needed = np.unique(np.concatenate(selection.kept)) if selection.kept else np.zeros(0, np.int64)
    tiles = _source_tiles(job, copy, index, needed)
    _check_copy(job, copy)  # still the copy it started reading (its caches are keyed by the copy's id)
    gradient, value, pairs = compute_blocks(queries, selection, tiles, index.counts, bounds, budget, job.spec,
                                            job.mode, job.dtype, job.shape)
    compute_seconds = time.perf_counter() - computed
    check_finite_result(gradient, value, job.dtype, job.spec.describe(), rows=(task.start, task.stop))
    still_owner = _check_lease(job)
    copy.write_task(task.start, task.stop, task.index, gradient, value, pairs, job.output_id,
                    before_done=still_owner)
    return {"index": task.index, "rows": task.rows, "seconds": time.perf_counter() - started,
            "compute_seconds": compute_seconds, "pid": os.getpid(), "pairs": pairs,
            "tiles_held": int(len(needed))}
