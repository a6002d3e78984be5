"""``kgrad plan`` never refuses because the output exists: it says what a run would do with it (and which
flag a run needs), and writes nothing.  ``kgrad run`` still refuses without --overwrite or --resume."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import zarr

from fileutil import tree_digest
from pipeline import InputError
from pipeline.output import OutputGroup, SpatialCopy
from pipeline.workflow import RunConfig, _client_run, prepare

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata")


@pytest.fixture
def made(tmp_path):
    """An output as a run of ``config`` leaves it, made without a cluster: 3 tasks, ``mark`` sets them done
    (an incomplete run's marks are in its sorted copy, ``OUT/order/``, as a run leaves them)."""
    np.save(tmp_path / "points.npy", np.random.default_rng(2).normal(size=(300, 2)))
    config = RunConfig(points=str(tmp_path / "points.npy"), out=str(tmp_path / "out.zarr"), workers=1,
                       rows_per_task=100)
    prepared = prepare(config)
    plan = prepared.plan
    assert plan.n_tasks == 3
    output = OutputGroup(config.out)
    output_id = output.create(n_points=plan.n_points, dim=plan.dim, dtype=plan.dtype,
                              rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks, attributes=prepared.attributes)

    def mark(tasks: int, complete: bool):
        if complete:
            zarr.open_group(config.out, mode="r+")["task_done"][:tasks] = 1
            output.finish({})
            return config
        job = dataclasses.replace(prepared.job, output_id=output_id)
        run = _client_run(dataclasses.replace(prepared, job=job), output)
        SpatialCopy(output).create(run_id=output_id, run_fingerprint=job.fingerprint, dtype=plan.dtype,
                                   rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks,
                                   source_chunk=job.data.copy_chunk, **prepared.problem.method.copy_contents(run))
        zarr.open_array(f"{config.out}/order/task_done", mode="r+")[:tasks] = 1
        return config

    return mark


def planned(config, **changes) -> str:
    return prepare(config.replace(**changes), planning=True).output_note


def test_complete_output(made):
    config = made(3, complete=True)
    assert planned(config) == "exists, complete: a run needs --overwrite (starts over) or does nothing with --resume"
    assert planned(config, resume=True) == "exists, complete: nothing to do with --resume"
    assert planned(config, overwrite=True) == "exists: a run with --overwrite replaces it"
    with pytest.raises(InputError, match="already exists"):
        prepare(config)  # a run still refuses


def test_incomplete_output(made):
    config = made(1, complete=False)
    assert planned(config) == ("exists, incomplete (2 of 3 tasks left): a run needs --resume (finishes it) or "
                               "--overwrite (starts over)")
    assert planned(config, resume=True) == "exists, incomplete: a run with --resume runs the 2 of 3 tasks left"


def test_output_of_another_run(made):
    config = made(3, complete=True)
    assert planned(config, lengthscale=2.0) == ("exists, it was made with different inputs or parameters "
                                                "(lengthscale): a run needs --overwrite (starts over)")
    assert planned(config, lengthscale=2.0, resume=True).endswith(
        "a run with --resume refuses it; use --overwrite (starts over)")


def test_not_a_kgrad_output(tmp_path):
    np.save(tmp_path / "points.npy", np.zeros((10, 2)))
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "notes.txt").write_text("mine")
    config = RunConfig(points=str(tmp_path / "points.npy"), out=str(tmp_path / "out.zarr"), workers=1)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        said = planned(config, **flags)
        assert said.startswith("refused, whatever the flags") and "notes.txt" in said, said


def test_empty_directory_is_created(tmp_path):
    np.save(tmp_path / "points.npy", np.zeros((10, 2)))
    (tmp_path / "out.zarr").mkdir()
    config = RunConfig(points=str(tmp_path / "points.npy"), out=str(tmp_path / "out.zarr"), workers=1)
    assert planned(config) == "create"


def test_cli_plan_on_a_complete_output_exits_0_and_writes_nothing(made, tmp_path):
    made(3, complete=True)
    before = tree_digest(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--points", "points.npy", "--out", "out.zarr",
                           "--workers", "1", "--rows-per-task", "100"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "out.zarr: exists, complete: a run needs --overwrite" in proc.stdout, proc.stdout
    assert tree_digest(tmp_path) == before
