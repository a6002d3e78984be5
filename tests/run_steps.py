"""A run's client steps without a cluster, for tests that call a method's task directly (as a dask worker
would): :func:`start` creates the output and makes the method's steps before the tasks (the sorted copy),
:func:`finish` its steps after them (the results back in input order), exactly as ``kgrad run`` does."""

from __future__ import annotations

import dataclasses

from pipeline.output import OutputGroup
from pipeline.task import Job
from pipeline.workflow import Prepared, _client_run


def start(prepared: Prepared) -> Job:
    """Create the output of ``prepared`` and make its method's steps before the tasks; return the job the
    tasks get (the output's id, the sorted copy's id)."""
    plan = prepared.plan
    output = OutputGroup(prepared.config.out)
    output_id = output.create(n_points=plan.n_points, dim=plan.dim, dtype=plan.dtype,
                              rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks, attributes=prepared.attributes)
    given = {}

    def execute(job, done):
        given["job"] = job
        return {}

    job = dataclasses.replace(prepared.job, output_id=output_id)
    prepared.problem.method.run_tasks(_client_run(dataclasses.replace(prepared, job=job), output), execute)
    return given["job"]


def method(prepared: Prepared):
    return prepared.problem.method


def finish(prepared: Prepared, job: Job) -> None:
    """The method's steps after the tasks (every task done), then the output marked complete."""
    output = OutputGroup(prepared.config.out)
    run = _client_run(dataclasses.replace(prepared, job=job), output)
    prepared.problem.method.finish(run, {})
    output.finish({}, job.output_id)
