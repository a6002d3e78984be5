"""Resume after a hard kill, the situations beyond test_guarantees.py: `kgrad run` killed before its output
exists, while the output is created, twice (the resume killed too), or stopped by SIGTERM or SIGINT, finishes
with `kgrad run ... --resume`, recomputing only the tasks not yet stored (their chunks are not rewritten), with
a result bit-identical to an undisturbed run.  Resuming with other parameters (each one), with weights added, or
without --resume is refused (exit 2) and leaves the output untouched; resuming a complete output changes nothing.

A kill -9 before the tasks, after some, after every task, or at a random moment, then --resume; a resume with
other points (another file, or changed in place) or another tolerance refused: for every computation method and
executor, in test_guarantees.py.

Real processes and signals only; see cluster_fixtures.py for sizes and the reproducible seed.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import numpy as np
import pytest

pytest.register_assert_rewrite("cluster_fixtures")
from cluster_fixtures import (N_TASKS, RUN_TIMEOUT, Killed, assert_bit_identical, assert_complete,  # noqa: E402
                              assert_no_leftovers, count_done, group_members, kgrad, kill_group, partial_files,
                              poll, read_attrs, read_streams, read_task_done, record, rng_for, run_and_kill,
                              run_args, start_kgrad, tree_digest)

pytest_plugins = ["cluster_fixtures"]


def resume_and_check(name: str, job_inputs, undisturbed, out, killed: Killed, *, workers: int = 2, faults: int = 1,
                     runs: int = 1) -> dict:
    """Resume a killed run; check that exactly the not-done tasks ran (the run's timings count them) and that
    the bits match."""
    result = kgrad(run_args(job_inputs.points, out, "--resume", workers=workers))
    assert result.returncode == 0, result.stderr
    done = killed.done
    timings = assert_complete(out, tasks_run=N_TASKS - done, tasks_skipped=done)
    assert timings["resumed"] is bool(killed.output_existed)
    leftovers = partial_files(out)
    compared = assert_bit_identical(out, undisturbed.out)
    record(name, faults_injected=faults, runs_survived=runs, kill_after_s=round(killed.seconds, 2),
           processes_killed=killed.processes_killed, tasks_done_before=done, tasks_total=N_TASKS,
           tasks_rerun=timings["tasks_run"], bytes_compared=compared, partial_files_left=len(leftovers),
           output_existed=killed.output_existed)
    return timings


@pytest.mark.slow
def test_kill_before_output_exists_then_resume(job_inputs, undisturbed, tmp_path):
    """Killed while starting (imports, input checks): nothing written, and --resume simply runs it all."""
    out = tmp_path / "out.zarr"
    killed = run_and_kill(run_args(job_inputs.points, out), out, lambda t, done: t >= 0.3)
    assert not killed.finished_first
    assert not killed.output_existed, "the output appeared within 0.3 s; the test could not hit this moment"
    resume_and_check("kill_before_output_exists", job_inputs, undisturbed, out, killed)


@pytest.mark.slow
def test_killed_resume_is_resumed_again(job_inputs, undisturbed, tmp_path):
    """Kill the run, kill its resume too (later, with 1 worker), then resume with 2 workers."""
    rng = rng_for("killed_twice")
    out = tmp_path / "out.zarr"
    first = rng.randint(1, N_TASKS // 3)
    second = rng.randint(first + 2, (2 * N_TASKS) // 3)
    k1 = run_and_kill(run_args(job_inputs.points, out), out,
                      lambda t, done: done is not None and done.sum() >= first)
    assert not k1.finished_first and first <= k1.done < N_TASKS
    k2 = run_and_kill(run_args(job_inputs.points, out, "--resume", workers=1), out,
                      lambda t, done: done is not None and done.sum() >= max(second, k1.done + 2))
    assert not k2.finished_first and k1.done < k2.done < N_TASKS
    resume_and_check("killed_resume_resumed", job_inputs, undisturbed, out, k2, faults=2, runs=2)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-cli", "sigint-group"])
def test_terminated_run_leaves_no_processes_and_resumes(job_inputs, undisturbed, tmp_path, how):
    """SIGTERM to the kgrad process alone (a batch system cancelling the job), or SIGINT to the whole
    group (Ctrl-C in a terminal): kgrad exits, its local cluster's processes do not outlive it, and the
    output resumes to the same bits."""
    out = tmp_path / "out.zarr"
    proc = start_kgrad(run_args(job_inputs.points, out))
    try:
        poll(lambda: count_done(out) >= 2 or proc.poll() is not None, timeout=180, what="2 tasks done")
        if proc.poll() is not None:
            pytest.fail("the run finished before the signal; use a larger KGRAD_RELIABILITY_N")
        members = len(group_members(proc.pid))
        if how == "sigterm-cli":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert_no_leftovers(proc, timeout=20)
    expected = 128 + signal.SIGTERM if how == "sigterm-cli" else 130  # SIGTERM stops a run like Ctrl-C
    assert returncode == expected, (returncode, read_streams(proc)[1][-2000:])
    done = count_done(out)
    assert done < N_TASKS
    killed = Killed(0.0, members, done, True, False, returncode, "")
    resume_and_check(f"terminated[{how}]", job_inputs, undisturbed, out, killed)


# ------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def interrupted(job_inputs, tmp_path_factory):
    """A run of the standard job killed after 2 tasks, on its own copy of the points."""
    root = tmp_path_factory.mktemp("interrupted")
    points = root / "points.npy"
    shutil.copyfile(job_inputs.points, points)
    out = root / "out.zarr"
    killed = run_and_kill(run_args(points, out), out, lambda t, done: done is not None and done.sum() >= 2)
    assert not killed.finished_first and 2 <= killed.done < N_TASKS
    return points, out, killed


REFUSED = {
    "lengthscale": ["--lengthscale", "0.7"],
    "kernel": ["--kernel", "matern32"],
    "variance": ["--variance", "2.0"],
    "dtype": ["--dtype", "float64"],
    "mode": ["--mode", "jacfwd"],
    "rows_per_task": ["--rows-per-task", "4096"],
}


def _refusal(points, out, extra):
    args = run_args(points, out, "--resume")
    if extra[:1] and extra[0] in args:  # override a flag the standard job already gives
        i = args.index(extra[0])
        args[i + 1] = extra[1]
        extra = extra[2:]
    return kgrad(args + list(extra))


@pytest.mark.slow  # the default suite's refusals: test_guarantees.py
@pytest.mark.parametrize("change", sorted(REFUSED))
def test_resume_with_other_parameters_is_refused(interrupted, change):
    points, out, killed = interrupted
    before = tree_digest(out)
    result = _refusal(points, out, REFUSED[change])
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert tree_digest(out) == before, "a refused resume touched the output"
    record(f"resume_refused[{change}]", exit_code=2, files_unchanged=len(before), message=lines[0])


@pytest.mark.slow  # the default suite's refusals: test_guarantees.py
def test_resume_with_weights_added_is_refused(job_inputs, interrupted, tmp_path):
    points, out, killed = interrupted
    weights = tmp_path / "weights.npy"
    np.save(weights, np.full(np.load(points).shape[0], 0.5, np.float32))
    before = tree_digest(out)
    result = kgrad(run_args(points, out, "--resume", "--weights", weights))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "cannot resume" in result.stderr
    assert tree_digest(out) == before


@pytest.mark.slow  # the default suite's refusals: test_guarantees.py
def test_rerun_without_resume_or_overwrite_is_refused(interrupted):
    points, out, killed = interrupted
    before = tree_digest(out)
    result = kgrad(run_args(points, out))
    assert result.returncode == 2 and "already exists" in result.stderr, result.stderr
    assert tree_digest(out) == before


@pytest.mark.slow  # its fixture is a whole run; test_cli.py's test_resume_on_complete_output_does_nothing is fast
def test_resume_of_a_complete_output_changes_nothing(undisturbed, job_inputs, tmp_path):
    out = tmp_path / "done.zarr"
    shutil.copytree(undisturbed.out, out)
    before = tree_digest(out)
    result = kgrad(run_args(job_inputs.points, out, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stderr
    assert tree_digest(out) == before


@pytest.mark.slow
def test_kill_while_the_output_is_created_then_resume(job_inputs, undisturbed, tmp_path):
    """SIGKILL the moment the output group's zarr.json appears, i.e. inside OutputGroup.create (it writes
    the group, each attribute, then the arrays: tens of milliseconds).  --resume must finish the job."""
    out = tmp_path / "out.zarr"
    proc = start_kgrad(run_args(job_inputs.points, out))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (out / "zarr.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the output never appeared (exit {proc.poll()}): {read_streams(proc)[1][-2000:]}")
            time.sleep(0.0005)
        members = kill_group(proc)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    if read_task_done(out) is not None:
        pytest.skip("the kill landed after the output's arrays were created (window missed)")
    attrs = read_attrs(out)
    state = f"{len(attrs)} attributes, arrays: {sorted(p.name for p in out.iterdir() if p.is_dir())}"
    result = kgrad(run_args(job_inputs.points, out, "--resume"))
    record("kill_while_output_created", faults_injected=1, processes_killed=members, state=state,
           resume_exit=result.returncode, resume_error=result.stderr.strip().splitlines()[-1:])
    assert result.returncode == 0, f"{state}: {result.stderr.strip().splitlines()[-1:]}"
    assert_complete(out, tasks_run=N_TASKS, tasks_skipped=0)
    assert_bit_identical(out, undisturbed.out)
