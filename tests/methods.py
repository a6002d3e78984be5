"""The computation methods of kgrad as the guarantee tests select them: one :class:`MethodCase` per method
registered in ``pipeline.methods.METHODS``.

A case says which data and which options make a run use that method (the CLI's flags and the in-process API's
keyword arguments), how to read how far a run of it has got (its tasks' done flags), and which client steps it
has around its tasks (where a kill -9 is worth trying).  test_guarantees.py runs every guarantee on every case;
a new method gets them by adding its case to :data:`CASES` (test_guarantees checks that the cases' names are
the registry's).

Sizes are small (a run of a case takes a few seconds, its 16 to 21 tasks about a second on 2 busy cores) but
big enough to be killed after some of its tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

DIM = 3


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


def output_task_done(out) -> np.ndarray | None:
    """The output's own ``task_done`` flags (None while not readable)."""
    from cluster_fixtures import read_task_done

    return read_task_done(out)


def sorted_copy_task_done(out) -> np.ndarray | None:
    """A pruned run's progress: the ``task_done`` flags of its sorted copy OUT/order (the output's own are
    marked only once the results are back in input order); None while absent, half written or deleted."""
    import zarr

    try:
        return np.asarray(zarr.open_group(str(Path(out) / "order"), mode="r")["task_done"][:]).astype(bool)
    except Exception:  # noqa: BLE001 - absent, being created, or already deleted
        return None


def output_created(out) -> bool:
    from cluster_fixtures import output_created as created

    return created(out)


def sorted_copy_exists(out) -> bool:
    return (Path(out) / "order").exists()


@dataclass(frozen=True)
class MethodCase:
    name: str  # its key in pipeline.methods.METHODS, and the output's attribute "method"
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


_DENSE_POINTS = gaussian(16_000, 20240611)
_PRUNED_POINTS = clustered(16_000, 2)

DENSE = MethodCase(
    name="dense", points=lambda: _DENSE_POINTS, lengthscale=1.0, tolerance=None,
    other_tolerances=("1e-3",), progress=output_task_done, before_tasks=output_created, after_tasks=True,
    expect={"pruned": False})

PRUNED = MethodCase(
    name="pruned", points=lambda: _PRUNED_POINTS, lengthscale=0.5, tolerance=1e-6,
    other_tolerances=("1e-3", None), progress=sorted_copy_task_done, before_tasks=sorted_copy_exists,
    after_tasks=True, expect={"pruned": True})

CASES: dict[str, MethodCase] = {case.name: case for case in (DENSE, PRUNED)}
