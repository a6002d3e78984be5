"""Properties of the pure planner ``pipeline.plan.make_plan`` (hypothesis), and ``kgrad plan`` against it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import InputError
from pipeline.plan import (
    DEFAULT_TILES,
    MAX_TILES_PER_CALL,
    PAUSE_FRACTION,
    WORKER_BASELINE_BYTES,
    make_plan,
    tile_shape,
    worker_memory_needed,
)

FORMULATIONS = tuple(DEFAULT_TILES)
DTYPES = ("float32", "float64")

sizes = st.integers(min_value=1, max_value=10**8)
small_sizes = st.integers(min_value=1, max_value=5000)
dims = st.integers(min_value=1, max_value=64)
formulations = st.sampled_from(FORMULATIONS)
dtypes = st.sampled_from(DTYPES)
workers = st.integers(min_value=1, max_value=512)
overrides = st.one_of(st.none(), st.integers(min_value=1, max_value=4096))

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_tasks(plan):
    """The task list covers [0, N) exactly, in order, without overlap, in whole tiles but the last."""
    tasks = plan.tasks
    assert tasks, "at least one task"
    assert tasks[0].start == 0 and tasks[-1].stop == plan.n_points
    for i, task in enumerate(tasks):
        assert task.index == i
        assert 0 < task.rows <= plan.rows_per_task
        if i:
            assert task.start == tasks[i - 1].stop
    for task in tasks[:-1]:
        assert task.rows == plan.rows_per_task
        assert task.rows % plan.rows == 0
    assert sum(t.rows for t in tasks) == plan.n_points
    assert plan.n_tasks == math.ceil(plan.n_points / plan.rows_per_task)


@SETTINGS
@given(n=sizes, m=sizes, d=dims, form=formulations, dtype=dtypes)
def test_default_plan(n, m, d, form, dtype):
    plan = make_plan(n, m, d, dtype=dtype, formulation=form)
    check_tasks(plan)
    default_rows, default_cols = DEFAULT_TILES[form]
    assert plan.rows <= default_rows and plan.cols <= default_cols
    assert is_pow2(plan.rows) or plan.rows == default_rows
    assert is_pow2(plan.cols) or plan.cols == default_cols
    assert plan.rows_per_task % plan.rows == 0
    assert 1 <= plan.rows_per_task // plan.rows <= 16
    assert 1 <= plan.tiles_per_call <= MAX_TILES_PER_CALL
    # one call covers all the sources, or is as large as allowed
    assert plan.cols * plan.tiles_per_call >= m or plan.tiles_per_call == MAX_TILES_PER_CALL
    assert plan.pairs == n * m
    assert plan.task_memory_bytes > 0 and plan.estimated_seconds > 0
    assert (plan.n_points, plan.n_sources, plan.dim, plan.dtype, plan.formulation) == (n, m, d, dtype, form)


@SETTINGS
@given(n=small_sizes, m=small_sizes, d=dims, form=formulations, rows=overrides, cols=overrides,
       per_task=overrides)
def test_overrides(n, m, d, form, rows, cols, per_task):
    plan = make_plan(n, m, d, formulation=form, rows=rows, cols=cols, rows_per_task=per_task)
    check_tasks(plan)
    if rows is not None:
        assert plan.rows == rows
    if cols is not None:
        assert plan.cols == cols
    assert plan.rows_per_task % plan.rows == 0
    if per_task is not None:  # rounded up to whole tiles, never down
        assert per_task <= plan.rows_per_task < per_task + plan.rows


@SETTINGS
@given(n=sizes, m=sizes, d=dims, form=formulations, dtype=dtypes, w1=workers, w2=workers)
def test_tasks_do_not_depend_on_workers(n, m, d, form, dtype, w1, w2):
    a = make_plan(n, m, d, dtype=dtype, formulation=form, workers=w1)
    b = make_plan(n, m, d, dtype=dtype, formulation=form, workers=w2)
    assert a.tasks == b.tasks
    assert (a.rows, a.cols, a.tiles_per_call, a.rows_per_task) == (b.rows, b.cols, b.tiles_per_call, b.rows_per_task)
    assert a.task_memory_bytes == b.task_memory_bytes


@SETTINGS
@given(n=sizes, m1=sizes, m2=sizes, d=dims, form=formulations, dtype=dtypes)
def test_memory_grows_with_sources(n, m1, m2, d, form, dtype):
    small, large = sorted((m1, m2))
    a = make_plan(n, small, d, dtype=dtype, formulation=form)
    b = make_plan(n, large, d, dtype=dtype, formulation=form)
    assert a.task_memory_bytes <= b.task_memory_bytes


@SETTINGS
@given(n=sizes, m=sizes, d=dims, form=formulations)
def test_float64_needs_more_memory(n, m, d, form):
    assert (make_plan(n, m, d, dtype="float32", formulation=form).task_memory_bytes
            < make_plan(n, m, d, dtype="float64", formulation=form).task_memory_bytes)


@SETTINGS
@given(n=sizes, m=sizes, d=dims, form=formulations, dtype=dtypes)
def test_memory_limit_is_checked(n, m, d, form, dtype):
    need = worker_memory_needed(make_plan(n, m, d, dtype=dtype, formulation=form).task_memory_bytes)
    fits = make_plan(n, m, d, dtype=dtype, formulation=form, worker_memory_bytes=need)
    assert fits.worker_memory_bytes == need
    with pytest.raises(InputError, match="MiB") as info:
        make_plan(n, m, d, dtype=dtype, formulation=form, worker_memory_bytes=need - 1)
    assert f"M={m}" in str(info.value)


def test_large_run_refused_with_a_useful_message():
    with pytest.raises(InputError) as info:
        make_plan(10**6, 10**9, 3, worker_memory_bytes=4 * 2**30)
    message = str(info.value)
    assert re.search(r"\d+ MiB", message) and "4096 MiB" in message and "M=1000000000" in message


@pytest.mark.parametrize("kwargs", [
    dict(n_points=0), dict(n_sources=0), dict(dim=0), dict(n_points=-5),
    dict(rows=0), dict(cols=0), dict(rows_per_task=0), dict(workers=0), dict(rows=-1),
    dict(dtype="float16"),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_invalid_sizes_raise(kwargs):
    args = dict(n_points=100, n_sources=100, dim=3)
    args.update(kwargs)
    n, m, d = args.pop("n_points"), args.pop("n_sources"), args.pop("dim")
    with pytest.raises(InputError):
        make_plan(n, m, d, **args)


@SETTINGS
@given(n=sizes, m=sizes, form=formulations)
def test_tile_shape_shrinks_for_small_inputs(n, m, form):
    rows, cols, tiles = tile_shape(n, m, form)
    default_rows, default_cols = DEFAULT_TILES[form]
    assert rows == default_rows or rows >= n  # a smaller tile is only chosen when all rows fit in it
    assert cols == default_cols or cols * tiles >= m
    assert rows < 2 * max(n, 8) and cols < 2 * max(m, 8)  # never more than twice the padding needed


def test_plan_is_frozen():
    plan = make_plan(100, 100, 3)
    with pytest.raises(Exception):
        plan.rows = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------------------- kgrad plan


def _parse_plan(stdout: str) -> dict:
    tile = re.search(r"tile\s+(\d+) rows x (\d+) cols, (\d+) tiles per compiled call", stdout)
    tasks = re.search(r"tasks\s+(\d+) of (\d+) rows", stdout)
    memory = re.search(r"memory\s+([\d.]+) (B|KiB|MiB|GiB) per task \(worker limit ([\d.]+) (\w+)\)", stdout)
    inputs = re.search(r"N=(\d+) points x M=(\d+) sources, D=(\d+), (float\d+)", stdout)
    assert tile and tasks and memory and inputs, stdout
    unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return {"rows": int(tile[1]), "cols": int(tile[2]), "tiles_per_call": int(tile[3]),
            "n_tasks": int(tasks[1]), "rows_per_task": int(tasks[2]),
            "memory": float(memory[1]) * unit[memory[2]], "memory_unit": unit[memory[2]],
            "n": int(inputs[1]), "m": int(inputs[2]), "d": int(inputs[3]), "dtype": inputs[4]}


@pytest.mark.parametrize("extra, n, m, d, dtype, form, overrides", [
    ([], 3000, 3000, 3, "float32", "radial", {}),
    (["--dtype", "float64", "--kernel", "polynomial", "--tile-rows", "64", "--rows-per-task", "100"],
     3000, 3000, 3, "float64", "dot", {"rows": 64, "rows_per_task": 100}),
    (["--mode", "jacrev", "--sources", "SOURCES"], 3000, 1500, 3, "float32", "generic", {}),
], ids=["default", "overrides", "generic-with-sources"])
def test_kgrad_plan_matches_make_plan(tmp_path, monkeypatch, capsys, extra, n, m, d, dtype, form, overrides):
    """`kgrad plan` in process (pipeline.cli.main, the console script's code; test_cli.py and
    test_workflow_paths.py run the command itself)."""
    from pipeline.cli import main

    rng = np.random.default_rng(3)
    np.save(tmp_path / "points.npy", rng.normal(size=(n, d)))
    np.save(tmp_path / "sources.npy", rng.normal(size=(m, d)))
    extra = [str(tmp_path / "sources.npy") if a == "SOURCES" else a for a in extra]
    monkeypatch.chdir(tmp_path)
    code = main(["plan", "--points", "points.npy", "--out", "out.zarr", "--workers", "2", "--memory-limit", "3GiB",
                 *extra])
    proc = capsys.readouterr()
    assert code == 0, proc.err
    assert not (tmp_path / "out.zarr").exists()
    printed = _parse_plan(proc.out)
    plan = make_plan(n, m, d, dtype=dtype, formulation=form, workers=2, worker_memory_bytes=3 * 2**30, **overrides)
    assert (printed["n"], printed["m"], printed["d"], printed["dtype"]) == (n, m, d, dtype)
    assert printed["rows"] == plan.rows and printed["cols"] == plan.cols
    assert printed["tiles_per_call"] == plan.tiles_per_call
    assert printed["n_tasks"] == plan.n_tasks and printed["rows_per_task"] == plan.rows_per_task
    # printed with one decimal in the largest unit that keeps it under 1024
    assert abs(printed["memory"] - plan.task_memory_bytes) <= 0.05 * printed["memory_unit"] + 1
    assert f"[{form}," in proc.out
    assert "workers       2" in proc.out


def test_memory_check_leaves_room_below_dasks_pause():
    """dask pauses a worker at 80% of its limit (and kills it at 95%): a plan that needs 90% of the limit
    is refused, and the fraction comes from dask's configuration."""
    from pipeline.plan import memory_fraction

    task = make_plan(10**5, 10**5, 3).task_memory_bytes
    at_limit = task + WORKER_BASELINE_BYTES
    with pytest.raises(InputError, match="80%"):
        make_plan(10**5, 10**5, 3, worker_memory_bytes=int(at_limit / 0.9))
    assert make_plan(10**5, 10**5, 3, worker_memory_bytes=int(at_limit / PAUSE_FRACTION) + 1)
    config = {"distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": 0.9}
    assert memory_fraction(lambda key, default=None: config.get(key, default)) == 0.9
    assert memory_fraction(lambda key, default=None: {"distributed.worker.memory.pause": 0.5}.get(key)) == 0.5
    assert memory_fraction(lambda key, default=None: False) == 1.0


def test_time_estimate_grows_with_dimension():
    """The projected time follows the measured cost per pair and D: at D = 200 a radial tile costs about
    9x and the generic path about 45x what they cost at D = 3 (benchmarked; see plan.COST_PER_EXTRA_DIM)."""
    for form, low, high in (("radial", 6, 15), ("dot", 3, 8), ("generic", 30, 70)):
        ratio = (make_plan(4096, 4096, 200, formulation=form).estimated_seconds
                 / make_plan(4096, 4096, 3, formulation=form).estimated_seconds)
        assert low < ratio < high, (form, ratio)


# ----------------------------------------------------------------------------------------- time projection


def test_one_projection_for_exact_and_pruned_plans():
    """Exact and pruned plans are projected by one function: the same start-up, plus the pairs computed at
    the measured per-pair cost, a pruned pair costing PRUNED_SLOWDOWN times a dense one, over the workers."""
    from pipeline.plan import PRUNED_SLOWDOWN, STARTUP_SECONDS, pair_seconds, project, with_pruning

    dense = with_pruning(make_plan(10**5, 10**5, 3, workers=2, cores=2), 0.0, None)
    pruned = with_pruning(make_plan(10**5, 10**5, 3, workers=2, cores=2, pruned=True), 1e-9, 10**8)
    per_pair = pair_seconds("radial", 3, "float32")
    assert project(dense).seconds == pytest.approx(STARTUP_SECONDS + 10**10 * per_pair / 2)
    assert project(pruned).seconds == pytest.approx(STARTUP_SECONDS + 10**8 * per_pair * PRUNED_SLOWDOWN / 2)
    assert project(pruned).compute_seconds == pytest.approx(pruned.estimated_seconds)
    for plan in (dense, pruned):
        basis = project(plan).basis
        assert "start-up" in basis and "ns/pair" in basis and "2 workers" in basis, basis
    assert f"pruned: {PRUNED_SLOWDOWN:g}x per pair" in project(pruned).basis


def _clustered(path, n=40_000, seed=0):
    """Tight clusters far apart (rbf lengthscale 0.2): a tolerance of 1e-9 leaves about 1% of the pairs."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, 100.0, (n // 50, 3))
    np.save(path, centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, 3)))


def _plan_lines(capsys, argv) -> dict:
    from pipeline.cli import main

    assert main(["plan", *argv]) == 0
    return {line[:14].strip(): line[14:] for line in capsys.readouterr().out.splitlines()}


def test_exact_plans_hint_projects_what_the_tolerance_plan_projects(tmp_path, capsys):
    """The exact plan's hint (what --tolerance 1e-9 would do) and the plan with that tolerance give one
    projected time, from the same options (2 workers); it used to be 1.1 s beside 0.5 s."""
    _clustered(tmp_path / "p.npy")
    common = ["--points", str(tmp_path / "p.npy"), "--lengthscale", "0.2", "--workers", "2", "--memory-limit", "2GiB"]
    exact = _plan_lines(capsys, common)
    tolerant = _plan_lines(capsys, [*common, "--tolerance", "1e-9"])
    hint = re.search(r"--tolerance 1e-09 would leave about ([\d.]+)% of the pairs \(rough time ([\d.]+) s",
                     exact["pruning"])
    assert hint, exact["pruning"]
    projected = re.match(r"([\d.]+) s \((.*)\)$", tolerant["rough time"])
    assert projected and hint[2] == projected[1], (exact["pruning"], tolerant["rough time"])
    assert "start-up" in projected[2] and "pruned" in projected[2], projected[2]
    assert f"({hint[1]}%)" in tolerant["pruning"], (exact["pruning"], tolerant["pruning"])


@pytest.mark.parametrize("case, argv, why", [
    ("kernel that does not decay", ["--kernel", "periodic"], "kernel periodic does not decay to 0 with distance"),
    ("mode", ["--mode", "jacfwd"], "mode=jacfwd computes every pair"),
    ("little to prune", ["--lengthscale", "5"], "pruning would skip only"),
])
def test_exact_plan_says_why_a_tolerance_would_not_help(tmp_path, capsys, case, argv, why):
    """An exact plan always says what a tolerance would do: here, that it would not help, and why."""
    np.save(tmp_path / "p.npy", np.random.default_rng(1).normal(size=(3000, 3)))
    pruning = _plan_lines(capsys, ["--points", str(tmp_path / "p.npy"), "--workers", "2", *argv])["pruning"]
    assert pruning.startswith("none (exact: every pair); --tolerance 1e-09 would not help here: "), pruning
    assert why in pruning, pruning


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 300), st.integers(1, 5), st.sampled_from(["float32", "float64"]), st.integers(0, 2**32 - 1))
def test_column_bounds_are_numpys_axis_reductions(n, d, dtype, seed):
    """spatial.column_bounds (one strided column at a time) gives numpy's min and max along axis 0, as
    float64, with ties, -0.0 and huge magnitudes."""
    from pipeline.spatial import column_bounds

    rng = np.random.default_rng(seed)
    x = (rng.integers(-3, 4, size=(n, d)) * 10.0 ** rng.integers(-30, 30, size=(1, d))).astype(dtype)
    x[rng.random(n) < 0.3] = -0.0
    lower, upper = column_bounds(x)
    assert lower.dtype == upper.dtype == np.float64
    assert np.array_equal(lower, x.min(axis=0).astype(np.float64))
    assert np.array_equal(upper, x.max(axis=0).astype(np.float64))


@pytest.mark.parametrize("layout, weighted, chosen, orders", [
    ("wide", False, "far_field", 1),  # pruning declines (a far field pays): its order is the far field's
    ("narrow-4d", False, "dense", 1),  # pruning declines, no far field in 4-D: dense takes pruning's order
    ("narrow-4d", True, "dense", 2),  # ... unless weights break pruning's ties: dense sorts again, unweighted
])
def test_the_points_are_put_in_spatial_order_once(monkeypatch, layout, weighted, chosen, orders):
    """Where the pruned method plans first and declines, the method chosen takes the spatial order pruning
    computed (the same call), not a second sort of all points; the order is the one it would compute."""
    import pipeline.kept_tiles as kept_tiles
    import pipeline.methods.dense as dense
    import pipeline.methods.far_field as far_field
    from pipeline.problem import make_problem
    from pipeline.spatial import spatial_order

    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 2)) if layout == "wide" else rng.normal(size=(4000, 4))
    w = rng.normal(size=len(x)) if weighted else None
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return spatial_order(*args, **kwargs)

    for module in (kept_tiles, dense, far_field):
        monkeypatch.setattr(module, "spatial_order", counted)
    problem = make_problem(x, x, lengthscale=2.0 if layout == "wide" else 3.0, tolerance=1e-6, weights=w,
                           sources_are_points=True)
    assert problem.method.name == chosen, problem.plan.exact_reason
    assert len(calls) == orders
    expected = spatial_order(x, problem.spec.lengthscale, w if chosen != "dense" else None)
    assert np.array_equal(problem.layout.point_order, expected)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**9), st.floats(1e-12, 10.0), st.floats(0.01, 1.0), st.sampled_from([1, 64, 512]),
       st.integers(1, 10**6))
def test_task_rows_bounds(n, per_row, seconds, multiple, default):
    """plan.task_rows: a multiple of the block, never below the default, at most N / MIN_TASKS (rounded up to
    a block) unless the default is larger, and at least the rows for ``seconds`` of work below that cap."""
    from pipeline.plan import MIN_TASKS, task_rows

    default = -(-default // multiple) * multiple
    rows = task_rows(n, per_row, seconds, multiple, default)
    cap = -(-math.ceil(n / MIN_TASKS) // multiple) * multiple
    assert rows % multiple == 0 and rows >= default
    assert rows <= max(default, cap)
    assert rows >= min(math.ceil(seconds / per_row), math.ceil(n / MIN_TASKS))


def test_pruned_tasks_are_sized_by_their_work():
    """A pruned plan on clustered data gets tasks of several default tasks' rows (their own cost is ~20-30 ms),
    whole blocks, at most MAX_TASK_BLOCKS of them, the same for any number of workers; rows_per_task given
    is kept."""
    from pipeline.methods.pruned import MAX_TASK_BLOCKS
    from pipeline.plan import make_plan
    from pipeline.problem import make_problem

    rng = np.random.default_rng(7)
    centres = rng.uniform(0, 100, size=(200, 3))
    x = centres[rng.integers(0, 200, size=300_000)] + rng.normal(size=(300_000, 3))
    plans = [make_problem(x, x, lengthscale=0.2, tolerance=1e-9, sources_are_points=True, workers=w).plan
             for w in (1, 3)]
    default = make_plan(len(x), len(x), 3, pruned=True).rows_per_task
    plan = plans[0]
    assert plan.pruned and plan.rows_per_task == plans[1].rows_per_task
    assert plan.rows_per_task % plan.rows == 0
    assert default < plan.rows_per_task <= MAX_TASK_BLOCKS * plan.rows
    given_rows = make_problem(x, x, lengthscale=0.2, tolerance=1e-9, sources_are_points=True,
                              rows_per_task=4096).plan
    assert given_rows.rows_per_task == 4096
