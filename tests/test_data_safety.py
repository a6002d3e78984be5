"""Nothing lost, nothing falsely complete: what a careless or hostile user can do to a run, with real
processes and real signals (see cluster_fixtures.py).

* ``--overwrite`` removes only a kgrad output: a directory of documents, a regular file, a foreign zarr
  group and a kgrad output with a user's file inside all survive byte for byte (exit 2, one line);
* points rewritten while a run reads them: the run fails (exit 1, one line), the output stays incomplete;
* a frozen (SIGSTOPped) scheduler: the run fails within ``--scheduler-timeout``, naming the scheduler and
  ``--resume``, and nothing of it is written afterwards;
* Ctrl-C, or the scheduler killed, on an external cluster: no task of the run is marked done after the
  client has exited;
* two runs on one ``--out``: one owns it, the other is refused naming the owner;
* a full disk, Ctrl-C pressed three times: one line on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

import run_steps
from cluster_fixtures import (
    N_TASKS,
    RUN_TIMEOUT,
    assert_bit_identical,
    assert_complete,
    count_done,
    kgrad,
    kill_group,
    poll,
    read_attrs,
    read_streams,
    record,
    run_args,
    start_cluster,
    start_kgrad,
    stop_cluster,
    tree_digest,
)

pytest_plugins = ["cluster_fixtures"]


def error_lines(stderr: str) -> list[str]:
    """stderr without kgrad's own start-of-run line ("kgrad: N tasks ... on W workers"): what a failing run
    adds must be exactly one line."""
    return [line for line in stderr.strip().splitlines()
            if line.strip() and not (line.startswith("kgrad: ") and " tasks (" in line and " workers" in line)]


def wait_exit(proc, timeout: float = RUN_TIMEOUT) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if os.environ.get("KGRAD_TEST_ABORT_HANGS"):  # with PYTHONFAULTHANDLER=1: every thread's stack
            os.kill(proc.pid, signal.SIGABRT)
            time.sleep(2)
        kill_group(proc)
        pytest.fail(f"kgrad did not exit within {timeout} s: {read_streams(proc)[1][-2000:]}")


# ------------------------------------------------------------------------------------ --overwrite


# small_points (300 x 2), small_outputs: session fixtures of cluster_fixtures.py


def _foreign_directory(root):
    docs = root / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.tex").write_text("\\chapter{Results}\n")
    (docs / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return docs


def _regular_file(root):
    path = root / "notes.txt"
    path.write_text("do not delete\n")
    return path


def _foreign_zarr_group(root):
    import zarr

    path = root / "theirs.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("gradient", shape=(4,), dtype="f8")[:] = np.arange(4.0)
    return path


def _kgrad_output_with_a_user_file(root, small_points, small_outputs):
    path = small_outputs.copy(small_points, root / "ours.zarr")  # a complete `kgrad run` output
    (path / "README.txt").write_text("my notes about this result\n")
    return path


def _kgrad_output_with_a_file_in_an_array(root, small_points, small_outputs):
    path = _kgrad_output_with_a_user_file(root, small_points, small_outputs)
    (path / "README.txt").rename(path / "gradient" / "notes.txt")
    return path


@pytest.mark.sampled(3, cover=())
@pytest.mark.parametrize("make", ["foreign_directory", "regular_file", "foreign_zarr_group",
                                  "kgrad_output_with_a_user_file", "kgrad_output_with_a_file_in_an_array"])
def test_overwrite_never_deletes_what_kgrad_did_not_write(make, small_points, small_outputs, tmp_path):
    target = {"foreign_directory": lambda: _foreign_directory(tmp_path),
              "regular_file": lambda: _regular_file(tmp_path),
              "foreign_zarr_group": lambda: _foreign_zarr_group(tmp_path),
              "kgrad_output_with_a_user_file": lambda: _kgrad_output_with_a_user_file(tmp_path, small_points,
                                                                                      small_outputs),
              "kgrad_output_with_a_file_in_an_array":
                  lambda: _kgrad_output_with_a_file_in_an_array(tmp_path, small_points, small_outputs)}[make]()
    before = tree_digest(target) if target.is_dir() else target.read_bytes()
    result = kgrad(["run", "--points", small_points, "--out", target, "--overwrite", "--workers", "1",
                    "--no-progress"])
    after = tree_digest(target) if target.is_dir() else target.read_bytes()
    lines = result.stderr.strip().splitlines()
    record(f"overwrite_refused[{make}]", exit_code=result.returncode, message=lines[-1:])
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and str(target) in lines[0] and "Traceback" not in result.stderr, lines
    assert after == before, "--overwrite touched what kgrad did not write"


@pytest.mark.slow
def test_overwrite_replaces_a_kgrad_output_and_an_empty_directory(small_points, small_outputs, tmp_path):
    out = small_outputs.copy(small_points, tmp_path / "out.zarr")  # a complete `kgrad run` output
    stray = out / "gradient" / "c" / "99" / "0"  # a chunk of an earlier, larger run: kgrad's own file
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"old chunk")
    again = kgrad(["run", "--points", small_points, "--out", out, "--overwrite", "--lengthscale", "2",
                   "--workers", "1", "--no-progress"])
    assert again.returncode == 0, again.stderr
    assert not stray.exists() and read_attrs(out)["lengthscale"] == [2.0, 2.0]
    assert not (out / ".kgrad-lease.json").exists(), "the lease outlived the run"
    empty = tmp_path / "empty"
    empty.mkdir()
    made = kgrad(["run", "--points", small_points, "--out", empty, "--workers", "1", "--no-progress"])
    assert made.returncode == 0, made.stderr
    assert read_attrs(empty)["complete"] is True


# ------------------------------------------------------------------------------------ the lease


def test_lease_is_exclusive_and_a_dead_owner_does_not_keep_it(tmp_path):
    """Unit level: a live lease refuses a second taker (naming the owner); a lease whose pid is gone, or
    whose heartbeat is older than the stale limit, is taken over; tasks of a run that no longer holds the
    lease are refused."""
    from pipeline import lease
    from pipeline.errors import InputError, RunEnded

    out = str(tmp_path / "out.zarr")
    held = lease.acquire(out)
    with pytest.raises(InputError, match=f"pid {os.getpid()}"):
        lease.acquire(out)
    lease.check_owner(out, held.token)
    with pytest.raises(RunEnded):
        lease.check_owner(out, "somebody-else")
    held.release()
    with pytest.raises(RunEnded):
        lease.check_owner(out, held.token)
    assert not os.path.exists(out), "the directory the lease made is removed with it"

    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / "dead.zarr"
    path.mkdir()
    now = time.time()
    (path / ".kgrad-lease.json").write_text(json.dumps(
        {"token": "dead", "pid": dead.pid, "host": socket.gethostname(), "started": now, "heartbeat": now}))
    taken = lease.acquire(str(path))
    assert lease.read(str(path))["token"] == taken.token
    with pytest.raises(RunEnded):
        lease.check_owner(str(path), "dead")
    taken.release()

    old = {"token": "frozen", "pid": 1, "host": "another-host", "started": now - 600, "heartbeat": now - 600}
    (path / ".kgrad-lease.json").write_text(json.dumps(old))
    assert not lease.is_live(old)
    lease.acquire(str(path)).release()
    fresh = dict(old, heartbeat=time.time())
    (path / ".kgrad-lease.json").write_text(json.dumps(fresh))
    with pytest.raises(InputError, match="another-host"):
        lease.acquire(str(path))


@pytest.mark.slow
def test_two_runs_on_one_output_one_owner_one_refusal(job_inputs, undisturbed, tmp_path):
    """A second `kgrad run --overwrite` started while the first holds the output is refused at once
    (exit 2, one line naming the owner); the first finishes, bit-identical to an undisturbed run."""
    out = tmp_path / "out.zarr"
    shutil.copytree(undisturbed.out, out)
    first = start_kgrad(run_args(job_inputs.points, out, "--overwrite"))
    try:
        poll(lambda: (out / ".kgrad-lease.json").exists() or first.poll() is not None, timeout=60,
             interval=0.01, what="the first run's lease")
        assert first.poll() is None, read_streams(first)[1]
        second = kgrad(run_args(job_inputs.points, out, "--overwrite"))
        code = wait_exit(first)
    finally:
        if first.poll() is None:
            kill_group(first)
    lines = second.stderr.strip().splitlines()
    record("racing_overwrite", first_exit=code, second_exit=second.returncode, message=lines[-1:])
    assert code == 0, read_streams(first)[1][-2000:]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert "another kgrad run" in lines[0] and f"pid {first.pid}" in lines[0], lines[0]
    assert_complete(out, tasks_run=N_TASKS)
    assert_bit_identical(out, undisturbed.out)


@pytest.mark.slow
def test_simultaneous_overwrites_leave_one_consistent_output(job_inputs, tmp_path):
    """Two `--overwrite` runs with different lengthscales started at the same moment: every run that says
    it wrote the output either is the one whose data are there, or ran wholly before the other; the other
    is refused with exit 2.  The output is complete and matches its own attributes."""
    out = tmp_path / "out.zarr"
    procs = {ls: start_kgrad(run_args(job_inputs.points, out, "--overwrite", "--lengthscale", ls))
             for ls in ("0.5", "0.7")}
    codes = {ls: wait_exit(p) for ls, p in procs.items()}
    record("simultaneous_overwrite", exits=codes)
    assert sorted(codes.values()) in ([0, 0], [0, 2]), {ls: read_streams(p)[1][-1500:] for ls, p in procs.items()}
    attrs = read_attrs(out)
    assert attrs["complete"] is True
    winner = f"{attrs['lengthscale'][0]:g}"
    assert codes[winner] == 0
    for ls, proc in procs.items():
        if codes[ls] == 2:
            assert "another kgrad run" in read_streams(proc)[1]


# ------------------------------------------------------------------------------------ inputs changing


@pytest.mark.slow
def test_points_rewritten_mid_run_never_complete(job_inputs, tmp_path):
    """Rewrite rows of the points file in place while the run reads it (after 4 of 20 tasks): the run must
    fail (exit 1, one line saying the points changed and to start over) and leave the output incomplete,
    never a `complete` output whose chunks mix two datasets."""
    points = tmp_path / "points.npy"
    shutil.copyfile(job_inputs.points, points)
    out = tmp_path / "out.zarr"
    proc = start_kgrad(run_args(points, out))
    try:
        poll(lambda: count_done(out) >= 4 or proc.poll() is not None, timeout=180, what="4 tasks done")
        if proc.poll() is not None:
            pytest.fail("the run finished before the points were rewritten; raise KGRAD_RELIABILITY_N")
        data = np.load(points, mmap_mode="r+")
        data[:] = data[:] * np.float32(1.5) + np.float32(0.25)  # every row changes, in place
        data.flush()
        del data
        at_change = count_done(out)
        code = wait_exit(proc)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    stderr = read_streams(proc)[1]
    lines = error_lines(stderr)
    record("points_rewritten_mid_run", tasks_done_at_change=at_change, exit_code=code,
           tasks_done_at_exit=count_done(out), message=lines[-1:])
    assert code == 1, stderr[-2000:]
    assert len(lines) == 1 and "changed" in lines[0] and "--overwrite" in lines[0], lines
    assert read_attrs(out).get("complete") is False


# ------------------------------------------------------------------------------------ schedulers


@pytest.fixture
def own_cluster(tmp_path):
    """A dask CLI cluster for one test (it gets frozen or killed)."""
    cluster = start_cluster(tmp_path / "cluster", 2)
    try:
        yield cluster
    finally:
        for pid_file in ("scheduler.pid",):
            try:
                os.killpg(int((cluster.state_dir / pid_file).read_text()), signal.SIGCONT)
            except (OSError, ValueError):
                pass
        stop_cluster(cluster)


def _frozen_after_exit(out, seconds: float = 6.0) -> tuple[int, int]:
    at_exit = count_done(out)
    time.sleep(seconds)
    return at_exit, count_done(out)


@pytest.mark.slow
def test_frozen_scheduler_ends_the_run_within_the_timeout(own_cluster, job_inputs, tmp_path):
    """SIGSTOP the scheduler in mid-run: `kgrad run --scheduler-timeout 5` exits 1 within the timeout
    (plus the probe interval), with one line naming the scheduler and --resume.  After the scheduler is
    woken up, no task of the run is marked done."""
    out = tmp_path / "out.zarr"
    timeout = 5
    proc = start_kgrad(run_args(job_inputs.points, out, "--scheduler-timeout", timeout,
                                scheduler=own_cluster.scheduler_file))
    try:
        poll(lambda: count_done(out) >= 2 or proc.poll() is not None, timeout=180, what="2 tasks done")
        if proc.poll() is not None:
            pytest.fail("the run finished before the scheduler was frozen")
        os.kill(own_cluster.scheduler_pid, signal.SIGSTOP)
        frozen = time.monotonic()
        code = wait_exit(proc, timeout=120)
        seconds = time.monotonic() - frozen
    finally:
        os.kill(own_cluster.scheduler_pid, signal.SIGCONT)
        if proc.poll() is None:
            kill_group(proc)
    at_exit, later = _frozen_after_exit(out)
    stderr = read_streams(proc)[1]
    lines = error_lines(stderr)
    with open(own_cluster.scheduler_file) as f:
        address = json.load(f)["address"]
    record("frozen_scheduler", timeout=timeout, seconds_to_exit=round(seconds, 2), exit_code=code,
           lines=len(lines), tasks_done_at_exit=at_exit, tasks_done_6s_after_wakeup=later, message=lines[-1:])
    assert code == 1, stderr[-2000:]
    assert seconds < timeout + 15, f"took {seconds:.1f} s to notice a frozen scheduler"
    assert len(lines) == 1 and "--resume" in lines[0] and (address in lines[0] or "scheduler" in lines[0]), lines
    assert later == at_exit, f"tasks marked done after the client exited: {at_exit} -> {later}"
    assert read_attrs(out).get("complete") is False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "scheduler-killed"])
def test_nothing_is_written_after_the_client_exits(how, own_cluster, job_inputs, tmp_path):
    """Ctrl-C to `kgrad run --scheduler FILE`, or kill -9 of that scheduler: kgrad exits (130, or 1) with
    one line, and no task of the run is marked done afterwards although the workers live on."""
    out = tmp_path / "out.zarr"
    proc = start_kgrad(run_args(job_inputs.points, out, "--scheduler-timeout", 10,
                                scheduler=own_cluster.scheduler_file))
    try:
        poll(lambda: count_done(out) >= 3 or proc.poll() is not None, timeout=180, what="3 tasks done")
        if proc.poll() is not None:
            pytest.fail("the run finished before the signal")
        if how == "ctrl-c":
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.kill(own_cluster.scheduler_pid, signal.SIGKILL)
        code = wait_exit(proc, timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    at_exit, later = _frozen_after_exit(out)
    stderr = read_streams(proc)[1]
    lines = error_lines(stderr)
    record(f"after_client_exit[{how}]", exit_code=code, tasks_done_at_exit=at_exit,
           tasks_done_6s_later=later, message=lines[-1:])
    assert code == (130 if how == "ctrl-c" else 1), stderr[-2000:]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in stderr, lines
    assert later == at_exit, f"tasks marked done after the client exited: {at_exit} -> {later}"


# ------------------------------------------------------------------------------------ one line


@pytest.mark.slow
def test_three_quick_ctrl_c_print_one_line(job_inputs, tmp_path):
    out = tmp_path / "out.zarr"
    proc = start_kgrad(run_args(job_inputs.points, out))
    try:
        poll(lambda: count_done(out) >= 2 or proc.poll() is not None, timeout=180, what="2 tasks done")
        if proc.poll() is not None:
            pytest.fail("the run finished before Ctrl-C")
        for _ in range(3):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)
        code = wait_exit(proc, timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    stderr = read_streams(proc)[1]
    lines = error_lines(stderr)
    record("three_ctrl_c", exit_code=code, lines=lines)
    assert code == 130, stderr[-2000:]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in stderr, stderr[-2000:]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 300 KiB tmpfs (needs root, as in CI): a real full disk, not a mock."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_full_disk_prints_one_line_naming_the_output(job_inputs, tiny_disk):
    out = tiny_disk / "out.zarr"
    result = kgrad(run_args(job_inputs.points, out))
    lines = error_lines(result.stderr)
    record("disk_full", exit_code=result.returncode, lines=len(lines), message=lines[-1:])
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "No space left" in lines[0] and str(out) in lines[0] and "--resume" in lines[0], lines[0]


# ------------------------------------------------------------------------------------ messages


def test_range_error_names_the_outlier_and_fits_the_dtype():
    """A 1e300 in row 5 drags the data's mid-range centre so far that every row is 'far from the centre':
    the message must still name row 5, and advise float64 to no run (1e300 overflows float64 too)."""
    from pipeline import InputError, kernel_gradients

    x = np.random.default_rng(3).normal(size=(20, 2))
    x[5, 1] = 1e300
    with pytest.raises(InputError) as info:
        kernel_gradients(x, dtype="float64")
    assert "row 5" in str(info.value) and "float64 (" not in str(info.value) and "rescale" in str(info.value)
    with pytest.raises(InputError) as info:
        kernel_gradients(x, dtype="float32")
    assert "row 5" in str(info.value) and "float64" not in str(info.value) and "rescale" in str(info.value)


def test_plan_names_the_run_that_holds_the_output(small_points, tmp_path):
    """`kgrad plan` writes nothing, and says when another run owns the output (a run would be refused)."""
    from pipeline import lease

    out = tmp_path / "out.zarr"
    held = lease.acquire(str(out))
    try:
        result = kgrad(["plan", "--points", small_points, "--out", out, "--workers", "1"])
    finally:
        held.release()
    assert result.returncode == 0, result.stderr
    assert f"pid {os.getpid()}" in result.stdout and "refused" in result.stdout, result.stdout


@pytest.mark.slow
def test_an_interrupted_removal_never_looks_complete(small_points, small_outputs, tmp_path, monkeypatch):
    """--overwrite stopped halfway through deleting the old output (Ctrl-C, kill) must not leave a group
    that says `complete` over missing data: the run attributes go first, the arrays next, zarr.json last."""
    from pipeline import fenced
    from pipeline.output import OutputGroup

    out = small_outputs.copy(small_points, tmp_path / "out.zarr", "--rows-per-task", "100")
    calls = []
    real_remove_tree = fenced.remove_tree

    def interrupted(*args, **kwargs):  # the first array is gone, then Ctrl-C
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_remove_tree(*args, **kwargs)

    monkeypatch.setattr(fenced, "remove_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        OutputGroup(str(out)).remove(fenced.accepted_ids(read_attrs(out)))
    monkeypatch.undo()
    output = OutputGroup(str(out))
    attrs = output.attributes()
    assert attrs.get("complete") is False and "run_fingerprint" not in attrs, attrs
    assert output.kind() == "kgrad" and output.half_created()
    again = kgrad(["run", "--points", small_points, "--out", out, "--workers", "1", "--no-progress", "--resume"])
    assert again.returncode == 0, again.stderr
    assert read_attrs(out)["complete"] is True and read_attrs(out)["timings"]["tasks_skipped"] == 0


def _create_cut_short(out, arrays_made: int, bare_dir: bool, monkeypatch):
    """OutputGroup.create stopped (as by SIGKILL) after ``arrays_made`` arrays, with the next array's directory
    made but not its metadata (``bare_dir``, zarr's temporary file in it), or before the run attributes
    (``arrays_made`` 3).  Returns the OutputGroup."""
    import zarr

    from pipeline.output import OutputGroup

    made = []
    real_create_array = zarr.Group.create_array

    def create_array(self, name, **kwargs):
        if len(made) == arrays_made:
            if bare_dir:
                (out / name).mkdir()
                (out / name / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b'{"zarr_fo')
            raise KeyboardInterrupt
        made.append(name)
        return real_create_array(self, name, **kwargs)

    def update(*args, **kwargs):
        raise KeyboardInterrupt

    output = OutputGroup(str(out))
    with monkeypatch.context() as patch:
        patch.setattr(zarr.Group, "create_array", create_array)
        patch.setattr(OutputGroup, "update", update)
        with pytest.raises(KeyboardInterrupt):
            output.create(n_points=300, dim=2, dtype="float32", rows_per_task=100, n_tasks=3,
                          attributes={"run_fingerprint": "f"})
    return output


@pytest.mark.parametrize("arrays_made, bare_dir", [(0, False), (0, True), (1, True), (2, True), (3, False)])
def test_an_output_cut_short_while_created_is_made_again(arrays_made, bare_dir, tmp_path, monkeypatch):
    """A run killed inside OutputGroup.create leaves a half-made output (kgrad's marker, no run attributes):
    whatever it has got to, the next run (--resume or --overwrite) removes it, arrays without metadata
    included, and creates its own; a CI run once found the gradient's directory made but not its zarr.json,
    and the removal refused it as another run's."""
    from pipeline import fenced
    from pipeline.output import ARRAYS

    out = tmp_path / "out.zarr"
    output = _create_cut_short(out, arrays_made, bare_dir, monkeypatch)
    assert output.kind() == "kgrad" and output.half_created()
    output.remove(fenced.accepted_ids(read_attrs(out)))  # what the next run does (pipeline/workflow.py)
    assert sorted(p.name for p in out.iterdir()) == ["zarr.json"]
    new_id = output.create(n_points=300, dim=2, dtype="float32", rows_per_task=100, n_tasks=3,
                           attributes={"run_fingerprint": "f"})
    for name in ARRAYS:
        assert json.loads((out / name / "zarr.json").read_text())["attributes"][fenced.ID_KEY] == new_id
    assert not output.half_created() and output.done_tasks().tolist() == [False] * 3


def test_a_bare_array_directory_of_a_newer_output_is_never_removed(tmp_path, monkeypatch):
    """A run frozen past its lease that wakes inside a removal must not delete an array that a newer run is
    creating (its directory there, its metadata not yet): the group names the newer run's id."""
    from pipeline import fenced
    from pipeline.errors import RunEnded

    out = tmp_path / "out.zarr"
    output = _create_cut_short(out, 1, True, monkeypatch)
    stale = fenced.accepted_ids(read_attrs(out))
    output.remove(stale)
    _create_cut_short(out, 1, True, monkeypatch)  # the newer run, mid-creation
    with pytest.raises(RunEnded, match="another run"):
        fenced.remove_tree(str(out), (), "value", None, stale)
    assert (out / "value").is_dir() and (out / "gradient" / "zarr.json").exists()


@pytest.mark.slow  # the whole path of test_an_output_cut_short_while_created_is_made_again, by the CLI
def test_resume_after_a_cut_short_creation_by_the_cli(small_points, tmp_path, monkeypatch):
    out = tmp_path / "out.zarr"
    _create_cut_short(out, 1, True, monkeypatch)
    again = kgrad(["run", "--points", small_points, "--out", out, "--workers", "1", "--no-progress", "--resume"])
    assert again.returncode == 0, again.stderr
    assert read_attrs(out)["complete"] is True and read_attrs(out)["timings"]["tasks_skipped"] == 0


def test_workers_check_the_sources_when_they_are_the_points(tmp_path):
    """Without --sources the points are the sources: a worker that loads them changed refuses the task."""
    from pipeline.errors import InputsChanged
    from pipeline.output import OutputGroup
    from pipeline.methods.dense import _SOURCES, DENSE
    from pipeline.workflow import RunOptions, prepare

    points = tmp_path / "q.npy"
    np.save(points, np.random.default_rng(1).normal(size=(400, 2)))
    out = tmp_path / "out.zarr"
    prepared = prepare(RunOptions(points=str(points), out=str(out), workers=1, rows_per_task=200))
    assert prepared.job.sources_fingerprint == prepared.identity["points"]["fingerprint"]
    plan = prepared.plan
    job = run_steps.start(prepared)
    data = np.load(points)
    data[300:] += 1.0  # rows of task 1 only: task 0's own rows are unchanged
    np.save(points, data)
    _SOURCES.clear()
    with pytest.raises(InputsChanged, match="changed"):
        DENSE.run_task(job, plan.tasks[0])
    assert not run_steps.method(prepared).done_tasks(OutputGroup(str(out)), job.fingerprint, plan).any()


def test_a_taker_never_deletes_a_lease_taken_over_meanwhile(tmp_path):
    """Two runs see the same stale lease; A takes it over first; B, acting on what it read before, must
    give A's live lease back, not delete it."""
    from pipeline import lease

    out = tmp_path / "out.zarr"
    out.mkdir()
    stale = {"token": "stale", "pid": 1, "host": "gone-host", "started": 0.0, "heartbeat": 0.0}
    (out / ".kgrad-lease.json").write_text(json.dumps(stale))
    a = lease.acquire(str(out))
    assert not lease._move_aside(str(out / ".kgrad-lease.json"), stale, "b-token")
    assert lease.read(str(out))["token"] == a.token
    with pytest.raises(Exception, match="another kgrad run"):
        lease.acquire(str(out))
    a.release()


def test_leftover_lease_files_do_not_lock_an_output(small_points, small_outputs, tmp_path):
    from pipeline.output import OutputGroup

    out = small_outputs.copy(small_points, tmp_path / "out.zarr")  # a complete `kgrad run` output
    (out / ".kgrad-lease.json.1234abcd.tmp").write_text("{}")  # a taker killed between write and link
    assert OutputGroup(str(out)).kind() == "kgrad"
    again = kgrad(["run", "--points", small_points, "--out", out, "--workers", "1", "--no-progress", "--overwrite"])
    assert again.returncode == 0, again.stderr
    assert not list(out.glob(".kgrad-lease.json*"))


@pytest.mark.parametrize("args, words", [
    (["--out", "{d}/nd/sub/o.zarr", "--scheduler", "{d}/nofile.json"], ("scheduler file", "does not exist")),
    (["--out", "{d}/o.zarr", "--threads-per-worker", "0"], ("threads_per_worker=0",)),
    (["--out", "memory://o.zarr"], ("memory://", "other processes")),
])
def test_refused_runs_write_nothing(small_points, tmp_path, args, words):
    args = [a.replace("{d}", str(tmp_path)) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = kgrad(["run", "--points", small_points, "--workers", "1", "--no-progress", *args])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert all(w in lines[0] for w in words) and lines[0].count("does not exist") <= 1, lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused run left files behind"
