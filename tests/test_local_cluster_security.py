"""Another account on the host cannot use kgrad's clusters: loopback is not authentication.

A dask client that reaches a scheduler runs code as its owner (``client.run``), and any local account can
reach a loopback port.  So kgrad's own local cluster (``--scheduler local``, the default) and the one
``cluster/start-local-cluster.sh`` starts speak TLS only, with mutual authentication on credentials made
for that cluster alone.  Here, during a real ``kgrad run`` and against the script's cluster, a stranger
(this test process, without the credentials) tries every listening port of the run's processes:

* a plain TCP dask client (what the attack used),
* a TLS client with no certificate of its own,
* a TLS client whose certificate another authority signed (``Security.temporary()`` of its own);

none of them gets to run a function.  The run finishes undisturbed.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import psutil
import pytest

from cluster_fixtures import N_TASKS, assert_complete, kill_group, poll, read_streams, run_args, start_kgrad, \
    wait_group_gone

pytest_plugins = ["cluster_fixtures"]
pytestmark = pytest.mark.timeout(240)

ATTEMPT_SECONDS = 20.0  # how long the stranger gives its attempts, made at once (a client let in runs its function at once)


def _listening_ports(pids) -> list[int]:
    ports = set()
    for pid in pids:
        try:
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    ports.add(c.laddr.port)
        except psutil.Error:
            continue
    return sorted(ports)


_STRANGER = """
import json, os, sys, threading, time
from distributed import Client
from distributed.security import Security

got_in = []


def attempt(name, address, security):
    try:
        with Client(address, security=security, timeout=3) as client:
            client.run(os.getuid)
        got_in.append(f"{name} at {address}")
    except Exception:  # refused (OSError, TimeoutError, SSL errors): what we want
        pass


def http_server(host):
    # The dashboard's plain HTTP port answers a GET: no dask comm is there to attack (a dask client would wait).
    import socket
    name, port = host.rsplit(":", 1)
    try:
        with socket.create_connection((name, int(port)), timeout=2) as sock:
            sock.settimeout(2)
            sock.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            return sock.recv(5) == b"HTTP/"
    except OSError:
        return False


threads = []
for host in sys.argv[1:]:
    if http_server(host):
        continue
    ways = {"plain tcp": (f"tcp://{host}", None),
            "tls, no certificate": (f"tls://{host}", Security(require_encryption=True)),
            "tls, another authority": (f"tls://{host}", Security.temporary())}
    for name, (address, security) in ways.items():
        # A port that is not a dask comm (the dashboard's HTTP) can leave a client waiting: it never gets in.
        threads.append(threading.Thread(target=attempt, args=(name, address, security), daemon=True))
for thread in threads:  # all at once: a refusal that waits for its timeout does not hold up the others
    thread.start()
deadline = time.monotonic() + %(wait)s
for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
print(json.dumps({"got_in": got_in}))
os._exit(0)  # failed or waiting Clients left behind must not hold up the exit
""" % {"wait": ATTEMPT_SECONDS}


def _stranger_attempts(*addresses_or_ports) -> list[str]:
    """Another process, without the credentials, tries every way in at each address (or loopback port);
    returns what got in (empty: all refused)."""
    import json
    import subprocess
    import sys

    hosts = [f"127.0.0.1:{a}" if isinstance(a, int) else a.split("://", 1)[1] for a in addresses_or_ports]
    proc = subprocess.run([sys.executable, "-c", _STRANGER, *hosts], capture_output=True, text=True,
                          timeout=60 + 3 * ATTEMPT_SECONDS * len(hosts))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["got_in"]


def test_kgrad_local_cluster_refuses_a_client_without_its_credentials(job_inputs, tmp_path):
    """During a real `kgrad run` on its own local cluster, every port its processes listen on refuses a
    client without the cluster's credentials; the run is undisturbed."""
    out = tmp_path / "out.zarr"
    proc = start_kgrad(run_args(job_inputs.points, out, workers=2))
    try:
        def ready():
            pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            ports = _listening_ports(pids)
            return ports if len(ports) >= 4 and os.path.exists(out / "zarr.json") else None

        ports = poll(ready, 120, interval=0.1, what="the run's cluster to listen")
        got_in = _stranger_attempts(*ports)
        assert got_in == [], f"a stranger got in: {got_in}"
        assert proc.wait(timeout=200) == 0, read_streams(proc)[1]
    finally:
        if proc.poll() is None:
            kill_group(proc)
        wait_group_gone(proc.pid)
    assert_complete(out, tasks_run=N_TASKS, tasks_skipped=0)


def test_start_local_cluster_script_admits_only_its_credentials(dask_cli_cluster):
    """cluster/start-local-cluster.sh (the session's cluster of it): a TLS scheduler; its credentials readable
    by their owner only; refused without them, admitted with them (what kgrad finds beside the scheduler
    file)."""
    from distributed import Client

    from pipeline.cluster import credentials_beside, security

    import json

    cluster = dask_cli_cluster
    address = json.loads(cluster.scheduler_file.read_text())["address"]
    assert address.startswith("tls://127.0.0.1:"), address
    tls = cluster.state_dir / "tls"
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    for path in tls.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert _stranger_attempts(address) == []
    found = credentials_beside(str(cluster.scheduler_file))
    assert found["tls_client_key"] == str(tls / "client.key")
    with Client(scheduler_file=str(cluster.scheduler_file), timeout=20,
                security=security(str(cluster.scheduler_file), {})) as client:
        assert client.run(lambda: 1)


def test_security_object_from_python(tmp_path):
    """From Python, a local_cluster's own credentials (``cluster.security``) run kgrad on it."""
    from pipeline.cluster import local_cluster
    from pipeline.workflow import RunOptions, run_workflow

    points = np.random.default_rng(3).normal(size=(500, 2))
    np.save(tmp_path / "p.npy", points)
    cluster = local_cluster(1)
    try:
        assert cluster.scheduler_address.startswith("tls://")
        attrs = run_workflow(RunOptions(points=str(tmp_path / "p.npy"), out=str(tmp_path / "o.zarr"),
                                        scheduler=cluster.scheduler_address, security=cluster.security,
                                        progress=False), )
        assert attrs["N"] == 500
        with pytest.raises(Exception, match="TLS"):
            run_workflow(RunOptions(points=str(tmp_path / "p.npy"), out=str(tmp_path / "o2.zarr"),
                                    scheduler=cluster.scheduler_address, progress=False))
    finally:
        cluster.close()
