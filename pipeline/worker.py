"""What dask runs on the workers: :func:`run_task_reporting`, one task of a run, by the run's method.

It is a top-level function of this module so that dask pickles it by reference.  A task's work is its
method's (:meth:`pipeline.methods.base.Method.run_task`, chosen by name from the :class:`~pipeline.task.Job`);
what every task shares (the job, core pinning, the lease check) is in :mod:`pipeline.task`.  Workers build
their jitted functions lazily (one compile per process and tile shape, kept in the persistent compilation
cache), read what they need from the stores themselves, write whole output chunks, and return only small
dicts: no JAX arrays or jitted functions cross the wire.
"""

from __future__ import annotations

from .errors import InputError, InputsChanged, NonFiniteResultError, RunEnded, task_failure
from .methods import get
from .plan import Task
from .task import Job


def run_task_reporting(job: Job, task: Task) -> dict:
    """One task of the run, by its method, with the failures that a retry cannot mend returned as
    ``{"failed": kind, "message": line}`` instead of raised: dask must not retry them (same inputs, same
    failure) and the worker must not log them (the client ends the run with the one line).  Anything else (a
    lost file system, a full disk) is raised, and dask retries it."""
    try:
        return get(job.method).run_task(job, task)
    except NonFiniteResultError as exc:
        return {"index": task.index, "failed": "nonfinite", "message": f"{exc}; the task's rows were not written",
                "step": "start it again with --dtype float64 and --overwrite"}
    except (InputsChanged, InputError, RunEnded) as exc:
        failure = task_failure(exc)
        return {"index": task.index, "failed": type(exc).__name__, "message": str(failure), "step": failure.step}
