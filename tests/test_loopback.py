"""Clusters that kgrad and its scripts start listen on loopback only: every listening socket of every
process they start (scheduler, nannies, workers, and their HTTP/dashboard servers) is on 127.0.0.1.

* ``cluster/start-local-cluster.sh`` (dask CLI scheduler + workers, each in its own process group);
* ``pipeline.cluster.local_cluster`` (kgrad's own LocalCluster: scheduler and nannies in this process,
  workers in child processes).
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap

import pytest

pytest.register_assert_rewrite("cluster_fixtures")
from cluster_fixtures import REPO, group_members, kgrad_env  # noqa: E402

pytest_plugins = ["cluster_fixtures"]  # dask_cli_cluster

psutil = pytest.importorskip("psutil")


def listening(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening inet socket of ``pids``."""
    found = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [(pid, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def not_loopback(sockets) -> list[tuple[int, str, int]]:
    return [s for s in sockets if not ipaddress.ip_address(s[1].split("%")[0]).is_loopback]


def test_start_local_cluster_script_listens_on_loopback_only(dask_cli_cluster):
    """The session's cluster from cluster/start-local-cluster.sh (2 workers; only looked at here)."""
    cluster = dask_cli_cluster
    pids = group_members(cluster.scheduler_pid) + group_members(cluster.worker_pgid)
    sockets = listening(pids)
    # the scheduler (comm + HTTP), and per worker process: nanny, worker, worker HTTP
    assert len({pid for pid, _, _ in sockets}) >= 3, sockets
    assert len(sockets) >= 2 + 2 * 2, sockets
    assert not_loopback(sockets) == [], f"listening beyond loopback: {not_loopback(sockets)}"


_LOCAL_CLUSTER = textwrap.dedent("""\
    import json, os, psutil
    if __name__ == "__main__":
        from pipeline.cluster import local_cluster
        cluster = local_cluster(1)
        try:
            me = psutil.Process()
            found = []
            for p in [me] + me.children(recursive=True):
                found += [[p.pid, c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
            print(json.dumps({"sockets": found, "workers": len(cluster.workers)}))
        finally:
            cluster.close()
""")


def test_kgrad_local_cluster_listens_on_loopback_only(tmp_path):
    """In a fresh process (the scheduler and nannies live in it; each worker in a child process)."""
    import json

    script = tmp_path / "local_cluster_sockets.py"
    script.write_text(_LOCAL_CLUSTER)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=kgrad_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    sockets = [tuple(s) for s in report["sockets"]]
    assert report["workers"] == 1
    # scheduler comm + dashboard, nanny, worker comm + worker HTTP
    assert len(sockets) >= 4 and len({pid for pid, _, _ in sockets}) >= 2, sockets
    assert not_loopback(sockets) == [], f"listening beyond loopback: {not_loopback(sockets)}"
