"""Issue 17, "five holes a hostile user found": each hole closed, checked on real processes (the ``kgrad``
CLI as a subprocess, real servers on 127.0.0.1).

* a TCP service that is not a dask scheduler (an HTTP server; a socket that accepts and says nothing):
  exit 2 in one line within ``--scheduler-timeout``, and no lease left behind (it used to hang forever,
  or 101 s, with the output's lease held);
* a user kernel edited between an interrupted run and ``--resume``: refused (the run identity hashes the
  kernel's code);
* SIGTERM / SIGHUP: like Ctrl-C (one line, lease given back, resumable), exit 128 + the signal;
* ``.kgrad-lease.json.notes`` (a user's file) is not kgrad's: kind() refuses, --overwrite keeps it;
* lengthscales that overflow the dtype: one line, no numpy warnings;
* ``kgrad inspect OUT | head``: quiet;
* ``kgrad inspect`` on an output a live run holds: names the run, does not suggest --resume.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest_plugins = ["cluster_fixtures"]  # small_points, small_outputs

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one kgrad subprocess on a shared machine


def env(**extra) -> dict:
    e = dict(os.environ)
    e.setdefault("KGRAD_CACHE_DIR", str(REPO / ".jax_cache"))
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), *extra.pop("path", []), e.get("PYTHONPATH")]))
    e.update(extra)
    return e


def kgrad(args, *, path=(), timeout=TIMEOUT) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m pipeline ARGS``; return the process and its wall time in seconds."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, env=env(path=list(path)),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - started


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "Warning" not in stderr, stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny(small_points) -> Path:
    """A small input (cluster_fixtures' session-wide 300 x 2 points, read only)."""
    return small_points


# ----------------------------------------------------------------------------------------- A: not a scheduler


@pytest.fixture
def http_server():
    """``python -m http.server`` on a free loopback port (it answers a dask handshake with an HTTP 400)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("http.server did not start")
                time.sleep(0.1)
        yield f"tcp://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def silent_server():
    """A socket on loopback that accepts every connection and never sends a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in accepted:
        conn.close()


SCHEDULER_TIMEOUT = 2.0
STARTUP_ALLOWANCE = 20.0  # interpreter, numpy, dask imports on a busy 2-core machine


@pytest.mark.parametrize("server", ["http_server", pytest.param("silent_server", marks=pytest.mark.slow)])
def test_a_service_that_is_not_a_scheduler_fails_fast(server, tiny, tmp_path, request):
    """Before: no answer for 900 s (HTTP) / exit after 101 s (silent), the lease held.  After: exit 2,
    one line naming the address, within the timeout plus start-up, nothing left in the output."""
    address = request.getfixturevalue(server)
    out = tmp_path / "out.zarr"
    proc, seconds = kgrad(["run", "--points", tiny, "--out", out, "--scheduler", address,
                           "--scheduler-timeout", SCHEDULER_TIMEOUT], timeout=120)
    print(f"[hostile] {server}: exit {proc.returncode} after {seconds:.1f} s")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    line = one_line(proc.stderr)
    assert address in line and "dask scheduler" in line, line
    assert seconds < SCHEDULER_TIMEOUT + STARTUP_ALLOWANCE, seconds
    assert not out.exists(), "the output (or its lease) was created for a scheduler that never answered"


# ----------------------------------------------------------------------------------------- B: edited kernel

KERNEL_MODULE = '''import jax.numpy as jnp


def bump(q, x, p):
    """A user kernel: s2 exp(-|q - x|^2 / (2 l^2))."""
    d = (q - x) / p["lengthscale"]
    return p["variance"] * jnp.exp(-0.5 * jnp.sum(d * d))
'''


def _interrupted_user_kernel_run(tmp_path) -> tuple[list, Path, Path]:
    """A complete run of a user kernel made incomplete again (the state a killed run leaves: some tasks
    not done, ``complete`` false); returns the run's arguments, the output and the kernel's module file."""
    import zarr

    kernels = tmp_path / "kernels"
    kernels.mkdir()
    module = kernels / "hostile_kernel.py"
    module.write_text(KERNEL_MODULE)
    points = tmp_path / "points.npy"
    np.save(points, np.random.default_rng(5).normal(size=(64, 2)))
    out = tmp_path / "out.zarr"
    args = ["run", "--points", points, "--out", out, "--kernel", "hostile_kernel:bump", "--rows-per-task", 16,
            "--workers", 1, "--no-progress"]
    proc, _ = kgrad(args, path=[str(kernels)])
    assert proc.returncode == 0, proc.stderr
    group = zarr.open_group(str(out), mode="r+")
    done = np.ones(group["task_done"].shape, np.uint8)
    done[2:] = 0
    group["task_done"][:] = done
    group.attrs["complete"] = False
    return args, out, module


@pytest.mark.slow
def test_resume_with_an_edited_user_kernel_is_refused(tmp_path):
    """Before: the edited kernel resumed the output (two kernels in one 'complete' output).  After: exit 2,
    one line naming the kernel, the output untouched; the unedited kernel still resumes."""
    from fileutil import tree_digest

    args, out, module = _interrupted_user_kernel_run(tmp_path)
    before = tree_digest(out)
    module.write_text(KERNEL_MODULE.replace("-0.5 *", "-0.25 *"))  # another kernel, same name
    proc, _ = kgrad([*args, "--resume"], path=[str(module.parent)])
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    line = one_line(proc.stderr)
    assert "cannot resume" in line and "hostile_kernel:bump" in line and "code" in line, line
    assert tree_digest(out) == before, "a refused resume touched the output"

    module.write_text(KERNEL_MODULE)  # the kernel the output was made with: resumes
    proc, _ = kgrad([*args, "--resume"], path=[str(module.parent)])
    assert proc.returncode == 0, proc.stderr
    assert "0 tasks run, 4 already done" in proc.stderr, proc.stderr  # its results were back in input order


# ----------------------------------------------------------------------------------------- C: SIGTERM, SIGHUP


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# Both slow: SIGTERM (and its --resume, a full 50000-point run on a new cluster), and SIGHUP (the same handler,
# pipeline.cli.STOP_SIGNALS, checking the same line, exit code and lease) on a new local cluster.
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_run_like_ctrl_c(signum, tmp_path):
    """Before: killed by the signal (exit -15 / -1), no kgrad line, the lease left, a resource_tracker
    warning.  After: exit 128 + signum, one kgrad line after the signal, no traceback or warning, the lease
    gone; after SIGTERM --resume finishes the output."""
    from cluster_fixtures import assert_no_leftovers, kill_group, read_streams, start_kgrad

    points = tmp_path / "points.npy"
    np.save(points, np.random.default_rng(11).normal(size=(50000, 3)).astype(np.float32))
    out = tmp_path / "out.zarr"
    args = ["run", "--points", points, "--out", out, "--rows-per-task", 1024, "--workers", 1, "--lengthscale", 0.5]
    proc = start_kgrad(args)
    try:
        _wait_for(lambda: "%)" in read_streams(proc)[1] or proc.poll() is not None, 180, "the first progress line")
        assert proc.poll() is None, f"the run ended before the signal: {read_streams(proc)[1]}"
        before = read_streams(proc)[1]
        proc.send_signal(signum)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert_no_leftovers(proc, timeout=20)
    stderr = read_streams(proc)[1]
    after = stderr[len(before):].strip().splitlines()
    after = [line for line in after if "%)" not in line]  # progress lines printed before the signal landed
    print(f"[hostile] {signum.name}: exit {returncode}; {after}")
    assert returncode == 128 + signum, (returncode, stderr)
    assert "Traceback" not in stderr and "resource_tracker" not in stderr, stderr
    assert len(after) == 1 and after[0].startswith(f"kgrad: interrupted ({signum.name})"), stderr
    assert "--resume" in after[0], after[0]
    assert not (out / ".kgrad-lease.json").exists(), "the lease was not given back"
    if signum == signal.SIGTERM:
        proc, _ = kgrad([*args, "--resume", "--no-progress"])
        assert proc.returncode == 0, proc.stderr
        assert "wrote" in proc.stderr


@pytest.mark.slow
def test_sighup_under_nohup_is_still_ignored(tmp_path):
    """A run started with SIGHUP ignored (``nohup kgrad run ...``) keeps running through a SIGHUP."""
    from cluster_fixtures import PYTHON, kgrad_env, kill_group, read_streams

    points = tmp_path / "points.npy"
    np.save(points, np.random.default_rng(12).normal(size=(20000, 3)).astype(np.float32))
    out = tmp_path / "out.zarr"
    streams = (open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+"))
    proc = subprocess.Popen(["nohup", PYTHON, "-m", "pipeline", "run", "--points", str(points), "--out", str(out),
                             "--rows-per-task", "1024", "--workers", "1"], cwd=REPO, env=kgrad_env(),
                            stdout=streams[0], stderr=streams[1], text=True, start_new_session=True)
    proc.streams = streams
    try:
        _wait_for(lambda: "%)" in read_streams(proc)[1] or proc.poll() is not None, 180, "the first progress line")
        proc.send_signal(signal.SIGHUP)
        returncode = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert returncode == 0, read_streams(proc)[1]
    assert "wrote" in read_streams(proc)[1]


# ----------------------------------------------------------------------------------------- C: lease names


def test_only_the_names_kgrad_writes_count_as_its_lease():
    """Before: ``.kgrad-lease.json.notes`` counted as kgrad's.  After: only the names kgrad writes (the lease,
    ``.<8 hex>.tmp``, ``.stale-<8 hex>``)."""
    from pipeline.output import LEASE_NAMES

    for own in (".kgrad-lease.json", ".kgrad-lease.json.0123abcd.tmp", ".kgrad-lease.json.stale-89abcdef"):
        assert LEASE_NAMES.match(own), own
    for foreign in (".kgrad-lease.json.notes", ".kgrad-lease.json.bak", ".kgrad-lease.json.0123abcd.tmp.x",
                    ".kgrad-lease.jsonx", ".kgrad-lease.json.stale-xyz"):
        assert not LEASE_NAMES.match(foreign), foreign


@pytest.mark.slow  # two refused runs on new local clusters
def test_a_users_file_named_like_the_lease_is_not_kgrads(tiny, small_outputs, tmp_path):
    """Before: ``.kgrad-lease.json.notes`` counted as kgrad's and ``--overwrite`` deleted it.  After: the
    user's file makes the output foreign: exit 2, one line naming it, the file kept byte for byte."""
    from pipeline.output import OutputGroup

    out = small_outputs.copy(tiny, tmp_path / "out.zarr")  # what `kgrad run --points TINY ...` made
    args = ["run", "--points", tiny, "--out", out, "--workers", 1, "--no-progress"]
    (out / ".kgrad-lease.json.stale-0123abcd").write_text("{}")  # kgrad's leftovers: still kgrad's output
    assert OutputGroup(str(out)).kind() == "kgrad"
    notes = out / ".kgrad-lease.json.notes"
    notes.write_text("my notes about this run\n")
    proc, _ = kgrad([*args, "--overwrite"])
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert ".kgrad-lease.json.notes" in one_line(proc.stderr)
    assert notes.read_text() == "my notes about this run\n"

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / ".kgrad-lease.json.notes").write_text("x")  # not an empty directory any more
    proc, _ = kgrad(["run", "--points", tiny, "--out", alone, "--workers", 1, "--no-progress", "--overwrite"])
    assert proc.returncode == 2 and ".kgrad-lease.json.notes" in one_line(proc.stderr), proc.stderr
    assert (alone / ".kgrad-lease.json.notes").read_text() == "x"


# ----------------------------------------------------------------------------------------- C: lengthscale range


@pytest.mark.sampled(3, cover=("dtype", "float64_helps"))
@pytest.mark.parametrize("lengthscale,dtype,float64_helps", [
    ("1e300", "float32", False), ("1e300", "float64", False), ("1e-300", "float32", False),
    ("1e-300", "float64", False), ("1e30", "float32", True), ("1e-30", "float32", True)])
def test_a_lengthscale_that_overflows_the_dtype_is_one_line(lengthscale, dtype, float64_helps, tiny, tmp_path):
    """Before: 1e300 printed numpy overflow warnings (and ran, every gradient 0); 1e-300 blamed a row and
    suggested float64, which overflows too.  After: exit 2, one line naming the lengthscale and the range
    that fits, float64 suggested only where it fits, no warning, nothing written."""
    out = tmp_path / "out.zarr"
    proc, _ = kgrad(["run", "--points", tiny, "--out", out, "--workers", 1, "--no-progress",
                     "--lengthscale", lengthscale, "--dtype", dtype])
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    line = one_line(proc.stderr)
    assert f"lengthscale={float(lengthscale):g}" in line and dtype in line and "between" in line, line
    assert ("--dtype float64" in line) is float64_helps, line
    assert not out.exists()


# ----------------------------------------------------------------------------------------- C: inspect


@pytest.fixture
def complete_output(tiny, small_outputs, tmp_path) -> Path:
    """A copy of the complete output of `kgrad run --points TINY --workers 1` (made once per session)."""
    return small_outputs.copy(tiny, tmp_path / "out.zarr")


def test_inspect_into_a_closed_pipe_is_quiet(complete_output):
    """Before: ``kgrad inspect OUT | head`` ended with 'kgrad: failed: BrokenPipeError', exit 1.  After:
    nothing on stderr, exit 141 (128 + SIGPIPE, what a shell reports for ``cat`` in the same place)."""
    command = (f"set -o pipefail; {sys.executable} -m pipeline inspect {complete_output} | head -n 0; "
               f"echo \"status ${{PIPESTATUS[0]}}\" >&2")
    proc = subprocess.run(["bash", "-c", command], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.stderr.strip() == "status 141", proc.stderr
    # the same with the reader gone before kgrad writes, without a shell
    reader = subprocess.Popen([sys.executable, "-m", "pipeline", "inspect", str(complete_output)], cwd=REPO,
                              env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reader.stdout.close()
    stderr = reader.stderr.read()
    assert reader.wait(timeout=TIMEOUT) == 141 and stderr == "", (reader.returncode, stderr)


@pytest.mark.slow  # test_data_safety.py's test_plan_names_the_run_that_holds_the_output is the default suite's
def test_inspect_names_the_run_that_is_writing_the_output(complete_output):
    """Before: an output a live run holds was reported INCOMPLETE, 'finish it with --resume' (which the
    lease would refuse).  After: BEING WRITTEN by the run (pid, host), no --resume; in --json too."""
    import json

    import zarr

    from pipeline import lease

    group = zarr.open_group(str(complete_output), mode="r+")
    group.attrs["complete"] = False  # as while a run goes on
    held = lease.acquire(str(complete_output))  # this test process is the live owner
    try:
        proc, _ = kgrad(["inspect", complete_output])
        assert proc.returncode == 0, proc.stderr
        first = proc.stdout.splitlines()[0]
        assert "BEING WRITTEN" in first and f"pid {os.getpid()}" in first, first
        assert "--resume" not in proc.stdout, proc.stdout
        proc, _ = kgrad(["inspect", complete_output, "--json"])
        assert f"pid {os.getpid()}" in json.loads(proc.stdout)["being_written_by"]
    finally:
        held.release()
    proc, _ = kgrad(["inspect", complete_output])  # the run gone: incomplete, resumable
    assert "INCOMPLETE" in proc.stdout and "--resume" in proc.stdout, proc.stdout


def test_input_range_checks_decide_from_the_bounds_as_from_every_row(monkeypatch):
    """check_range decides from each column's bounds (|(x - c) / l| is largest at a column's smallest or
    largest x): the same decision as scaling every row, on data with outliers up to the float limits.
    check_lengthscale_range takes percentiles (a second pass over the data) only where the whole extent
    does not settle it: one far outlier lets a lengthscale that fits the bulk pass, not one that does not."""
    from pipeline.inputs import check_lengthscale_range, check_range
    from pipeline.errors import InputError

    rng = np.random.default_rng(5)
    for trial in range(200):
        dtype = ("float32", "float64")[trial % 2]
        x = rng.normal(size=(int(rng.integers(1, 40)), int(rng.integers(1, 4)))) * 10.0 ** rng.uniform(-3, 3)
        if trial % 3:
            x[rng.integers(len(x)), rng.integers(x.shape[1])] = 10.0 ** rng.uniform(10, 300) * rng.choice([-1, 1])
        center = 0.5 * (x.min(axis=0) + x.max(axis=0))
        scale = 10.0 ** rng.uniform(-20, 20)
        with np.errstate(over="ignore"):
            scaled = np.abs((x - center) / scale)
        expected = scaled.max() > np.sqrt(np.finfo(dtype).max / (4 * x.shape[1]))
        try:
            check_range(x, "points", center, scale, dtype)
            raised = False
        except InputError:
            raised = True
        assert raised == expected, (trial, dtype, scale)

    bulk = rng.normal(size=(1000, 2))
    spread = bulk.copy()
    spread[7] = [1e25, 0.0]  # one outlier: the extent is 1e25, the bulk about 2.6
    def no_percentiles(*args, **kwargs):
        raise AssertionError("percentiles taken where the extent settles the check")

    with monkeypatch.context() as patch:
        patch.setattr(np, "percentile", no_percentiles)
        check_lengthscale_range(bulk, bulk, 0.3, "float32")  # fits the extent: settled without them
    check_lengthscale_range(spread, spread, 1e-15, "float32")  # the extent would overflow, the bulk does not
    with pytest.raises(InputError, match="lengthscale=1e-19"):
        check_lengthscale_range(spread, spread, 1e-19, "float32")  # the bulk overflows too
