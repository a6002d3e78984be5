"""Pure planning: tile shapes, the task list, projected memory and time.  No dask, no zarr, no JAX.

A run over N query points and M sources is split into *tasks* of ``rows_per_task`` consecutive query
rows (one output chunk each).  A task walks all M sources in fixed-shape calls of ``tiles_per_call``
tiles of ``rows x cols`` pairs, so each worker compiles once per (kernel, dtype, tile shape).

Memory is a checked quantity: :func:`make_plan` projects the bytes one task holds at its peak and
raises :class:`~pipeline.errors.InputError` before anything runs when that cannot fit the workers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import InputError

MiB = 2**20
GiB = 2**30


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroups, a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

# Tile shapes per formulation, chosen by measurement on a 2-core AVX-512 machine (benchmarks/).
DEFAULT_TILES = {
    "radial": (1024, 512),
    "dot": (512, 1024),
    "generic": (128, 512),
}
# Pruned runs (tolerance > 0): small tiles, so that a block gathers only the tiles it needs; a call holds
# PRUNED_TILES_PER_CALL tiles (the kept tiles of a block are padded to whole calls).
PRUNED_TILES = (512, 256)
PRUNED_TILES_PER_CALL = 8
PRUNED_BLOCKS_PER_TASK = 32
PRUNED_HELD_SOURCES = 1 << 22  # sources a worker keeps prepared for pruned tasks (pipeline.worker)
MAX_TILES_PER_CALL = 64
# Rough single-process throughput (pairs per second, float32) used for the time estimate only.
PAIR_RATE = {"radial": 1.2e9, "dot": 1.5e9, "generic": 0.15e9}
FLOAT64_SLOWDOWN = 3.0
PRUNED_SLOWDOWN = 9.0  # per pair, small gathered calls plus the per-block selection (measured: 10^6 clustered points, rbf:
# 9.2 ns per pair of the pruned plan on one core, its sub-block level counted)
# The fixed cost of a run on a local cluster, whatever its size: starting the cluster, importing JAX in the
# workers and compiling the first tiles (measured: about 4 s, benchmarks/pruning.py at N = 10^5, 2 cores).
STARTUP_SECONDS = 4.0
# Cost per pair grows with D (r2 and the gradient GEMMs are O(D); the generic path's per-pair gradient
# more so): the fraction added per dimension beyond D = 3, fitted to in-process runs at D = 1..200
# (rbf 1.0 -> 9.3 ns/pair from D = 3 to 200, polynomial 0.8 -> 3.9, periodic 10.5 -> 476; 2 busy cores).
COST_PER_EXTRA_DIM = {"radial": 0.041, "dot": 0.020, "generic": 0.23}
# Resident memory of an idle worker process with JAX loaded (measured: ~250 MiB), and the live
# (rows x cols) temporaries of one tile call (r2, f', f, and XLA's scratch).
WORKER_BASELINE_BYTES = 400 * MiB
TILE_TEMPORARIES = 8
READ_BLOCK_ROWS = 1 << 18  # = pipeline.store.READ_ROWS
# dask pauses a worker once its process uses this fraction of its memory limit (distributed.worker.memory
# .pause, default 0.8) and its nanny kills it at 0.95: a plan has to fit below the pause, not the limit.
PAUSE_FRACTION = 0.8


def memory_fraction(config_get=None) -> float:
    """The fraction of a worker's memory limit that tasks may use before dask pauses (or, with pausing off,
    terminates) the worker, from dask's configuration (``config_get``: dask.config.get, for tests)."""
    if config_get is None:
        import dask

        config_get = dask.config.get
    for key in ("distributed.worker.memory.pause", "distributed.worker.memory.terminate"):
        value = config_get(key, None)
        if value not in (None, False):
            return float(value)
    return 1.0


def worker_memory_needed(task_memory_bytes: int, threads: int = 1, fraction: float = PAUSE_FRACTION) -> int:
    """The smallest worker memory limit under which ``threads`` tasks at once (plus the worker's own
    baseline) stay below the fraction at which dask pauses the worker."""
    return math.ceil((max(1, threads) * task_memory_bytes + WORKER_BASELINE_BYTES) / fraction)


@dataclass(frozen=True)
class Task:
    """One unit of work: query rows ``[start, stop)``, written as output chunk ``index``."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    """Everything decided before a run starts.  Frozen: the executor only reads it."""

    n_points: int
    n_sources: int
    dim: int
    dtype: str
    formulation: str
    rows: int  # query rows per compiled call (padded)
    cols: int  # sources per tile
    tiles_per_call: int
    rows_per_task: int  # = output chunk length along "point"
    tasks: tuple[Task, ...]
    task_memory_bytes: int  # projected peak bytes one task holds, beyond the worker's baseline
    worker_memory_bytes: int | None  # each worker's memory limit (None: not checked)
    workers: int
    estimated_seconds: float
    tolerance: float = 0.0
    pruned: bool = False  # tolerance > 0 and the kernel prunes: tasks are ranges of the spatial order
    estimated_pairs: int | None = None  # pairs left after pruning (None: all N x M)
    exact_reason: str = ""  # with a tolerance: why the methods before the one chosen declined (for dense: why
    # every pair is computed)
    parallel: int = 1  # tasks that run at once (workers, at most the cores): what the compute time divides by
    method_cost: tuple | None = None  # (compute seconds, the sum in words): a method whose cost is not per pair

    @property
    def pairs_to_compute(self) -> int:
        return self.pairs if self.estimated_pairs is None else self.estimated_pairs

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def pairs(self) -> int:
        return self.n_points * self.n_sources

    def summary(self) -> dict:
        """Plain-data view (for printing, JSON and the output's attributes)."""
        return {
            "n_points": self.n_points, "n_sources": self.n_sources, "dim": self.dim,
            "dtype": self.dtype, "formulation": self.formulation,
            "tile_rows": self.rows, "tile_cols": self.cols, "tiles_per_call": self.tiles_per_call,
            "rows_per_task": self.rows_per_task, "n_tasks": self.n_tasks,
            "pairs": self.pairs, "task_memory_bytes": self.task_memory_bytes,
            "worker_memory_bytes": self.worker_memory_bytes, "workers": self.workers,
            "estimated_seconds": round(self.estimated_seconds, 3),
            "tolerance": self.tolerance, "pruned": self.pruned, "estimated_pairs": self.pairs_to_compute,
            **({"exact_reason": self.exact_reason} if self.exact_reason else {}),
        }


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float64": 8}[dtype]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pow2_at_least(value: int, floor: int = 8) -> int:
    return max(floor, 1 << max(0, (value - 1).bit_length()))


def tile_shape(n_points: int, n_sources: int, formulation: str, rows: int | None = None,
               cols: int | None = None, pruned: bool = False) -> tuple[int, int, int]:
    """(rows, cols, tiles_per_call): defaults per formulation (pruned runs: :data:`PRUNED_TILES`), shrunk
    (to powers of two) for small inputs so that a 100-point problem does not pad to a 512 x 1024 tile."""
    default_rows, default_cols = PRUNED_TILES if pruned else DEFAULT_TILES[formulation]
    rows = rows or min(default_rows, _pow2_at_least(n_points))
    cols = cols or min(default_cols, _pow2_at_least(n_sources))
    most = PRUNED_TILES_PER_CALL if pruned else MAX_TILES_PER_CALL
    tiles = min(most, max(1, math.ceil(n_sources / cols)))
    return rows, cols, tiles


def pair_arrays(formulation: str, dim: int, distances: str = "gemm") -> int:
    """How many (rows x cols) arrays one tile call holds at its peak: r2, f', f and XLA scratch for the
    GEMM forms; plus the D coordinate-difference arrays (direct distances) or the pairs' coordinates and
    gradients, 3 D arrays (the generic path)."""
    if formulation == "generic":
        return TILE_TEMPORARIES + 3 * dim
    if distances == "direct":
        return TILE_TEMPORARIES + dim
    return TILE_TEMPORARIES


def task_memory(n_sources: int, dim: int, dtype: str, rows: int, cols: int, tiles_per_call: int,
                rows_per_task: int, pair_arrays: int = None) -> int:
    """Projected peak bytes held by one task (beyond the worker's baseline), the terms in the order a
    worker holds them (pipeline.store.load_input, pipeline.sources.prepare_sources, pipeline.blocks.block_sums):

    the sources as read (up to float64) and the read buffers of one block, the padded copy (8 bytes a
    value: float64, or float32 hi/lo pairs), one call's tile temporaries (r2, f', f and XLA scratch, in float64 at worst), the per-tile
    partial sums of every call in flight, and the task's queries and output block.
    """
    item = _itemsize(dtype)
    padded = _round_up(max(n_sources, 1), cols * tiles_per_call)
    calls = padded // (cols * tiles_per_call)
    read = n_sources * (dim + 1) * 8 + min(n_sources, READ_BLOCK_ROWS) * (dim + 1) * 8 * 2
    prepared = padded * (dim + 1) * 8  # float64, or float32 hi/lo pairs (pipeline.sources.PreparedSources)
    temporaries = (pair_arrays or TILE_TEMPORARIES) * rows * cols * 8 + rows * (dim + 2) * 8 * 2
    partials = calls * tiles_per_call * rows * (dim + 1) * item + rows * (dim + 1) * 8 * 2
    task = rows_per_task * dim * 8 + rows_per_task * (dim + 1) * (8 + item)
    return read + prepared + temporaries + partials + task


def make_plan(n_points: int, n_sources: int, dim: int, *, dtype: str = "float32",
              formulation: str = "radial", workers: int = 1, worker_memory_bytes: int | None = None,
              rows: int | None = None, cols: int | None = None, rows_per_task: int | None = None,
              cores: int | None = None, threads_per_worker: int = 1,
              distances: str = "gemm", usable_fraction: float = PAUSE_FRACTION, pruned: bool = False) -> Plan:
    """Plan a run; raise :class:`InputError` if the inputs are empty or a task cannot fit in memory.

    ``pruned``: a run with a tolerance on a kernel that prunes (small tiles, bigger tasks); the pairs left
    after pruning are estimated later (:func:`with_pruning`)."""
    if n_points < 1 or n_sources < 1 or dim < 1:
        raise InputError(f"nothing to compute: N={n_points} points, M={n_sources} sources, D={dim}; "
                         f"each must be at least 1")
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype={dtype!r} is not supported; use float32 or float64")
    if formulation not in DEFAULT_TILES:
        raise ValueError(f"formulation={formulation!r}; one of {', '.join(DEFAULT_TILES)}")
    if workers < 1:
        raise InputError(f"workers={workers} must be at least 1")
    for name, value in (("tile rows", rows), ("tile cols", cols), ("rows per task", rows_per_task)):
        if value is not None and value < 1:
            raise InputError(f"{name}={value} must be at least 1")
    explicit_rows = rows is not None
    rows, cols, tiles = tile_shape(n_points, n_sources, formulation, rows, cols, pruned)
    if rows_per_task is None:
        # 1..16 blocks per task (pruned: 1..64), aiming at >= 16 tasks.  Independent of the worker count, so
        # the task list (and the output's chunks) is the same however many workers run or resume it.
        blocks = math.ceil(n_points / rows)
        per_task = min(PRUNED_BLOCKS_PER_TASK if pruned else 16, max(1, blocks // 16))
        rows_per_task = rows * per_task
    else:
        if not explicit_rows:  # honour the chunking asked for: the fewest equal tiles that cover it
            rows = math.ceil(rows_per_task / math.ceil(rows_per_task / rows))
        rows_per_task = _round_up(rows_per_task, rows)
    tasks = tuple(Task(i, start, min(start + rows_per_task, n_points))
                  for i, start in enumerate(range(0, n_points, rows_per_task)))
    # A pruned task holds only the source tiles its blocks need (at most PRUNED_HELD_SOURCES in its cache).
    held = min(n_sources, PRUNED_HELD_SOURCES) if pruned else n_sources
    memory = task_memory(held, dim, dtype, rows, cols, tiles, rows_per_task,
                         pair_arrays=pair_arrays(formulation, dim, distances))
    concurrent = max(1, threads_per_worker)  # a worker with T threads runs T tasks at once
    needed = worker_memory_needed(memory, concurrent, usable_fraction)
    if worker_memory_bytes is not None and needed > worker_memory_bytes:
        tasks = "a task needs" if concurrent == 1 else f"{concurrent} tasks at once need"
        raise InputError(
            f"{tasks} about {concurrent * memory / MiB:.0f} MiB (+{WORKER_BASELINE_BYTES / MiB:.0f} MiB "
            f"worker baseline), which must stay below the {usable_fraction:.0%} of a worker's memory at which "
            f"dask pauses it: workers need {needed / MiB:.0f} MiB but have {worker_memory_bytes / MiB:.0f} MiB; "
            f"use fewer workers (more memory each){', float32' if dtype == 'float64' else ''}, or fewer "
            f"sources per run (M={n_sources})")
    parallel = max(1, min(workers, cores or workers))
    estimated = compute_seconds(n_points * n_sources, formulation, dim, dtype, pruned, parallel)
    return Plan(n_points, n_sources, dim, dtype, formulation, rows, cols, tiles, rows_per_task, tasks,
                memory, worker_memory_bytes, workers, estimated, pruned=pruned, parallel=parallel)


# Methods that know their work per row give tasks rows for at least a set number of projected seconds (a
# task's fixed cost: reading its rows, writing its results, the scheduler, a pruned task's per-task
# selection), but at most N / MIN_TASKS rows (progress, resume and the workers' balance).
MIN_TASKS = 16


def task_rows(n: int, seconds_per_row: float, task_seconds: float, multiple: int, default: int) -> int:
    """Rows per task: enough for ``task_seconds`` of projected work at ``seconds_per_row``, at most
    ``n / MIN_TASKS``, never fewer than the plan's ``default``; a multiple of ``multiple`` (the plan's
    block).  Independent of the cluster, so the task list is the same however many workers run it."""
    rows = min(math.ceil(task_seconds / max(seconds_per_row, 1e-15)), math.ceil(n / MIN_TASKS))
    return max(default, -(-rows // multiple) * multiple)


def pair_seconds(formulation: str, dim: int, dtype: str, pruned: bool = False) -> float:
    """Seconds one worker spends per pair: the measured rate of the formulation (:data:`PAIR_RATE`, float32,
    D = 3), times the measured growth with D, :data:`FLOAT64_SLOWDOWN` for float64 and
    :data:`PRUNED_SLOWDOWN` for a pruned run's pairs (small gathered calls plus the per-block selection)."""
    per_pair = max(0.5, 1.0 + COST_PER_EXTRA_DIM[formulation] * (dim - 3)) / PAIR_RATE[formulation]
    return (per_pair * (FLOAT64_SLOWDOWN if dtype == "float64" else 1.0)
            * (PRUNED_SLOWDOWN if pruned else 1.0))


def compute_seconds(pairs: int, formulation: str, dim: int, dtype: str, pruned: bool, parallel: int) -> float:
    """Seconds of computing for ``pairs`` pairs on ``parallel`` workers at once (no start-up)."""
    return pairs * pair_seconds(formulation, dim, dtype, pruned) / max(1, parallel)


@dataclass(frozen=True)
class Projection:
    """A run's projected wall time: the fixed start-up plus the computing, and what the numbers rest on."""

    seconds: float
    startup_seconds: float
    compute_seconds: float
    terms: str  # the sum, in words: start-up + pairs x cost per pair / workers
    basis: str  # the terms and where the costs come from

    def __str__(self) -> str:
        return f"{self.seconds:.1f} s ({self.basis})"


def project(plan: Plan) -> Projection:
    """The one projection of a run's time, for an exact plan and a pruned one alike (``kgrad plan`` prints it,
    and the hint for an exact run projects the tolerance's plan with it): :data:`STARTUP_SECONDS` plus the
    pairs it computes at the measured per-pair cost (:func:`pair_seconds`) over the workers at once.  It
    is rough: the costs were measured on one machine (2 cores, AVX-512), and the data's layout changes a
    pruned run's cost."""
    if plan.method_cost is not None:
        compute, terms = plan.method_cost
        return Projection(STARTUP_SECONDS + compute, STARTUP_SECONDS, compute, f"{STARTUP_SECONDS:.0f} s start-up + {terms}",
                          f"{STARTUP_SECONDS:.0f} s start-up + {terms}; costs measured on a 2-core machine")
    compute = compute_seconds(plan.pairs_to_compute, plan.formulation, plan.dim, plan.dtype, plan.pruned,
                              plan.parallel)
    per_pair = pair_seconds(plan.formulation, plan.dim, plan.dtype, plan.pruned) * 1e9
    pairs = f"{plan.pairs_to_compute / 1e9:.3g} G pairs" + (" kept" if plan.pruned else "")
    terms = (f"{STARTUP_SECONDS:.0f} s start-up + {pairs} x {per_pair:.2g} ns/pair"
             f"{' (pruned: ' + format(PRUNED_SLOWDOWN, 'g') + 'x per pair)' if plan.pruned else ''}"
             f" / {plan.parallel} worker{'s' if plan.parallel != 1 else ''}")
    return Projection(STARTUP_SECONDS + compute, STARTUP_SECONDS, compute, terms,
                      f"{terms}; costs measured on a 2-core machine")


def with_pruning(plan: Plan, tolerance: float, estimated_pairs: int | None, exact_reason: str = "") -> Plan:
    """The plan with its tolerance and the pairs left after pruning (None: all), its compute time projected
    for them by :func:`compute_seconds`, as every plan's."""
    import dataclasses

    pruned = estimated_pairs is not None
    seconds = compute_seconds(plan.pairs if estimated_pairs is None else estimated_pairs, plan.formulation,
                              plan.dim, plan.dtype, pruned, plan.parallel)
    return dataclasses.replace(plan, tolerance=tolerance, estimated_pairs=estimated_pairs,
                               exact_reason=exact_reason, estimated_seconds=seconds)
