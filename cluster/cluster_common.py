"""Shared pieces of cluster/ssh_cluster.py and cluster/slurm_cluster.py (keep this file next to them).

* ``WORKER_ENV``: the environment every kgrad worker needs before its process starts, which is
  ``pipeline.cluster.WORKER_ENVIRONMENT`` (defined there only; see its docstring: distributed's nanny would
  otherwise start workers with MALLOC_TRIM_THRESHOLD_=65536, and every multi-MB XLA temporary is mapped and
  unmapped again).
* ``tls_config(DIR)``: dask configuration for a TLS-only cluster from the files that
  cluster/make-tls-certs.sh writes (ca.pem, scheduler.*, worker.*, client.*).
* ``serve(address, kgrad_args, tls_dir, scheduler_file)``: write a scheduler file, then either run
  ``kgrad run KGRAD_ARGS --scheduler SCHEDULER_FILE`` once and return its exit code, or wait until
  Ctrl-C / SIGTERM so that other shells can use the scheduler file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

try:
    from pipeline.cluster import WORKER_ENVIRONMENT
except ImportError:  # kgrad not installed in this Python: the repository this file is in
    sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
    from pipeline.cluster import WORKER_ENVIRONMENT

WORKER_ENV = dict(WORKER_ENVIRONMENT)  # defined once, in pipeline/cluster.py
TLS_FILES = ("ca.pem", "scheduler.pem", "scheduler.key", "worker.pem", "worker.key", "client.pem", "client.key")


def split_kgrad_args(argv=None) -> tuple[list[str], list[str]]:
    """(this script's arguments, those after '--', which go to `kgrad run`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def script_parser(doc: str):
    """The argument parser the cluster scripts share: their docstring's first paragraph as description."""
    import argparse

    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="Anything after -- is passed to `kgrad run` (with --scheduler added).")


def tls_files(tls_dir: str | os.PathLike) -> dict[str, str]:
    """Absolute paths of the certificate files in ``tls_dir``; raises SystemExit if one is missing."""
    root = Path(tls_dir).expanduser().resolve()
    missing = [name for name in TLS_FILES if not (root / name).is_file()]
    if missing:
        raise SystemExit(f"{root} lacks {', '.join(missing)}; make them with cluster/make-tls-certs.sh {root}")
    return {name: str(root / name) for name in TLS_FILES}


def tls_config(tls_dir: str | os.PathLike) -> dict:
    """dask configuration (``dask.config.set``) for scheduler, workers and clients to require TLS."""
    f = tls_files(tls_dir)
    return {
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": f["ca.pem"],
        "distributed.comm.tls.scheduler.cert": f["scheduler.pem"],
        "distributed.comm.tls.scheduler.key": f["scheduler.key"],
        "distributed.comm.tls.worker.cert": f["worker.pem"],
        "distributed.comm.tls.worker.key": f["worker.key"],
        "distributed.comm.tls.client.cert": f["client.pem"],
        "distributed.comm.tls.client.key": f["client.key"],
    }


def client_tls_env(tls_dir: str | os.PathLike) -> dict[str, str]:
    """Environment variables that give a `kgrad run` (any dask client) the client certificate."""
    f = tls_files(tls_dir)
    return {
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": f["ca.pem"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": f["client.pem"],
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": f["client.key"],
    }


def write_scheduler_file(path: str | os.PathLike, address: str) -> Path:
    """A scheduler file (``{"address": ...}``) that `kgrad run --scheduler FILE` and dask clients read."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"type": "Scheduler", "address": address}) + "\n")
    os.replace(tmp, path)
    return path


def serve(address: str, kgrad_args: list[str], *, tls_dir: str | None, scheduler_file: str) -> int:
    """Run `kgrad run KGRAD_ARGS` against the cluster, or (no arguments) wait until Ctrl-C / SIGTERM."""
    path = write_scheduler_file(scheduler_file, address)
    env = dict(os.environ, **(client_tls_env(tls_dir) if tls_dir else {}))
    try:
        if kgrad_args:
            command = [sys.executable, "-m", "pipeline", "run", *kgrad_args, "--scheduler", str(path)]
            print(f"cluster: {address}; running: {' '.join(command)}", flush=True)
            return subprocess.run(command, env=env).returncode
        tls_hint = "" if not tls_dir else "".join(f" \\\n    {k}={v}" for k, v in client_tls_env(tls_dir).items())
        print(f"cluster: scheduler at {address}, scheduler file {path}\n"
              f"use it from another shell with:{tls_hint}\n"
              f"    kgrad run --points ... --out ... --scheduler {path}\n"
              f"Ctrl-C (or SIGTERM) stops the cluster.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        path.unlink(missing_ok=True)
