"""Real processes for the reliability tests: `kgrad run` subprocesses, process-group kills, a dask CLI
cluster (cluster/start-local-cluster.sh), and readers that compare outputs bit for bit.

Test modules load this as a plugin (``pytest_plugins = ["cluster_fixtures"]``) so that the session-scoped
fixtures (job_inputs: the inputs; undisturbed: the reference run; dask_cli_cluster) are built once per session
however many modules use them.

Sizes: ``KGRAD_RELIABILITY_N`` (default 40000) points, also the sources, D = 3, float32, 2048 rows per task
(20 tasks): a run takes several seconds on 2 busy cores, long enough to kill it in mid-run.
``KGRAD_RELIABILITY_SEED`` fixes the random kill moments (printed by each test that draws one).
``KGRAD_RELIABILITY_LOG``: a file to which each fault-injection test appends one JSON line of figures.

Small outputs (``small_points``, ``small_outputs``): many tests only need *some* complete kgrad output to
overwrite, resume, inspect or break; each distinct one is made once per session by a real ``kgrad run`` and
the tests take copies (a copy of an output is an output: test_cli and test_resume copy theirs too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
PYTHON = sys.executable

N = int(os.environ.get("KGRAD_RELIABILITY_N", "40000"))
DIM = 3
ROWS_PER_TASK = 2048
N_TASKS = -(-N // ROWS_PER_TASK)
LENGTHSCALE = "0.5"
SEED = int(os.environ.get("KGRAD_RELIABILITY_SEED", str(int(time.time()) % 100000)))
RUN_TIMEOUT = 240  # seconds for one kgrad subprocess; a hang fails the test instead of the session


# ------------------------------------------------------------------------------------------ figures


def record(test: str, **figures) -> None:
    """Append one JSON line of figures (faults injected, runs survived, bytes compared) to the log."""
    line = json.dumps({"test": test, **figures}, default=str)
    print(f"[reliability] {line}")
    path = os.environ.get("KGRAD_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def rng_for(name: str) -> random.Random:
    """A random source per test, reproducible from KGRAD_RELIABILITY_SEED."""
    seed = f"{SEED}:{name}"
    print(f"[reliability] {name}: KGRAD_RELIABILITY_SEED={SEED}")
    return random.Random(seed)


# ------------------------------------------------------------------------------------------ processes


def kgrad_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("KGRAD_CACHE_DIR", str(REPO / ".jax_cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_args(points, out, *extra, workers: int | None = 2, scheduler: str | None = None) -> list[str]:
    """The arguments of `kgrad run` for the standard job (rbf, lengthscale 0.5, 2048 rows per task)."""
    args = ["run", "--points", str(points), "--out", str(out), "--rows-per-task", str(ROWS_PER_TASK),
            "--lengthscale", LENGTHSCALE, "--no-progress"]
    if scheduler is not None:
        args += ["--scheduler", str(scheduler)]
    elif workers is not None:
        args += ["--workers", str(workers)]
    return args + [str(a) for a in extra]


def kgrad(args, *, timeout: float = RUN_TIMEOUT, cwd=REPO, env=None) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` to the end (in its own session, so a timeout kills all of it)."""
    proc = start_kgrad(args, cwd=cwd, env=env)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"kgrad {' '.join(map(str, args))} did not finish in {timeout} s\n"
                             f"stderr:\n{read_streams(proc)[1][-4000:]}") from None
    assert_no_leftovers(proc)
    out, err = read_streams(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_no_leftovers(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """After `kgrad` exits, nothing it started (local cluster workers, nannies) may outlive it."""
    try:
        wait_group_gone(proc.pid, timeout)
    except AssertionError:
        left = group_members(proc.pid)
        kill_group(proc)
        raise AssertionError(f"kgrad exited ({proc.returncode}) but left processes {left} running") from None


def start_kgrad(args, *, cwd=REPO, env=None) -> subprocess.Popen:
    """Start `python -m pipeline ARGS` as the leader of a new session and process group.  Its stdout and
    stderr go to temporary files (a pipe nobody reads could block it): see :func:`read_streams`."""
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([PYTHON, "-m", "pipeline", *map(str, args)], cwd=cwd, env=env or kgrad_env(),
                            stdout=out, stderr=err, text=True, start_new_session=True)
    proc.streams = (out, err)
    return proc


def read_streams(proc: subprocess.Popen) -> tuple[str, str]:
    texts = []
    for f in proc.streams:
        f.seek(0)
        texts.append(f.read())
    return texts[0], texts[1]


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def wait_group_gone(pgid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process group {pgid} still has {group_members(pgid)} after {timeout} s")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> int:
    """Send ``sig`` to the whole process group led by ``proc``; reap it; wait until the group is empty.
    Returns how many processes the group had when the signal was sent."""
    pgid = proc.pid
    members = group_members(pgid)
    if members:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    if sig == signal.SIGKILL:
        wait_group_gone(pgid)
    return len(members)


def poll(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Call ``predicate`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Killed:
    """What a run_and_kill left behind."""

    seconds: float  # when SIGKILL went to the group, after the start
    processes_killed: int  # members of the process group at that moment (kgrad, nannies, workers)
    done: int  # tasks marked done in the output once the group was gone
    output_existed: bool
    finished_first: bool  # the run exited by itself before the kill condition held
    returncode: int | None
    stderr: str


def run_and_kill(args, out, should_kill, *, timeout: float = RUN_TIMEOUT, interval: float = 0.02,
                 progress=None) -> Killed:
    """Start `kgrad ARGS` in its own process group; poll ``should_kill(elapsed_seconds, task_done or
    None)`` (the flags from ``progress(out)``, default :func:`read_task_done`); when it holds, SIGKILL the
    whole group (`os.killpg`) and wait until every member is gone."""
    progress = progress or read_task_done
    proc = start_kgrad(args)
    started = time.monotonic()
    killed = 0
    finished_first = False
    try:
        while True:
            elapsed = time.monotonic() - started
            if proc.poll() is not None:
                finished_first = True
                break
            if should_kill(elapsed, progress(out)):
                killed = kill_group(proc)
                break
            if elapsed > timeout:
                kill_group(proc)
                raise AssertionError(f"kill condition not met in {timeout} s")
            time.sleep(interval)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    seconds = time.monotonic() - started
    if finished_first:
        assert_no_leftovers(proc)
    else:
        wait_group_gone(proc.pid)
    return Killed(seconds, killed, count_done(out), output_created(out), finished_first, proc.returncode,
                  read_streams(proc)[1])


# ------------------------------------------------------------------------------------------ outputs


def output_created(out) -> bool:
    """Whether a run got as far as creating its output (its run attributes, written last, are there): a
    directory alone may be only the run's lease."""
    try:
        return "run_fingerprint" in read_attrs(out)
    except Exception:  # noqa: BLE001 - no group yet, or half written
        return False


def read_task_done(out) -> np.ndarray | None:
    """The run's ``task_done`` flags as bools: those of its sorted copy (``OUT/order/``, where the tasks mark
    themselves done) until the output's own are all set at the end; None while neither is readable yet
    (polling races the writer: a missing or half-written file reads as 'not yet')."""
    import zarr

    try:
        own = np.asarray(zarr.open_group(str(out), mode="r")["task_done"][:]).astype(bool)
    except Exception:
        return None
    if own.all():
        return own
    try:
        return np.asarray(zarr.open_array(os.path.join(str(out), "order", "task_done"), mode="r")[:]).astype(bool)
    except Exception:
        return own


def count_done(out) -> int:
    done = read_task_done(out)
    return 0 if done is None else int(done.sum())


def read_attrs(out) -> dict:
    import zarr

    return dict(zarr.open_group(str(out), mode="r").attrs)


def read_result(out) -> tuple[np.ndarray, np.ndarray]:
    import zarr

    group = zarr.open_group(str(out), mode="r")
    return np.asarray(group["gradient"][:]), np.asarray(group["value"][:])


def chunk_files(out) -> dict[str, bytes]:
    """Bytes of every stored chunk of ``gradient`` and ``value`` (relative path -> bytes).

    zarr's local store writes a chunk to ``<key>.<uuid>.partial`` and renames it; a process killed in
    between leaves that file behind (see :func:`partial_files`).  It is not a chunk and is skipped."""
    files = {}
    for name in ("gradient", "value"):
        root = Path(out) / name / "c"
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.endswith(".partial"):
                files[str(path.relative_to(out))] = path.read_bytes()
    return files


def partial_files(out) -> list[str]:
    """Half-written temporary files a killed writer left in the output."""
    return sorted(str(p.relative_to(out)) for p in Path(out).rglob("*.partial"))


def tree_digest(path) -> dict[str, tuple[str, int]]:
    """Every file under ``path`` -> (blake2b of its bytes, mtime in ns): proves a directory untouched."""
    digest = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            digest[str(p.relative_to(path))] = (hashlib.blake2b(p.read_bytes()).hexdigest(),
                                                p.stat().st_mtime_ns)
    return digest


def assert_bit_identical(out, reference) -> int:
    """Assert that two outputs hold the same gradient and value, the same dtypes, and the same chunk
    bytes on disk; return the number of chunk bytes compared."""
    g, v = read_result(out)
    g_ref, v_ref = read_result(reference)
    assert g.dtype == g_ref.dtype and v.dtype == v_ref.dtype, (g.dtype, g_ref.dtype, v.dtype, v_ref.dtype)
    assert g.shape == g_ref.shape and v.shape == v_ref.shape
    assert np.isfinite(g).all() and np.isfinite(v).all(), "unwritten (NaN) rows in the output"
    assert np.array_equal(g, g_ref), f"gradient differs in {int((g != g_ref).any(1).sum())} rows"
    assert np.array_equal(v, v_ref), f"value differs in {int((v != v_ref).sum())} rows"
    files, ref_files = chunk_files(out), chunk_files(reference)
    assert sorted(files) == sorted(ref_files), "different chunk files"
    differ = [k for k in files if files[k] != ref_files[k]]
    assert not differ, f"chunk files with different bytes: {differ[:5]}"
    return sum(len(b) for b in files.values())


def assert_complete(out, tasks_run: int | None = None, tasks_skipped: int | None = None) -> dict:
    attrs = read_attrs(out)
    assert attrs.get("complete") is True
    done = read_task_done(out)
    assert done is not None and done.all()
    timings = attrs["timings"]
    if tasks_run is not None:
        assert timings["tasks_run"] == tasks_run, timings
    if tasks_skipped is not None:
        assert timings["tasks_skipped"] == tasks_skipped, timings
    return timings


# ------------------------------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Inputs:
    points: Path  # (N, 3) float32 .npy
    other_points: Path  # same shape and dtype, other values
    array: np.ndarray = field(repr=False)


@pytest.fixture(scope="session")
def job_inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("job_inputs")
    rng = np.random.default_rng(20240611)
    points = rng.normal(size=(N, DIM)).astype(np.float32)
    np.save(root / "points.npy", points)
    other = points.copy()
    other[N // 2, 0] += np.float32(0.25)  # one value changed: a different run
    np.save(root / "other_points.npy", other)
    return Inputs(root / "points.npy", root / "other_points.npy", points)


@dataclass(frozen=True)
class Reference:
    out: Path
    seconds: float  # wall time of the undisturbed run (process start to exit)
    timings: dict


@pytest.fixture(scope="session")
def undisturbed(job_inputs, tmp_path_factory) -> Reference:
    """An undisturbed run of the standard job on a 2-worker local cluster."""
    out = tmp_path_factory.mktemp("undisturbed") / "ref.zarr"
    started = time.monotonic()
    result = kgrad(run_args(job_inputs.points, out, workers=2))
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    timings = assert_complete(out, tasks_run=N_TASKS, tasks_skipped=0)
    return Reference(out, seconds, timings)


@dataclass
class DaskCluster:
    state_dir: Path
    scheduler_file: Path
    nworkers: int

    @property
    def scheduler_pid(self) -> int:
        return int((self.state_dir / "scheduler.pid").read_text())

    @property
    def worker_pgid(self) -> int:
        return int((self.state_dir / "worker.pid").read_text())

    def client(self, timeout: str = "20s"):
        from distributed import Client

        from pipeline.cluster import security

        return Client(scheduler_file=str(self.scheduler_file), timeout=timeout,
                      security=security(str(self.scheduler_file), {}))


def start_cluster(state_dir: Path, nworkers: int = 2, **env_extra) -> DaskCluster:
    """Run cluster/start-local-cluster.sh (``env_extra``: e.g. MEMORY_LIMIT="300MiB")."""
    env = kgrad_env(PYTHON=PYTHON, START_TIMEOUT=90, **env_extra)
    result = subprocess.run([str(CLUSTER_DIR / "start-local-cluster.sh"), str(state_dir), str(nworkers)],
                            env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"start-local-cluster.sh failed ({result.returncode}): {result.stderr}")
    return DaskCluster(state_dir, state_dir / "scheduler.json", nworkers)


def stop_cluster(cluster: DaskCluster) -> None:
    """Stop with the script; then make sure (by process group) that nothing of it is left."""
    pgids = []
    for name in ("worker.pid", "scheduler.pid"):
        with contextlib.suppress(OSError, ValueError):
            pgids.append(int((cluster.state_dir / name).read_text()))
    result = subprocess.run([str(CLUSTER_DIR / "stop-local-cluster.sh"), str(cluster.state_dir)],
                            capture_output=True, text=True, timeout=120)
    for pgid in pgids:
        if group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            wait_group_gone(pgid)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="session")
def dask_cli_cluster(tmp_path_factory):
    """A 2-worker dask cluster started with the dask CLI (scheduler + nannies), stopped at the end."""
    cluster = start_cluster(tmp_path_factory.mktemp("dask-cluster"), 2)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


@pytest.fixture(scope="session")
def small_points(tmp_path_factory) -> Path:
    """300 points in 2-D, float64 (.npy): the input of the small runs that only need an output to exist."""
    path = tmp_path_factory.mktemp("small") / "points.npy"
    np.save(path, np.random.default_rng(7).normal(size=(300, 2)))
    return path


class SmallOutputs:
    """Complete outputs of small ``kgrad run --workers 1 --no-progress`` jobs, each made once per session (by a
    real run, in a subprocess) and handed out as copies: :meth:`copy`."""

    def __init__(self, root: Path):
        self.root = root
        self._made: dict[tuple, tuple[Path, subprocess.CompletedProcess]] = {}

    def run(self, points, *extra) -> tuple[Path, subprocess.CompletedProcess]:
        """(the output, the finished `kgrad run` process: its stdout and stderr) for these arguments."""
        key = (str(points), *map(str, extra))
        if key not in self._made:
            out = self.root / f"out{len(self._made)}.zarr"
            result = kgrad(["run", "--points", points, "--out", out, "--workers", "1", "--no-progress", *extra])
            assert result.returncode == 0, result.stderr
            assert read_attrs(out)["complete"] is True
            self._made[key] = (out, result)
        return self._made[key]

    def made(self, points, *extra) -> Path:
        return self.run(points, *extra)[0]

    def copy(self, points, dest, *extra) -> Path:
        """A copy at ``dest`` of the complete output of ``kgrad run --points POINTS EXTRA``."""
        shutil.copytree(self.made(points, *extra), dest)
        return Path(dest)


@pytest.fixture(scope="session")
def small_outputs(tmp_path_factory) -> SmallOutputs:
    return SmallOutputs(tmp_path_factory.mktemp("small_outputs"))
