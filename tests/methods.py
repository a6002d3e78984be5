"""The computation methods of kgrad as the guarantee tests select them: one :class:`MethodCase` per method
registered in ``pipeline.methods.METHODS``, and variants where a method takes a path of its own (the far
field on a Matern kernel).

A case says which data and which options make a run use that method (the CLI's flags and the in-process API's
keyword arguments), how to read how far a run of it has got (its tasks' done flags), and which client steps it
has around its tasks (where a kill -9 is worth trying).  test_guarantees.py runs every guarantee on every case;
a new method gets them by adding its case to :data:`CASES` (test_guarantees checks that the cases' names are
the registry's).

Sizes are small (a run of a case takes a few seconds, its 16 to 21 tasks about a second on 2 busy cores) but
big enough to be killed after some of its tasks.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

pytest.register_assert_rewrite("cluster_fixtures", "faults")
from cluster_fixtures import Killed as KilledRun  # noqa: E402
from cluster_fixtures import assert_complete, kgrad, read_attrs, read_task_done, rng_for, run_and_kill  # noqa: E402
from faults import busy_cluster_worker, poll  # noqa: E402

DIM = 3
CLI_EXECUTORS = ("local", "dask-cli")  # `kgrad run` on its own local cluster, or on a dask CLI cluster
REFERENCE_WORKERS = 1  # the reference run: the cheapest; 2 and 4 workers are compared with it


def gaussian(n: int, seed: int) -> np.ndarray:
    """float32 (n, 3) standard normal: at lengthscale 1 every source is near every query (no pruning)."""
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def clustered(n: int, seed: int, per: int = 500) -> np.ndarray:
    """float32 (n, 3): clusters of ``per`` points of width 1 in a box 200 wide: at lengthscale 0.5 a query's
    far clusters can be skipped (about 3% of the pairs are computed)."""
    rng = np.random.default_rng(seed)
    k = n // per
    centres = rng.uniform(0.0, 200.0, (k, DIM))
    return (centres[:, None, :] + rng.normal(size=(k, per, DIM))).reshape(-1, DIM).astype(np.float32)


def sorted_copy_task_done(out) -> np.ndarray | None:
    """The progress of a run in spatial order (dense and pruned): the ``task_done`` flags of its sorted copy
    OUT/order (the output's own are marked only once the results are back in input order); None while
    absent, half written or deleted."""
    import zarr

    try:  # one open per read: the kill tests poll this every few milliseconds while the run races on
        return np.asarray(zarr.open_array(str(Path(out) / "order" / "task_done"), mode="r")[:]).astype(bool)
    except Exception:  # noqa: BLE001 - absent, being created, or already deleted
        return None


def sorted_copy_exists(out) -> bool:
    return (Path(out) / "order").exists()


@dataclass(frozen=True)
class MethodCase:
    name: str  # the case's key in CASES: a method's key in pipeline.methods.METHODS, or a variant of one
    points: Callable[[], np.ndarray]  # the data that makes the method pay (float32, same every call)
    lengthscale: float
    tolerance: float | None  # --tolerance (None: not given)
    other_tolerances: tuple  # a resume with one of these instead (None: without --tolerance) is refused
    # How far a run has got: its tasks' done flags, read from OUT (None while there are none to read).
    progress: Callable[[object], "np.ndarray | None"]
    # Whether a client step before the tasks is under way (the output exists, a sorted copy is written ...);
    # None: the method has none worth a kill of its own.
    before_tasks: Callable[[object], bool] | None
    # Whether the client has steps after the last task (putting results back, marking complete): kill once
    # every task is done.
    after_tasks: bool
    expect: dict = field(default_factory=dict)  # other attributes a run of this case writes
    cli_extra: tuple = ()  # further `kgrad run` flags this method needs
    api_extra: dict = field(default_factory=dict)  # further kernel_gradients keyword arguments
    method: str = ""  # the method it runs (its key in METHODS, the output's attribute "method"); "": name

    @property
    def method_name(self) -> str:
        return self.method or self.name

    def cli_args(self, tolerance="same") -> list[str]:
        """The `kgrad run` flags that select this method (``tolerance``: another value, or None for none)."""
        tolerance = self.tolerance if tolerance == "same" else tolerance
        # Rows per task: the plan's choice, which the in-process API's row blocks follow (the same bits).
        args = ["--lengthscale", repr(self.lengthscale)]
        if tolerance is not None:
            args += ["--tolerance", str(tolerance)]
        return args + list(self.cli_extra)

    def api_kwargs(self) -> dict:
        """kernel_gradients keyword arguments giving the same computation as :meth:`cli_args`."""
        return {"lengthscale": self.lengthscale, "tolerance": self.tolerance or 0.0, **self.api_extra}


def plane(n: int, seed: int) -> np.ndarray:
    """float32 (n, 2) standard normal in 2-D: at lengthscale 0.5 and tolerance 1e-6 the far field's grid
    (about 2000 proxies) replaces the 16000 sources, and pruning alone would keep most pairs."""
    return np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)


_DENSE_POINTS = gaussian(16_000, 20240611)
_FAR_POINTS = plane(16_000, 7)
_PRUNED_POINTS = clustered(16_000, 2)

DENSE = MethodCase(
    name="dense", points=lambda: _DENSE_POINTS, lengthscale=1.0, tolerance=None,
    other_tolerances=("1e-3",), progress=sorted_copy_task_done, before_tasks=sorted_copy_exists, after_tasks=True,
    expect={"pruned": False})

PRUNED = MethodCase(
    name="pruned", points=lambda: _PRUNED_POINTS, lengthscale=0.5, tolerance=1e-6,
    other_tolerances=("1e-3", None), progress=sorted_copy_task_done, before_tasks=sorted_copy_exists,
    after_tasks=True, expect={"pruned": True})

FAR_FIELD = MethodCase(
    name="far_field", points=lambda: _FAR_POINTS, lengthscale=0.5, tolerance=1e-6,
    other_tolerances=("1e-3", None), progress=sorted_copy_task_done, before_tasks=sorted_copy_exists,
    after_tasks=True, expect={"method": "far_field"})

# The far field on a Matern kernel: the grid takes the kernel's smooth part, and each task also sums its rows'
# close pairs from the sorted sources near them (pipeline/matern_split.py): a path of its own through the tasks.
FAR_FIELD_MATERN = MethodCase(
    name="far_field_matern", method="far_field", points=lambda: _FAR_POINTS, lengthscale=0.5, tolerance=1e-6,
    other_tolerances=("1e-3",), progress=sorted_copy_task_done, before_tasks=sorted_copy_exists,
    after_tasks=True, expect={"method": "far_field"}, cli_extra=("--kernel", "matern32", "--method", "far_field"),
    api_extra={"kernel": "matern32", "method": "far_field"})

CASES: dict[str, MethodCase] = {case.name: case for case in (DENSE, PRUNED, FAR_FIELD, FAR_FIELD_MATERN)}


# ------------------------------------------------------------------------------------------ kill moments


KILL_ATTEMPTS = 3  # runs made for one kill at a moment, should a run finish before the moment is seen


def moments(case: MethodCase) -> list[str]:
    """The kill moments that apply to a method: after some tasks always; during its client steps before or
    after the tasks where it has such steps."""
    return ((["before-tasks"] if case.before_tasks is not None else []) + ["some-tasks"]
            + (["after-tasks"] if case.after_tasks else []))


def moment_reached(case: MethodCase, moment: str, out, flags: "np.ndarray | None") -> bool:
    """Whether a run of ``case`` writing ``out``, with its task flags ``flags`` (``case.progress(out)``), is at
    ``moment`` (one of :func:`moments`)."""
    done = 0 if flags is None else int(flags.sum())
    if moment == "before-tasks":
        return done == 0 and bool(case.before_tasks(out))
    if moment == "some-tasks":
        return done >= 2
    if moment == "after-tasks":
        return flags is not None and bool(flags.all())
    raise ValueError(moment)


# ------------------------------------------------------------------------------------------ shared runs


class Runs:
    """Inputs, reference runs and interrupted outputs of the session, each made on first use."""

    def __init__(self, root: Path, request):
        self.root, self.request = root, request
        self._cache: dict = {}

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def points(self, case: MethodCase) -> Path:
        def make():
            path = self.root / f"{case.name}-points.npy"
            np.save(path, case.points())
            return path
        return self._once(("points", case.name), make)

    def other_points(self, case: MethodCase) -> Path:
        """Same shape and dtype as the case's points; one value changed."""
        def make():
            points = case.points().copy()
            points[len(points) // 2, 0] += np.float32(0.25)
            path = self.root / f"{case.name}-other-points.npy"
            np.save(path, points)
            return path
        return self._once(("other_points", case.name), make)

    def cluster(self, executor: str):
        return self.request.getfixturevalue("dask_cli_cluster") if executor == "dask-cli" else None

    def args(self, case: MethodCase, executor: str, points, out, *extra, workers: int = 2,
             tolerance="same") -> list[str]:
        """`kgrad run` arguments: the case's flags on ``executor`` (``workers``: of a local cluster)."""
        assert executor in CLI_EXECUTORS, executor
        where = (["--scheduler", str(self.cluster(executor).scheduler_file)] if executor == "dask-cli"
                 else ["--workers", str(workers)])
        return ["run", "--points", str(points), "--out", str(out), "--no-progress", *case.cli_args(tolerance),
                *where, *map(str, extra)]

    def reference(self, case: MethodCase) -> Path:
        """An undisturbed run of the case on REFERENCE_WORKERS local workers."""
        def make():
            out = self.root / f"{case.name}-reference.zarr"
            started = time.monotonic()
            result = kgrad(self.args(case, "local", self.points(case), out, workers=REFERENCE_WORKERS))
            self._cache[("reference_seconds", case.name)] = time.monotonic() - started
            assert result.returncode == 0, result.stderr[-3000:]
            assert_complete(out, tasks_skipped=0)
            attrs = read_attrs(out)
            assert {k: attrs.get(k) for k in case.expect} == case.expect, "the case does not select its method"
            return out
        return self._once(("reference", case.name), make)

    def n_tasks(self, case: MethodCase) -> int:
        return len(read_task_done(self.reference(case)))

    def reference_seconds(self, case: MethodCase) -> float:
        """The reference run's wall time (process start to exit)."""
        self.reference(case)
        return self._cache[("reference_seconds", case.name)]

    def killed(self, case: MethodCase, executor: str, moment: str) -> Killed:
        """:meth:`kill`, once per session (for kgrad's local cluster, whose processes all die with the run: the
        output stays as the kill left it, and a copy of it can be resumed)."""
        def make():
            return self.kill(case, executor, moment, self.root / f"{case.name}-{executor}-{moment}-killed")
        return self._once(("killed", case.name, executor, moment), make)

    def kill(self, case: MethodCase, executor: str, moment: str, root: Path) -> Killed:
        """A run of the case (2 local workers, or the dask CLI cluster) killed at ``moment`` (one of
        :func:`moments`, or "random": a moment drawn over 80% of the reference's wall time) with SIGKILL to its
        process group, on a copy of the points of its own under ``root`` (the refusal tests change it in place)."""
        if moment == "random":
            at = rng_for(f"{case.name}-{executor}-{root.name}").uniform(0.0, 0.8 * self.reference_seconds(case))
            print(f"[reliability] kill at {at:.2f} s")
            should_kill = lambda t, _: t >= at  # noqa: E731
        else:
            should_kill = lambda t, flags: moment_reached(case, moment, out, flags)  # noqa: E731
        for attempt in range(KILL_ATTEMPTS):
            # A warm run on the dask CLI cluster may finish all its tasks between two polls (21 far-field tasks in
            # 0.8 s once): then the run is made again, in a directory of its own, rather than the moment missed.
            where = root if attempt == 0 else root.with_name(f"{root.name}-again{attempt}")
            where.mkdir()
            points = where / "points.npy"
            shutil.copyfile(self.points(case), points)
            out = where / "out.zarr"
            run = run_and_kill(self.args(case, executor, points, out), out, should_kill, interval=0.005,
                               progress=case.progress)
            if not run.finished_first or moment in ("random", "after-tasks"):
                break
            print(f"[reliability] {case.name} on {executor} finished before the kill at {moment}; again")
        return Killed(points, out, run, case.progress(out))

    def interrupted(self, case: MethodCase, executor: str) -> Killed:
        """A run killed after some tasks, for the refusals: on the dask CLI cluster, returned once no task of it
        is left running (nothing writes into it any more)."""
        def make():
            killed = self.killed(case, executor, "some-tasks")
            assert not killed.run.finished_first and killed.run.output_existed, killed.run.stderr[-3000:]
            if executor == "dask-cli":
                with self.cluster(executor).client() as client:
                    poll(lambda: busy_cluster_worker(client) is None, timeout=60, what="the killed run's tasks to end")
            assert read_attrs(killed.out)["complete"] is False
            return killed
        return self._once(("interrupted", case.name, executor), make)


@dataclass(frozen=True)
class Killed:
    points: Path  # the run's own copy of the case's points
    out: Path
    run: KilledRun  # what run_and_kill saw
    flags: np.ndarray | None  # the method's task flags once the run's processes were gone


@pytest.fixture(scope="session")
def method_runs(tmp_path_factory, request) -> Runs:
    """The session's :class:`Runs` (load this module as a plugin: ``pytest_plugins = ["methods"]``)."""
    return Runs(tmp_path_factory.mktemp("method_runs"), request)
