"""The client's steps for methods whose tasks compute ranges of the run's spatial order (dense and pruned).

Query rows are taken in the run's spatial order (:func:`pipeline.spatial.spatial_order`: Morton order in
lengthscales; the pruned method refines it into k-d leaves, :func:`pipeline.spatial.compact_order`), so that every block of consecutive rows is compact whatever the input's row order, and task
``t`` computes rows ``[t.start, t.stop)`` of that order.  The output keeps input order, so such a run works
in a scratch group ``OUT/order/`` (:class:`pipeline.output.SpatialCopy`):

1. before the tasks, the client writes the sorted copy there (the points in spatial order, the permutation,
   and what the method's tasks read besides: sorted sources, weights, a tile index), unless a resumed run's
   copy is whole;
2. each task reads its rows from the copy, and writes its sorted results, its pair count and its done mark
   there;
3. after the tasks, the client puts the results back in input order into the output, records the pairs
   computed and :data:`IN_INPUT_ORDER`, marks every output task done and deletes ``order/``.

Each of the client's writes is made only while the run still owns the output (:func:`pipeline.task.
still_owned`), and each task's only while its run holds the lease and the copy is the one it was given.  A
run killed at any step resumes: from the copy's done marks, or, once the results are back in input order,
by marking the output done and removing the copy.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass

import numpy as np

from ..errors import RunEnded, RunFailed
from ..output import OutputGroup, SpatialCopy
from ..task import Job, MethodData, still_owned
from .base import ClientRun, RunTasks

IN_INPUT_ORDER = "results_in_input_order"  # set (to the run's fingerprint) once the results are unsorted
COPY_CHUNK = 8192  # rows per chunk of the sorted copy's inputs (the pruned method's: whole super-tiles)


@dataclass(frozen=True)
class InOrderData(MethodData):
    """What the tasks of a run in spatial order need beyond the :class:`Job`: which sorted copy to read."""

    copy_chunk: int = COPY_CHUNK  # rows per chunk of the sorted copy's inputs
    copy_id: str = ""  # the sorted copy the tasks read (set when the copy is written or found whole)


class InSpatialOrder(abc.ABC):
    """The client's steps shared by the methods whose tasks are ranges of the run's spatial order.  A method
    built on it says what its copy holds (:meth:`copy_contents`) and computes its tasks."""

    workers_use_jax = True

    @abc.abstractmethod
    def copy_contents(self, run: ClientRun) -> dict:
        """The sorted copy's inputs: ``point_index`` and ``points`` at least (:meth:`SpatialCopy.create`)."""

    def describe(self, planned) -> str:
        return ""

    def run_tasks(self, run: ClientRun, execute: RunTasks) -> tuple[dict, int]:
        """The sorted copy (unless a resumed run's is whole), then the tasks not yet done.  Returns the
        timings and the pairs computed (from the copy)."""
        job, plan, output = run.job, run.plan, run.output
        if output.attributes().get(IN_INPUT_ORDER) == job.fingerprint:  # resumed after the results went back
            return ({"tasks_run": 0, "tasks_skipped": plan.n_tasks, "execute_seconds": 0.0, "task_seconds_total": 0.0,
                     "compute_seconds_total": 0.0, "worker_pids": []}, int(output.attributes().get("pairs_computed", 0)))
        copy = SpatialCopy(output)
        started = time.perf_counter()
        if not copy.ready(job.fingerprint):
            still_owned(job, output.attributes())
            copy_id = copy.create(run_id=job.output_id, run_fingerprint=job.fingerprint, dtype=plan.dtype,
                                  rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks,
                                  source_chunk=job.data.copy_chunk, **self.copy_contents(run))
        else:
            copy_id = copy.attributes()["copy_id"]
        order_seconds = time.perf_counter() - started
        # Tasks read only the copy they were given: a copy rewritten meanwhile (another run) is never mixed in.
        timings = execute(job.replace_data(copy_id=copy_id), done=copy.done_tasks())
        timings["order_seconds"] = round(order_seconds, 4)
        return timings, int(np.sum(copy.read("pairs")))

    def finish(self, run: ClientRun, timings: dict) -> None:
        """The sorted results into the output in input order, the pairs computed and :data:`IN_INPUT_ORDER`
        recorded, every output task marked done, and the sorted copy deleted.  Each write is made only while
        the run still owns the output, and only from a whole copy of this run whose tasks are all done."""
        job, output = run.job, run.output
        copy = SpatialCopy(output)
        if output.attributes().get(IN_INPUT_ORDER) == job.fingerprint:  # killed after the results went back
            still_owned(job, output.attributes())
            output.mark_all_done(job.output_id)  # the results in input order are whole: every task's rows
            copy.remove(job.output_id)
            return
        if not copy.ready(job.fingerprint):
            raise RunFailed("the run's sorted copy (order/) is missing or was replaced")
        missing = int((~copy.done_tasks()).sum())
        if missing:
            raise RunFailed(f"{missing} of {run.plan.n_tasks} tasks are not marked done in the sorted copy")
        started = time.perf_counter()
        still_owned(job, output.attributes())
        pairs = copy.unsort_into_output(job.output_id)
        still_owned(job, output.attributes())
        output.update({"pairs_computed": pairs, IN_INPUT_ORDER: job.fingerprint}, job.output_id)
        output.mark_all_done(job.output_id)
        copy.remove(job.output_id)
        timings["unsort_seconds"] = round(time.perf_counter() - started, 4)

    def done_tasks(self, output: OutputGroup, fingerprint: str, n_tasks: int) -> np.ndarray:
        """Progress is in the sorted copy until the results go back in input order (then every task is)."""
        if output.attributes().get(IN_INPUT_ORDER) == fingerprint or output.done_tasks().all():
            return np.ones(n_tasks, bool)
        copy = SpatialCopy(output)
        return copy.done_tasks() if copy.ready(fingerprint) else np.zeros(n_tasks, bool)


def task_copy(job: Job) -> SpatialCopy:
    """The run's sorted copy for a task, checked whole and the one the task was given (else the run has
    ended: its copy was replaced or removed)."""
    copy = SpatialCopy(OutputGroup(job.out, job.out_options))
    check_copy(job, copy)
    return copy


def check_copy(job: Job, copy: SpatialCopy) -> None:
    state = copy.attributes()
    if not (state.get("ready") is True and state.get("run_fingerprint") == job.fingerprint
            and state.get("copy_id") == job.data.copy_id):
        raise RunEnded(f"the sorted copy in {copy.location!r} was replaced or removed; this task's results "
                       f"are dropped")
