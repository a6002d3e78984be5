"""A real TLS-only dask cluster on loopback (dask CLI, certificates from cluster/make-tls-certs.sh).

Shows that
  * a client without the cluster's certificates is refused: plain TCP to the TLS port, a TLS client with
    no certificate of its own, and a client whose certificate another authority signed all fail within
    seconds, and the scheduler's log records the refused handshakes;
  * kgrad runs over TLS with the certificates, from Python (``RunConfig.security``), from a workflow file
    (``[run] security = {...}``) and from the dask configuration in the environment
    (``DASK_DISTRIBUTED__COMM__TLS__*``), and its output matches the in-process
    :func:`pipeline.kernel_gradients` (float64).

The scheduler and the worker are `dask scheduler` / `dask worker` subprocesses, each the leader of its own
session (``start_new_session=True``): teardown signals the whole process group (the worker's nanny and its
worker process included), SIGTERM and then SIGKILL, and checks that nothing of either group is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cluster import WORKER_ENVIRONMENT

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "cluster" / "make-tls-certs.sh"
DASK = Path(sys.executable).with_name("dask")
START_TIMEOUT = 45.0  # seconds for the scheduler file and the worker to appear
REFUSE_WITHIN = 5.0  # a refused client must fail within this many seconds

N, DIM, LENGTHSCALE = 300, 3, 0.7
TILE_ROWS, ROWS_PER_TASK = 64, 128  # 3 tasks: 128 + 128 + 44 rows (a ragged last task)

pytestmark = pytest.mark.timeout(120)

if not DASK.exists():  # pragma: no cover - a venv without console scripts
    pytest.skip(f"the dask command is not next to {sys.executable}", allow_module_level=True)


# ----------------------------------------------------------------------------------------- processes


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(WORKER_ENVIRONMENT)
    env.update(extra)
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_env(), cwd=REPO, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL whatever is left after ``timeout`` s; reap the leader."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _group_alive(pgid):
            return
    if proc.poll() is None or _group_alive(pgid):
        raise RuntimeError(f"process group {pgid} ({proc.args[:2]}) survived SIGKILL")


def _wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[:2]} exited ({proc.returncode}) while waiting for {what}:\n"
                                   + log.read_text()[-3000:])
        time.sleep(0.1)
    raise TimeoutError(f"no {what} within {timeout} s")


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tls") / "certs"
    subprocess.run(["bash", str(MAKE_CERTS), str(directory)], check=True, capture_output=True, timeout=60)
    return directory


@pytest.fixture(scope="module")
def rogue_certs(tmp_path_factory) -> Path:
    """A second, unrelated authority and its certificates (what an outsider could make)."""
    directory = tmp_path_factory.mktemp("tls-rogue") / "certs"
    subprocess.run(["bash", str(MAKE_CERTS), str(directory)], check=True, capture_output=True, timeout=60)
    return directory


def client_security(certs: Path) -> dict:
    """``RunConfig.security`` (keyword arguments of distributed.security.Security) for the client."""
    return {"tls_ca_file": str(certs / "ca.pem"), "tls_client_cert": str(certs / "client.pem"),
            "tls_client_key": str(certs / "client.key")}


@contextlib.contextmanager
def tls_cluster_processes(certs: Path, state: Path):
    """`dask scheduler --protocol tls` and one `dask worker` (1 process, 1 thread), both on 127.0.0.1."""
    scheduler_file = state / "scheduler.json"
    scheduler_log, worker_log = state / "scheduler.log", state / "worker.log"

    def tls(role):
        return ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / f"{role}.pem"),
                "--tls-key", str(certs / f"{role}.key")]

    def address():
        try:
            return json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return None

    procs = []
    try:
        scheduler = _start([str(DASK), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                            "--no-dashboard", "--dashboard-address", "127.0.0.1:0", *tls("scheduler"),
                            "--scheduler-file", str(scheduler_file)],
                           scheduler_log)
        procs.append((scheduler, scheduler_log))
        addr = _wait_for(address, START_TIMEOUT, "scheduler file", procs)
        assert addr.startswith("tls://127.0.0.1:"), addr
        worker = _start([str(DASK), "worker", addr, *tls("worker"), "--nworkers", "1", "--nthreads", "1",
                         "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                         "--death-timeout", "60",
                         "--local-directory", str(state / "worker-space")], worker_log)
        procs.append((worker, worker_log))
        _wait_for(lambda: "Registered to:" in worker_log.read_text(), START_TIMEOUT, "registered worker", procs)
        yield {"address": addr, "scheduler_file": scheduler_file, "scheduler_log": scheduler_log,
               "worker_log": worker_log, "pgids": [p.pid for p, _ in procs]}
    finally:
        errors = []
        for proc, _ in reversed(procs):  # the worker first, then the scheduler
            try:
                _stop(proc)
            except RuntimeError as exc:  # pragma: no cover
                errors.append(str(exc))
        if errors:  # pragma: no cover
            raise RuntimeError("; ".join(errors))


@pytest.fixture(scope="module")
def tls_cluster(certs, tmp_path_factory):
    with tls_cluster_processes(certs, tmp_path_factory.mktemp("tls-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A small float64 input (.npy) and the in-process answer for it."""
    from pipeline import kernel_gradients

    directory = tmp_path_factory.mktemp("tls-data")
    points = np.random.default_rng(7).normal(size=(N, DIM))
    np.save(directory / "points.npy", points)
    g, v = kernel_gradients(points, lengthscale=LENGTHSCALE, dtype="float64", return_value=True)
    return {"points": directory / "points.npy", "dir": directory, "gradient": g, "value": v}


def _check_output(out: Path, job) -> None:
    import xarray as xr

    with xr.open_zarr(out) as ds:
        assert ds.attrs["complete"] is True
        assert ds["gradient"].dims == ("point", "dim") and ds["gradient"].dtype == np.float64
        np.testing.assert_allclose(ds["gradient"].values, job["gradient"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ds["value"].values, job["value"], rtol=1e-12, atol=1e-12)


def _log_has(path: Path, text: str) -> bool:
    return text in path.read_text()


# ----------------------------------------------------------------------------------------- refused

# distributed Clients that fail to connect run in a subprocess of their own: such a Client is only closed
# by its __del__, and when the garbage collector runs that inside another Client's start-up the two
# deadlock on the loop runner's class-wide lock (seen with distributed 2026.8); a failed Client also leaves
# dask.config["scheduler"] = "dask.distributed" behind.  Neither must leak into this test process.
_ATTEMPTS = r"""
import json, sys, time
from distributed import Client
from distributed.security import Security

address, timeout, ca, rogue = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
attempts = {
    "plain tcp": dict(address=address.replace("tls://", "tcp://")),
    "tls, no certificates": dict(address=address),
    "tls, certificate from another CA": dict(address=address, security=Security(
        require_encryption=True, tls_ca_file=ca, tls_client_cert=rogue + "/client.pem",
        tls_client_key=rogue + "/client.key")),
}
results = {}
for name, kwargs in attempts.items():
    started = time.perf_counter()
    try:
        Client(kwargs.pop("address"), timeout=timeout, set_as_default=False, **kwargs)
        outcome = "connected"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    results[name] = {"outcome": outcome, "seconds": time.perf_counter() - started}
print(json.dumps(results))
"""


def test_clients_without_the_cluster_certificates_are_refused(tls_cluster, certs, rogue_certs):
    """Plain TCP, TLS without certificates, and a client certificate that another CA signed all fail fast,
    and the scheduler itself records the refused TLS handshake."""
    result = subprocess.run([sys.executable, "-c", _ATTEMPTS, tls_cluster["address"], str(REFUSE_WITHIN),
                             str(certs / "ca.pem"), str(rogue_certs)],
                            capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name, found in results.items():
        print(f"{name}: refused after {found['seconds']:.2f} s: {found['outcome'][:160]}")
        assert found["outcome"] != "connected", name
        assert found["seconds"] < REFUSE_WITHIN + 2, (name, found)
    _wait_for(lambda: _log_has(tls_cluster["scheduler_log"], "TLS handshake failed"), 5.0,
              "'TLS handshake failed' in the scheduler log")


def test_tls_client_without_a_certificate_is_refused_by_the_scheduler(tls_cluster, certs):
    """A TLS client that trusts the CA but shows no certificate: the scheduler ends the handshake.

    (distributed's own Client will not even try TLS without a certificate; a raw ssl socket shows that the
    refusal is the scheduler's doing, not merely the client library's.)
    """
    host, port = tls_cluster["address"].removeprefix("tls://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.check_hostname = False
    started = time.perf_counter()
    with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
        with socket.create_connection((host, int(port)), timeout=REFUSE_WITHIN) as raw:
            with context.wrap_socket(raw, server_hostname=host) as conn:
                conn.sendall(b"\0" * 8)  # TLS 1.3: the server's refusal arrives with the first read
                if not conn.recv(1):
                    raise ConnectionError("closed by the scheduler")
    assert time.perf_counter() - started < REFUSE_WITHIN
    print(f"refused: {refused.value!r}")


def test_kgrad_without_certificates_fails_and_writes_nothing(tls_cluster, job, tmp_path):
    out = tmp_path / "out.zarr"
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--points", str(job["points"]),
                             "--out", str(out), "--scheduler", tls_cluster["address"], "--no-progress"],
                            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=90)
    assert result.returncode != 0
    assert "ssl" in result.stderr.lower() or "tls" in result.stderr.lower(), result.stderr
    assert not out.exists()
    if _cli_has_tls_flags():  # with the TLS flags comes a one-line usage error (exit 2) instead of a traceback
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ----------------------------------------------------------------------------------------- accepted


@pytest.mark.slow  # the default suite runs kgrad over TLS with the flags (CLI)
def test_kgrad_run_over_tls_python_api(tls_cluster, certs, job, tmp_path):
    from pipeline.workflow import RunConfig, run_workflow

    out = tmp_path / "out.zarr"
    attrs = run_workflow(RunConfig(points=str(job["points"]), out=str(out), scheduler=tls_cluster["address"],
                                   security=client_security(certs), dtype="float64", lengthscale=LENGTHSCALE,
                                   tile_rows=TILE_ROWS, rows_per_task=ROWS_PER_TASK, progress=False))
    assert attrs["timings"]["tasks_run"] == 3
    _check_output(out, job)


@pytest.mark.slow  # the default suite runs kgrad over TLS with the flags (CLI)
def test_kgrad_cli_over_tls_workflow_file_and_scheduler_file(tls_cluster, certs, job, tmp_path):
    """`kgrad run WORKFLOW.toml` with ``[run] security`` and the scheduler file (no new flags needed)."""
    out = tmp_path / "out.zarr"
    security = client_security(certs)
    workflow = tmp_path / "tls.toml"
    workflow.write_text(
        "[inputs]\n"
        f"points = {json.dumps(str(job['points']))}\n"
        "[kernel]\n"
        f"lengthscale = {LENGTHSCALE}\n"
        "[run]\n"
        f"out = {json.dumps(str(out))}\n"
        'dtype = "float64"\n'
        f"tile_rows = {TILE_ROWS}\n"
        f"rows_per_task = {ROWS_PER_TASK}\n"
        f"scheduler = {json.dumps(str(tls_cluster['scheduler_file']))}\n"
        "security = {" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in security.items()) + "}\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(workflow), "--no-progress"],
                            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=90)
    assert result.returncode == 0, result.stderr
    _check_output(out, job)


@pytest.mark.slow  # the default suite runs kgrad over TLS with the flags (CLI)
def test_kgrad_cli_over_tls_dask_config_environment(tls_cluster, certs, job, tmp_path):
    """`kgrad run --scheduler tls://...` with the client certificates in dask's configuration."""
    out = tmp_path / "out.zarr"
    env = _env(DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION="True",
               DASK_DISTRIBUTED__COMM__TLS__CA_FILE=str(certs / "ca.pem"),
               DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT=str(certs / "client.pem"),
               DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY=str(certs / "client.key"))
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--points", str(job["points"]),
                             "--out", str(out), "--scheduler", tls_cluster["address"], "--dtype", "float64",
                             "--lengthscale", str(LENGTHSCALE), "--rows-per-task", str(ROWS_PER_TASK),
                             "--tile-rows", str(TILE_ROWS), "--no-progress"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=90)
    assert result.returncode == 0, result.stderr
    _check_output(out, job)


def _cli_has_tls_flags() -> bool:
    from pipeline.cli import build_parser

    try:
        build_parser().parse_args(["run", "--tls-ca-file", "a", "--tls-cert", "b", "--tls-key", "c"])
    except Exception:
        return False
    return True


def test_kgrad_cli_over_tls_flags(tls_cluster, certs, job, tmp_path):
    """`kgrad run --scheduler tls://... --tls-ca-file CA --tls-cert CERT --tls-key KEY`."""
    if not _cli_has_tls_flags():
        pytest.skip("pipeline/cli.py has no --tls-ca-file/--tls-cert/--tls-key flags yet (see cluster/README.md)")
    out = tmp_path / "out.zarr"
    result = subprocess.run([sys.executable, "-m", "pipeline", "run", "--points", str(job["points"]),
                             "--out", str(out), "--scheduler", tls_cluster["address"], "--dtype", "float64",
                             "--lengthscale", str(LENGTHSCALE), "--rows-per-task", str(ROWS_PER_TASK),
                             "--tile-rows", str(TILE_ROWS), "--no-progress",
                             "--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
                             "--tls-key", str(certs / "client.key")],
                            capture_output=True, text=True, env=_env(), cwd=REPO, timeout=90)
    assert result.returncode == 0, result.stderr
    _check_output(out, job)

