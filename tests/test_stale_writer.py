"""A frozen run never writes into a newer run's output (pipeline/fenced.py), whatever the timing.

The attack: run A is frozen (SIGSTOP to its process group: what Ctrl-Z or a batch system's suspend does)
right after one of its workers wrote a gradient chunk and before the value chunk beside it.  Its lease goes
stale; run B (another lengthscale, ``--overwrite``) takes the output over and completes it.  Then A is
continued (SIGCONT).  Before the fence, A's worker wrote its value chunk into B's complete output.

The freeze is placed exactly: the worker processes start with ``tests/freeze_hook/sitecustomize.py`` on
their path, which makes the worker stop itself (SIGSTOP) on its first write of the named array, after
leaving a marker file; the test then stops A's whole process group.  B runs on a fresh local cluster.

Checked, for the dense path on kgrad's local cluster and on a dask CLI cluster, and for ``--tolerance``:
B's output stays complete and bit-identical to a clean run of B; A exits non-zero with one line that does
not tell the user to ``--resume`` B's output.  Slow: a lease goes stale after 60 s.

The default suite checks the mechanism itself in process (:func:`test_a_writer_that_checked_before_a_take_over_cannot_write`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from cluster_fixtures import (assert_bit_identical, assert_complete, kgrad, kgrad_env, kill_group, poll, read_attrs, read_streams,
                              run_args, start_cluster, start_kgrad, stop_cluster, wait_group_gone)

pytest_plugins = ["cluster_fixtures"]

HOOK = Path(__file__).resolve().parent / "freeze_hook"
STALE_WAIT = 66.0  # pipeline.lease.STALE_AFTER_SECONDS (60) and a margin


def _hook_env(marker: Path, array: str) -> dict:
    env = kgrad_env(KGRAD_TEST_FREEZE_ARRAY=array, KGRAD_TEST_FREEZE_MARKER=str(marker))
    env["PYTHONPATH"] = os.pathsep.join([str(HOOK), env["PYTHONPATH"]])
    return env


def _replace_lengthscale(args: list[str], value: str) -> list[str]:
    args = list(args)
    args[args.index("--lengthscale") + 1] = value
    return args


def _frozen_take_over(points, tmp_path, extra=(), scheduler=None, cluster_env=None, freeze="order/value"):
    """A frozen on its first write of ``freeze``; B takes over and completes; A continued.  Returns (A's exit
    code, A's stderr, B's output, a clean run of B)."""
    out = tmp_path / "out.zarr"
    marker = tmp_path / "frozen"
    a_args = run_args(points, out, *extra, scheduler=scheduler, workers=None if scheduler else 2)
    a = start_kgrad(a_args, env=cluster_env or _hook_env(marker, freeze))
    try:
        poll(lambda: marker.exists() or a.poll() is not None, 180, what="run A to reach its first write")
        assert a.poll() is None, f"run A ended before it was frozen: {read_streams(a)[1][-2000:]}"
        os.killpg(a.pid, signal.SIGSTOP)  # the whole run, as Ctrl-Z does (its worker already stopped itself)
        time.sleep(STALE_WAIT)
        b_args = _replace_lengthscale(run_args(points, out, "--overwrite", *extra), "0.3")
        b = kgrad(b_args)
        assert b.returncode == 0, b.stderr[-3000:]
        assert_complete(out)
        clean = tmp_path / "clean.zarr"
        assert kgrad(_replace_lengthscale(run_args(points, clean, *extra), "0.3")).returncode == 0
        assert_bit_identical(out, clean)
        os.killpg(a.pid, signal.SIGCONT)
        if scheduler is not None:  # the frozen worker is the CLI cluster's, not in A's process group
            for pid in _stopped_pids():
                os.kill(pid, signal.SIGCONT)
        code = a.wait(timeout=120)
        time.sleep(3)  # anything A still had in flight
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGCONT)
            kill_group(a)
        wait_group_gone(a.pid)
    return code, read_streams(a)[1], out, clean


def _stopped_pids() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] == "T":
                found.append(int(entry))
    return found


def _assert_a_lost(code: int, stderr: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("kgrad:") and " tasks (" not in line]
    assert code != 0, stderr
    assert len(lines) == 1, stderr
    assert "--resume" not in lines[0], lines[0]
    assert "another run" in lines[0], lines[0]


@pytest.mark.slow
def test_frozen_local_run_never_writes_into_the_newer_output(job_inputs, tmp_path):
    code, stderr, out, clean = _frozen_take_over(job_inputs.points, tmp_path)
    assert_bit_identical(out, clean)
    assert_complete(out)
    _assert_a_lost(code, stderr)


@pytest.mark.slow
def test_frozen_pruned_run_never_writes_into_the_newer_output(tmp_path):
    """On clustered points that prune (test_pruning_cli.py's): the tasks write the sorted copy ``order/``."""
    from methods import clustered

    points = tmp_path / "clustered.npy"
    np.save(points, clustered(40_000, 2))
    code, stderr, out, clean = _frozen_take_over(points, tmp_path, extra=("--tolerance", "1e-6"),
                                                 freeze="order/value")
    assert read_attrs(out)["pruned"] is True
    assert_bit_identical(out, clean)
    _assert_a_lost(code, stderr)


@pytest.mark.slow
def test_frozen_run_on_a_dask_cli_cluster_never_writes_into_the_newer_output(job_inputs, tmp_path):
    marker = tmp_path / "frozen"
    env = _hook_env(marker, "order/value")
    cluster = start_cluster(tmp_path / "cluster", 1, PYTHONPATH=env["PYTHONPATH"], KGRAD_TEST_FREEZE_ARRAY="order/value",
                            KGRAD_TEST_FREEZE_MARKER=str(marker))
    try:
        code, stderr, out, clean = _frozen_take_over(job_inputs.points, tmp_path, scheduler=cluster.scheduler_file,
                                                     cluster_env=kgrad_env())
    finally:
        for pid in _stopped_pids():
            os.kill(pid, signal.SIGCONT)
        stop_cluster(cluster)
    assert_bit_identical(out, clean)
    _assert_a_lost(code, stderr)


# ------------------------------------------------------------------------------------------ the mechanism, in process


def _make_output(path: Path, rows: int = 8):
    from pipeline.output import OutputGroup

    output = OutputGroup(str(path))
    output.create(n_points=rows, dim=2, dtype="float32", rows_per_task=4, n_tasks=2, attributes={
        "run_fingerprint": "x"})
    return output


def test_a_writer_that_checked_before_a_take_over_cannot_write(tmp_path):
    """The writer holds the array's directory it checked; the take-over replaces it: the write fails, and the
    new output keeps its bytes."""
    from pipeline import fenced
    from pipeline.errors import RunEnded

    path = tmp_path / "out.zarr"
    old = _make_output(path)
    old_id = old.output_id()
    with fenced._array_dir(str(path), "value", old_id) as (fd, meta):  # checked: still the old output
        old.remove({old_id})  # another run takes over ...
        new = _make_output(path)  # ... and writes its own output
        new.write_task(0, 4, 0, np.ones((4, 2), np.float32), np.full(4, 7, np.float32), new.output_id())
        chunks = fenced._encode(meta, 0, np.zeros(4, np.float32))
        with pytest.raises(FileNotFoundError):  # the frozen writer wakes up: its directory is gone
            for key, raw in chunks.items():
                fenced._put_at(fd, key, raw)
    value = np.asarray(new.open()["value"][:4])
    assert np.array_equal(value, np.full(4, 7, np.float32))
    with pytest.raises(RunEnded, match="another run"):  # and a writer that checks now is refused
        old.write_task(4, 8, 1, np.ones((4, 2), np.float32), np.ones(4, np.float32), old_id)
    with pytest.raises(RunEnded):
        old.finish({"timings": {}}, old_id)
    assert new.attributes()["complete"] is False


def test_fenced_writes_are_what_zarr_writes(tmp_path):
    """The chunk files written through the descriptor read back as zarr wrote them (and leave no temporary)."""
    path = tmp_path / "out.zarr"
    output = _make_output(path, rows=10)  # a ragged last chunk
    g = np.arange(20, dtype=np.float32).reshape(10, 2)
    output.write_task(0, 4, 0, g[:4], g[:4, 0], output.output_id())
    output.write_task(8, 10, 1, g[8:], g[8:, 0], output.output_id())
    output.finish({"note": 1}, output.output_id())
    group = output.open()
    assert np.array_equal(np.asarray(group["gradient"][:4]), g[:4])
    assert np.array_equal(np.asarray(group["gradient"][8:]), g[8:])
    assert group.attrs["complete"] is True and group.attrs["note"] == 1
    assert not list(path.rglob("*.partial"))
    import xarray as xr

    ds = xr.open_zarr(str(path))  # consolidated metadata, written in the same fenced write
    assert ds["gradient"].dims == ("point", "dim")


def test_a_stale_overwrite_never_removes_a_newer_output(tmp_path):
    """A run that judged the output (its ids) before freezing cannot remove what another run made meanwhile."""
    from pipeline.errors import RunEnded

    path = tmp_path / "out.zarr"
    first = _make_output(path)
    judged = {first.output_id()}  # what the frozen run saw when it took the lease
    first.remove(judged)  # the run that took over in the meantime ...
    newer = _make_output(path)
    newer.write_task(0, 4, 0, np.ones((4, 2), np.float32), np.ones(4, np.float32), newer.output_id())
    with pytest.raises(RunEnded):
        first.remove(judged)  # ... the frozen one wakes up
    assert newer.output_id() and np.array_equal(np.asarray(newer.open()["value"][:4]), np.ones(4, np.float32))
    assert not list(path.glob(".kgrad-trash-*"))


def test_a_take_over_fences_out_the_runs_before_it(tmp_path):
    """A resume re-stamps the arrays with its own id: a writer of the run before it (the same output, the same
    inputs) can write nothing more there, not even its attributes; a take-over cut short is taken over again."""
    from pipeline import fenced
    from pipeline.errors import RunEnded

    path = tmp_path / "out.zarr"
    output = _make_output(path)
    before = output.output_id()
    cut_short = fenced.new_id()
    output.update({fenced.ID_KEY: cut_short, fenced.PREVIOUS_KEY: [before]}, cut_short, accept={before})
    fenced.restamp(str(path), (), ("gradient",), {before}, cut_short)  # killed after one array
    now = fenced.new_id()
    output.take_over(fenced.accepted_ids(output.attributes()), now)
    assert output.output_id() == now and output.attributes()[fenced.PREVIOUS_KEY] == []
    for stale in (before, cut_short):
        with pytest.raises(RunEnded):
            output.write_task(0, 4, 0, np.ones((4, 2), np.float32), np.ones(4, np.float32), stale)
        with pytest.raises(RunEnded):
            output.update({"complete": False}, stale)
    output.write_task(0, 4, 0, np.ones((4, 2), np.float32), np.ones(4, np.float32), now)
