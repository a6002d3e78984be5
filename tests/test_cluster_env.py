"""The worker environment is defined once (``pipeline.cluster.WORKER_ENVIRONMENT``) and every way of
starting workers uses it: ``local_cluster``'s nannies, cluster/cluster_common.py, the shell scripts (through
``python -m pipeline.cluster env --shell``) and the Kubernetes manifests (literal values, checked here)."""

from __future__ import annotations

import contextlib
import os
import signal
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


@contextlib.contextmanager
def _started(how: str):
    """A 1-worker kgrad local cluster, started in this thread or in the background (the way a run starts it)."""
    from pipeline.cluster import StartingCluster, local_cluster

    if how == "local_cluster":
        with local_cluster(1, memory_limit="1GiB") as cluster:
            yield cluster
        return
    starting = StartingCluster(1, memory_limit="1GiB")
    try:
        with starting.result() as cluster:
            yield cluster
    finally:
        starting.cancel()


@pytest.mark.parametrize("how", ["local_cluster", "background"])
@pytest.mark.parametrize("before", ["clean", "after_a_plain_local_cluster"])
def test_local_cluster_workers_start_with_it(before, how, monkeypatch):
    """Also after a plain LocalCluster in the same process, which leaves distributed's
    MALLOC_TRIM_THRESHOLD_=65536 in this process's environment (a nanny lets that override its config).
    Started in the background (while a run plans), the same; the workers ignore Ctrl-C either way (the
    client handles it), and this process's environment is the same afterwards."""
    from distributed import Client

    if before != "clean":
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    else:
        monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    before_env = {k: os.environ.get(k) for k in WORKER_ENVIRONMENT}
    with _started(how) as cluster, Client(cluster) as client:
        env = client.run(lambda: {k: os.environ.get(k) for k in WORKER_ENVIRONMENT})
        sigint = client.run(lambda: signal.getsignal(signal.SIGINT))
    assert env and all(e == WORKER_ENVIRONMENT for e in env.values()), env
    assert sigint and all(h == signal.SIG_IGN for h in sigint.values()), sigint
    assert {k: os.environ.get(k) for k in WORKER_ENVIRONMENT} == before_env, "this process's environment is put back"


def test_a_background_start_that_fails_raises_in_the_caller():
    from pipeline.cluster import StartingCluster

    starting = StartingCluster(1, memory_limit="not a size")
    with pytest.raises(ValueError, match="byte unit"):
        starting.result()
    starting.cancel()  # nothing to close; does not raise


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_refused_run_starts_no_cluster(tmp_path, monkeypatch, overwrite):
    """A run refused for its output (here: a folder of someone else's files, which even --overwrite does not
    touch) is refused at once: no local cluster was started for it in the background (one is only for runs
    that create or overwrite a kgrad output)."""
    import numpy as np

    import pipeline.workflow as workflow

    started = []
    monkeypatch.setattr(workflow, "StartingCluster", lambda *a, **k: started.append(a) or pytest.fail("started"))
    points = tmp_path / "p.npy"
    np.save(points, np.zeros((10, 2)))
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "something").write_text("not kgrad's")
    with pytest.raises(workflow.InputError, match="not a kgrad output"):
        workflow.run_workflow(workflow.RunOptions(points=str(points), out=str(out), kernel="rbf",
                                                  overwrite=overwrite))
    assert not started


def test_a_cluster_started_for_a_run_that_fails_to_plan_is_closed(tmp_path, monkeypatch):
    """The background cluster of a run refused after it started (non-finite points) is cancelled, not
    taken: its workers do not outlive the refusal."""
    import numpy as np

    import pipeline.workflow as workflow

    calls = []

    class Spy:
        def __init__(self, *args, **kwargs):
            calls.append("start")

        def result(self):
            calls.append("result")

        def cancel(self):
            calls.append("cancel")

    monkeypatch.setattr(workflow, "StartingCluster", Spy)
    points = tmp_path / "p.npy"
    np.save(points, np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(workflow.InputError):
        workflow.run_workflow(workflow.RunOptions(points=str(points), out=str(tmp_path / "out.zarr"), kernel="rbf"))
    assert calls == ["start", "cancel"]


def test_workers_import_jax_when_the_run_asks_before_the_first_task():
    """A run whose method computes with JAX has its workers start importing it as soon as the client is
    connected (:func:`pipeline.cluster.import_jax_on_workers`); a worker does not import it by itself (a
    far-field run's workers never do)."""
    from distributed import Client

    from pipeline.cluster import import_jax_on_workers, local_cluster
    from pipeline.methods import get

    assert get("dense").workers_use_jax and get("pruned").workers_use_jax and not get("far_field").workers_use_jax
    with local_cluster(1, memory_limit="1GiB") as cluster, Client(cluster) as client:
        before = client.run(lambda: "jax" in __import__("sys").modules)
        import_jax_on_workers(client)
        after = client.run(lambda: __import__("pipeline.lazy_jax", fromlist=["imported"]).imported() is not None)
    assert before and not any(before.values()), before
    assert after and all(after.values()), after
