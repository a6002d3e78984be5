"""The worker environment is defined once (``pipeline.cluster.WORKER_ENVIRONMENT``) and every way of
starting workers uses it: ``local_cluster``'s nannies, cluster/cluster_common.py, the shell scripts (through
``python -m pipeline.cluster env --shell``) and the Kubernetes manifests (literal values, checked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster import WORKER_ENVIRONMENT, environment_lines, main

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def test_the_worker_environment():
    assert WORKER_ENVIRONMENT == {"MALLOC_TRIM_THRESHOLD_": "268435456", "MALLOC_MMAP_THRESHOLD_": "268435456",
                                  "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def test_env_command_prints_it(capsys):
    assert main(["env"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{k}={v}" for k, v in WORKER_ENVIRONMENT.items()]
    assert main(["env", "--shell"]) == 0
    assert capsys.readouterr().out.splitlines() == environment_lines(shell=True)


def test_shell_eval_of_the_env_command_sets_it():
    script = 'eval "$("$PYTHON" -m pipeline.cluster env --shell)"; env'
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENVIRONMENT}
    result = subprocess.run(["bash", "-euc", script], env={**env, "PYTHON": sys.executable}, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert {k: found.get(k) for k in WORKER_ENVIRONMENT} == WORKER_ENVIRONMENT


@pytest.mark.parametrize("script", ["start-local-cluster.sh", "gpu_workers.sh"])
def test_scripts_take_it_from_the_env_command(script):
    text = (CLUSTER / script).read_text()
    assert '"$PYTHON" -m pipeline.cluster env --shell' in text
    for key in WORKER_ENVIRONMENT:
        assert f"export {key}=" not in text, f"{script} defines {key} itself"


def test_gpu_workers_start_workers_with_it(tmp_path):
    """gpu_workers.sh (dask-cuda path) execs the dask command with the worker environment exported."""
    fake_dask = tmp_path / "dask"
    fake_dask.write_text("#!/bin/sh\nenv\n")
    fake_dask.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENVIRONMENT}
    env.update(PYTHON=sys.executable, DASK=str(fake_dask), GPUS="0", USE_DASK_CUDA="1")
    result = subprocess.run([str(CLUSTER / "gpu_workers.sh"), "tcp://127.0.0.1:1"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert {k: found.get(k) for k in WORKER_ENVIRONMENT} == WORKER_ENVIRONMENT


def test_cluster_common_uses_it():
    sys.path.insert(0, str(CLUSTER))
    try:
        import cluster_common
    finally:
        sys.path.remove(str(CLUSTER))
    assert cluster_common.WORKER_ENV == WORKER_ENVIRONMENT


def _worker_env(manifest: dict) -> list[dict]:
    """The env lists of every container named 'worker' in a dask-kubernetes manifest."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == "worker" and "env" in node:
                found.append({e["name"]: e.get("value") for e in node["env"]})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return found


@pytest.mark.parametrize("manifest", ["daskjob.yaml", "daskcluster.yaml"])
def test_kubernetes_manifests_repeat_it(manifest):
    yaml = pytest.importorskip("yaml")
    text = (CLUSTER / "k8s" / manifest).read_text()
    assert "python -m pipeline.cluster env" in text, "the manifest names where its values come from"
    envs = _worker_env(yaml.safe_load(text))
    assert envs, f"no worker container with env in {manifest}"
    for env in envs:
        assert {k: env.get(k) for k in WORKER_ENVIRONMENT} == WORKER_ENVIRONMENT


@pytest.mark.parametrize("before", ["clean", "after_a_plain_local_cluster"])
def test_local_cluster_workers_start_with_it(before, monkeypatch):
    """Also after a plain LocalCluster in the same process, which leaves distributed's
    MALLOC_TRIM_THRESHOLD_=65536 in this process's environment (a nanny lets that override its config)."""
    from distributed import Client

    from pipeline.cluster import local_cluster

    if before != "clean":
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with local_cluster(1, memory_limit="1GiB") as cluster, Client(cluster) as client:
        env = client.run(lambda: {k: os.environ.get(k) for k in WORKER_ENVIRONMENT})
    assert env and all(e == WORKER_ENVIRONMENT for e in env.values()), env
    if before != "clean":
        assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536", "this process's environment is put back"
