"""The interface every computation method implements, and the values that cross it.

A method is one way of computing ``g_j = sum_i w_i grad_q k(q_j, x_i)`` and ``v_j = sum_i w_i k(q_j, x_i)``
for every query row, exactly (``dense``) or within the run's per-query bound (``pruned``).  It answers
four questions, each asked in one place:

* **plan** (:meth:`Method.plan`, asked by :func:`pipeline.problem.make_problem`): can it run this problem,
  and if so with which plan (tiles, tasks, memory, the pairs it computes and the time they take) and which
  fixed data (its ``layout``: e.g. the spatial order and tile index); or, if not, why (one sentence);
* **in process** (:meth:`Method.compute`): g, v and the pairs computed, in this process (the Python API);
* **on a cluster**: the client's steps around the tasks (:meth:`Method.run_tasks`, :meth:`Method.finish`)
  and the task itself (:meth:`Method.run_task`, run by :func:`pipeline.worker.run_task_reporting`);
* **progress**: which tasks an existing output of the run has done (:meth:`Method.done_tasks`).

The same bits come out in process and on a cluster, for any number of workers: a method's blocks do not
depend on how they are grouped into tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Generic, Protocol, TypeVar

import numpy as np

from ..kernels import KernelSpec
from ..output import OutputGroup
from ..plan import Plan, Task
from ..task import Job, MethodData

if TYPE_CHECKING:
    from ..problem import Problem


@dataclass(frozen=True)
class PlanRequest:
    """A problem as the methods see it when they plan: data, kernel and what the run asked for."""

    points: np.ndarray = field(repr=False)  # (N, D) as given
    sources: np.ndarray = field(repr=False)  # (M, D); the points themselves when sources_are_points
    weights: np.ndarray | None = field(repr=False)  # (M,) or None: unit weights
    sources_are_points: bool
    spec: KernelSpec
    mode: str
    dtype: str
    tolerance: float
    plan_options: dict  # for pipeline.plan.make_plan: formulation, workers, memory, tile overrides ...
    method: str = "auto"  # the method asked for: "auto", or a name (that method then runs wherever it can,
    # even where it expects to be slower than the next)

    def forced(self, name: str) -> bool:
        """The run asked for the method ``name`` itself: its "not faster here" declines do not apply."""
        return self.method == name


Layout = TypeVar("Layout")  # a method's fixed data: its own type (pipeline.kept_tiles.Layout, DenseLayout ...)


@dataclass(frozen=True)
class Planned(Generic[Layout]):
    """A method's answer to a problem it can run: the plan, the method's fixed data (None if it needs none)
    and the per-query error bounds it guarantees on top of the dtype's rounding (zeros: exact)."""

    plan: Plan
    layout: Layout | None = None  # the method's fixed data (its own type)
    error_bounds: dict = field(default_factory=lambda: {"gradient": 0.0, "value": 0.0})


@dataclass(frozen=True)
class ClientRun(Generic[Layout]):
    """What a method's client steps see of a run that holds its output's lease."""

    job: Job
    plan: Plan
    layout: Layout  # Planned.layout
    output: OutputGroup
    points: np.ndarray = field(repr=False)  # the points as read and checked by the client
    sources: np.ndarray | None = field(repr=False)  # None: the points are the sources
    weights: np.ndarray | None = field(repr=False)  # None: unit weights
    # map_on_workers(function, items): [function(*item) for item in items] on the run's workers, in order
    # (pipeline.execute.map_on_workers); None: in this process
    map_on_workers: Callable[[Callable, list], list] | None = field(default=None, repr=False)


RunTasks = Callable[..., dict]  # execute(job, done=...) -> timings (pipeline.execute.execute, bound to the run)


class Method(Protocol):
    name: str
    workers_use_jax: bool  # its tasks compute with JAX (the run has the workers import it before the first task)

    def plan(self, request: PlanRequest) -> Planned | str:
        """The plan, or one sentence saying why this method does not run this problem."""

    def describe(self, planned: Planned) -> str:
        """One line on how the method computes this run, for ``kgrad plan`` ("" if its name says it all)."""

    def compute(self, problem: "Problem", request: PlanRequest, threads: int) -> tuple[np.ndarray, np.ndarray, int]:
        """g (N, D), v (N,) in the dtype and in input order, and the pairs computed, in this process
        (``problem``: what :func:`pipeline.problem.make_problem` made of ``request`` with this method)."""

    def job_data(self, request: PlanRequest, planned: Planned) -> MethodData:
        """The method's part of the :class:`Job` (small: it is pickled with every task)."""

    def run_tasks(self, run: ClientRun, execute: RunTasks) -> tuple[dict, int]:
        """The client's steps before the tasks, then the tasks not yet done (``execute``); returns the
        timings and the pairs computed."""

    def finish(self, run: ClientRun, timings: dict) -> None:
        """The client's steps after every task is done and the inputs were checked once more (before the
        output is marked complete)."""

    def done_tasks(self, output: OutputGroup, fingerprint: str, n_tasks: int) -> np.ndarray:
        """Which of the ``n_tasks`` tasks of an existing output of the run ``fingerprint`` are done."""

    def run_task(self, job: Job, task: Task) -> dict:
        """On a worker: compute and store one task; return a small dict (index, rows, seconds,
        compute_seconds, pid and what the method adds)."""
