"""The cluster side of a run: the worker environment, kgrad's local cluster, and connecting to a scheduler.

:data:`WORKER_ENVIRONMENT` is the one definition of the environment every kgrad worker process needs
before it starts.  :func:`local_cluster` passes it to its nannies; the cluster scripts take it from here
(``python -m pipeline.cluster env --shell`` prints ``export K=V`` lines for ``eval``; cluster/k8s/*.yaml
repeat the values, checked by tests/test_cluster_env.py).

Why: distributed's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
threshold at 128 KiB, so every multi-MB XLA temporary is mapped and unmapped again (page faults on every
tile; tiles ran 4-5x slower).  Both thresholds at 256 MiB keep those temporaries in the heap.  One
OpenMP/OpenBLAS thread per worker: dask runs one task per thread and XLA has its own pool.

``local_cluster`` binds everything to loopback; ``connect`` reaches an existing scheduler (an address or
a scheduler file) with the TLS ``security`` given; ``check_cluster_memory`` holds a plan against the
workers' memory; ``close`` ends a client and a cluster within bounded time.  Dask's own log lines stay
off stderr unless KGRAD_DEBUG is set.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    from .plan import Plan

MALLOC_THRESHOLD = 256 * 2**20  # 268435456 bytes: XLA's multi-MB temporaries stay in the heap
WORKER_ENVIRONMENT: dict[str, str] = {
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC_THRESHOLD),
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC_THRESHOLD),
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


def environment_lines(shell: bool = False) -> list[str]:
    """:data:`WORKER_ENVIRONMENT` as ``K=V`` lines, or ``export K=V`` lines for a POSIX shell's eval."""
    if shell:
        return [f"export {key}={shlex.quote(value)}" for key, value in WORKER_ENVIRONMENT.items()]
    return [f"{key}={value}" for key, value in WORKER_ENVIRONMENT.items()]


def quiet_dask_logs() -> None:
    """Keep dask's own log lines (reconnect attempts, worker errors) off stderr unless KGRAD_DEBUG is set:
    a run's outcome is kgrad's own lines."""
    import logging

    import distributed  # noqa: F401  (configures its loggers on import; set the levels after that)

    level = worker_log_level()
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in ("distributed", "tornado", "bokeh"):
            logging.getLogger(name).setLevel(level)
    logging.getLogger("distributed").setLevel(level)


def worker_log_level() -> int:
    """Level of dask's own log lines that reach stderr: none (above CRITICAL) unless KGRAD_DEBUG is set, so
    a failing run ends in kgrad's one line instead of worker tracebacks."""
    import logging

    return logging.WARNING if os.environ.get("KGRAD_DEBUG") else logging.CRITICAL + 10


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Spawn the local workers with SIGINT ignored (an ignored signal stays ignored across exec): Ctrl-C
    in a terminal reaches the whole process group, and the client, not each worker, handles it (cancels
    the run, closes the cluster) -- otherwise every worker prints its own KeyboardInterrupt traceback."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_cluster(workers: int, memory_limit: int | str = "auto", threads_per_worker: int = 1):
    """A LocalCluster on loopback only, that admits only this process's clients, with workers that keep
    XLA's large temporaries mapped.

    Loopback is not authentication: any account on the host can reach a loopback port, and a dask client
    that reaches a scheduler runs code as its owner (``client.run``).  So every connection is TLS with
    mutual authentication, on credentials made for this cluster alone (``Security.temporary()``: a fresh
    self-signed CA and key, held in this process's memory and passed to the workers by their nannies,
    never written to disk).  A client without them is refused at the handshake.  ``Client(cluster)`` takes
    them from the cluster (``cluster.security``); pass that to :class:`~pipeline.workflow.RunOptions`'s
    ``security`` to run kgrad on it from Python.  Key generation costs about 0.1 s at start-up.

    Its nannies start each worker process with :data:`WORKER_ENVIRONMENT` (their pre-spawn-environ).  A
    nanny lets this process's own environment override its pre-spawn-environ, and every nanny leaves its
    values in this process's environment (an earlier plain ``LocalCluster`` leaves distributed's
    MALLOC_TRIM_THRESHOLD_=65536 there), so the values are also put in this process's environment while the
    cluster starts.  :class:`StartingCluster` starts the same cluster in the background.
    """
    with _cluster_settings(), _workers_ignore_ctrl_c():
        return _new_local_cluster(workers, memory_limit, threads_per_worker)


class StartingCluster:
    """A :func:`local_cluster` starting in a background thread, so that its start (the scheduler, the TLS
    credentials and the worker processes: about 0.9 s on 2 cores) overlaps what the caller does meanwhile
    (reading and planning the run).  :meth:`result` waits for it and returns it; :meth:`cancel` closes it
    if the caller ends up not needing it.  One of the two must be called, in the thread that made it.

    What a start changes for the whole process (dask's config; :data:`WORKER_ENVIRONMENT` and the nannies'
    PYTHONHASHSEED in this process's environment, which each nanny writes again from its event loop) is put
    in place here, in the calling thread, before the thread starts, and put back by :meth:`result` or
    :meth:`cancel`: while the caller runs, the start only rewrites environment entries that already exist
    (no reallocation of the environment under a concurrent ``getenv``).  A signal's disposition can only be
    set from the main thread, so the workers ignore Ctrl-C themselves from their preload
    (:mod:`pipeline.worker_setup`), about half a second into their start: a Ctrl-C before that (while the
    client plans) can make a starting worker print a traceback as it dies; the client stops as it would
    anyway and closes the cluster.  If the caller stops waiting (a second Ctrl-C in :meth:`cancel`), the
    thread closes the cluster itself once it is up."""

    def __init__(self, workers: int, memory_limit: int | str = "auto", threads_per_worker: int = 1):
        import threading

        self._settings = contextlib.ExitStack()
        self._settings.enter_context(_cluster_settings())
        self._lock = threading.Lock()
        self._cluster = self._error = None
        self._cancelled = self._taken = False
        try:
            self._thread = threading.Thread(target=self._start, args=(workers, memory_limit, threads_per_worker),
                                            name="kgrad-cluster-start", daemon=True)
            self._thread.start()
        except BaseException:
            self._settings.close()
            raise

    def _start(self, workers: int, memory_limit: int | str, threads_per_worker: int) -> None:
        try:
            cluster = _new_local_cluster(workers, memory_limit, threads_per_worker)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread by result()
            self._error = exc
            return
        with self._lock:
            if not self._cancelled:
                self._cluster = cluster
                return
        close(None, cluster)  # cancelled while it started: nobody will take it

    def _wait(self) -> None:
        try:
            self._thread.join()
        finally:
            self._settings.close()

    def result(self):
        """The started cluster (waiting for it); raises what its start raised."""
        self._wait()
        if self._error is not None:
            raise self._error
        with self._lock:
            self._taken = True
            return self._cluster

    def cancel(self) -> None:
        """Close the cluster unless :meth:`result` handed it over (waiting for its start first; if that wait
        is interrupted, the starting thread closes it)."""
        with self._lock:
            self._cancelled = True
            cluster = None if self._taken else self._cluster
            self._cluster = None
        self._wait()
        if cluster is not None:
            close(None, cluster)


WORKER_PRELOAD = "pipeline.worker_setup"  # run by each local worker as it starts (distributed's preload)
NANNY_HASH_SEED = "6640"  # the PYTHONHASHSEED distributed's nannies set when none (or "0") is


@contextlib.contextmanager
def _cluster_settings():
    """dask's config for kgrad's local clusters and :data:`WORKER_ENVIRONMENT` in this process's environment.
    distributed is imported first: imported inside the block, its defaults would leave with the block."""
    import dask
    import distributed  # noqa: F401

    # Each nanny also sets PYTHONHASHSEED (its own value unless one other than "0" is set) in this
    # process's environment: set first, it is an existing entry by then.
    seed = os.environ.get("PYTHONHASHSEED")
    values = {**WORKER_ENVIRONMENT, "PYTHONHASHSEED": seed if seed not in (None, "0") else NANNY_HASH_SEED}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": dict(WORKER_ENVIRONMENT),
                          "distributed.scheduler.allowed-failures": 5,
                          "distributed.worker.daemon": False}), _environment(values):
        yield


def _new_local_cluster(workers: int, memory_limit: int | str, threads_per_worker: int):
    from distributed import LocalCluster
    from distributed.security import Security

    return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                        host="127.0.0.1", dashboard_address="127.0.0.1:0", memory_limit=memory_limit,
                        silence_logs=worker_log_level(), security=Security.temporary(), preload=[WORKER_PRELOAD])


@contextlib.contextmanager
def _environment(values: dict):
    """This process's environment holds ``values`` inside the block; the previous values are put back after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(*args, **kwargs):
    """``distributed.Client(*args, **kwargs)``, cleaning up after a Client that fails to start.

    Such a Client is closed (and ``dask.config["scheduler"]`` restored) only by its ``__del__``.  Run later,
    inside another Client's start-up, that ``__del__`` waits on distributed's class-wide LoopRunner lock (a
    deadlock seen with distributed 2026.8), and until then dask.config says "dask.distributed".  So collect
    it now, before the error goes up.
    """
    import gc

    from distributed import Client

    try:
        return Client(*args, **kwargs)
    except Exception as exc:
        error = exc
    cause = error
    while cause is not None:  # tracebacks hold the failed Client's frames
        cause.__traceback__ = None
        cause = cause.__cause__ or cause.__context__
    gc.collect()
    raise error


def connect(scheduler: str, security=None):
    """A Client for an existing scheduler: ``tcp://host:port``, ``tls://...`` or a scheduler file.

    ``security`` None: distributed's configuration decides (``distributed.comm.tls.*``, e.g. from
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``).
    """
    if os.path.isfile(scheduler):
        return _client(scheduler_file=scheduler, security=security, timeout="20s")
    if "://" not in scheduler and (os.sep in scheduler or scheduler.endswith(".json")):
        raise InputError(f"scheduler file {scheduler!r} does not exist; give 'local', a scheduler address "
                         f"(tcp://host:8786) or an existing scheduler file")
    return _client(scheduler, security=security, timeout="20s")


CONNECT_SECONDS = 20.0  # the longest a run waits for a scheduler to answer before it gives up


def scheduler_address(scheduler: str) -> str:
    """The address a ``--scheduler`` value names: itself, or the ``address`` in a scheduler file."""
    if not os.path.isfile(scheduler):
        if "://" not in scheduler and (os.sep in scheduler or scheduler.endswith(".json")):
            raise InputError(f"scheduler file {scheduler!r} does not exist; give 'local', a scheduler address "
                             f"(tcp://host:8786) or an existing scheduler file")
        return scheduler
    import json

    try:
        with open(scheduler) as f:
            address = json.load(f).get("address")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"scheduler file {scheduler!r} is not a dask scheduler file ({exc}); give the file "
                         f"'dask scheduler --scheduler-file' wrote, or a scheduler address") from None
    if not isinstance(address, str) or "://" not in address:
        raise InputError(f"scheduler file {scheduler!r} names no scheduler address (address={address!r}); give "
                         f"the file 'dask scheduler --scheduler-file' wrote, or a scheduler address")
    return address


async def _identity(address: str, connection_args: dict, timeout: float) -> dict:
    """Connect to ``address`` with distributed's own comm layer and ask it who it is (``identity``)."""
    from distributed.comm import connect

    comm = await connect(address, timeout=timeout, **connection_args)
    try:
        await comm.write({"op": "identity", "reply": True})
        return await comm.read()
    finally:
        comm.abort()


def probe_scheduler(scheduler: str, security=None, timeout: float = CONNECT_SECONDS) -> None:
    """Raise :class:`InputError` unless a dask scheduler answers at ``scheduler`` within ``timeout`` s.

    Why: ``distributed.Client`` bounds only the TCP connect; its handshake and first reply wait forever, so
    a service that is not a scheduler (an HTTP server, a socket that accepts and says nothing) kept a run
    hanging with its output's lease held.  This asks ``identity`` under one hard deadline, in a thread of
    its own (the caller may itself be inside an event loop), before the run takes its lease.
    """
    import asyncio
    import threading

    from distributed.security import Security

    address = scheduler_address(scheduler)
    try:
        args = (security or Security()).get_connection_args("client")
    except (OSError, ValueError) as exc:  # ssl.SSLError: a file that holds no certificate or key
        raise InputError(f"the TLS files for scheduler {scheduler!r} cannot be used ({exc}); give PEM files "
                         f"(see cluster/make-tls-certs.sh)") from None
    result: dict = {}

    def ask():
        try:
            result["reply"] = asyncio.run(asyncio.wait_for(_identity(address, args, timeout), timeout))
        except BaseException as exc:  # noqa: BLE001 - reported below, in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=ask, name="kgrad-probe", daemon=True)
    thread.start()
    thread.join(timeout + 5)  # the deadline is inside; this only guards against a stuck event loop
    where = f"scheduler {scheduler!r}" + ("" if address == scheduler else f" ({address})")
    error, reply = result.get("error"), result.get("reply")
    if thread.is_alive() or isinstance(error, asyncio.TimeoutError):
        raise InputError(f"{where} did not answer as a dask scheduler within {timeout:g} s (not a dask "
                         f"scheduler, or not reachable); check the address and port, or raise "
                         f"--scheduler-timeout")
    if error is not None:
        raise InputError(f"could not reach the dask {where} ({type(error).__name__}: {error}); check the "
                         f"address or scheduler file, and TLS settings")
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        kind = reply.get("type") if isinstance(reply, dict) else type(reply).__name__
        raise InputError(f"{where} is not a dask scheduler (it answered as {kind!r}); give the scheduler's "
                         f"address (dask scheduler prints it, default port 8786), not a worker's or another "
                         f"service's")


_SECURITY_KEYS = ("tls_ca_file", "tls_client_cert", "tls_client_key")
_CREDENTIAL_FILES = {"tls_ca_file": "ca.pem", "tls_client_cert": "client.pem", "tls_client_key": "client.key"}


def credentials_beside(scheduler: str) -> dict:
    """The client credentials that cluster/start-local-cluster.sh keeps beside its scheduler file
    (``tls/ca.pem``, ``tls/client.pem``, ``tls/client.key`` in the scheduler file's directory), or {}.

    Only for a scheduler file (an address names no directory), and only when all three are there: the
    user who chose the scheduler file trusts its directory, and the files are readable by their owner
    alone."""
    if "://" in scheduler or not os.path.isfile(scheduler):
        return {}
    tls = os.path.join(os.path.dirname(os.path.abspath(scheduler)), "tls")
    found = {key: os.path.join(tls, name) for key, name in _CREDENTIAL_FILES.items()}
    return found if all(os.path.isfile(path) for path in found.values()) else {}


def security(scheduler: str, files):
    """distributed Security for the TLS ``files`` (CA, client certificate and key), or None.

    None leaves it to dask's configuration (``distributed.comm.tls.ca-file``, ``...tls.client.cert``,
    ``...tls.client.key``, e.g. from DASK_DISTRIBUTED__COMM__TLS__* variables).  A ``Security`` object
    (from Python only, e.g. :func:`local_cluster`'s ``cluster.security``) is used as it is.
    """
    from distributed.security import Security

    if isinstance(files, Security):
        return files
    if not files:
        import dask

        if not dask.config.get("distributed.comm.tls.ca-file", None):
            files = credentials_beside(scheduler)
    if not files:

        if scheduler.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file", None):
            raise InputError(f"scheduler {scheduler!r} uses TLS but no certificates were given; pass "
                             f"--tls-ca-file, --tls-cert and --tls-key (or [run] security in the workflow)")
        return None
    unknown = sorted(set(files) - set(_SECURITY_KEYS))
    missing = [k for k in _SECURITY_KEYS if not files.get(k)]
    if unknown or missing:
        raise InputError(f"security={files!r}: "
                         + (f"unknown keys {', '.join(unknown)}; " if unknown else "")
                         + (f"missing {', '.join(missing)}; " if missing else "")
                         + f"give all of {', '.join(_SECURITY_KEYS)} (--tls-ca-file, --tls-cert, --tls-key)")
    for key in _SECURITY_KEYS:
        if not os.path.isfile(files[key]):
            raise InputError(f"security {key}={files[key]!r} is not a file; "
                             f"see cluster/make-tls-certs.sh")
    return Security(require_encryption=True, **files)


def performance_report(path: str | None):
    """dask's performance report (an HTML page of task stream, profiles, bandwidth) around the run."""
    if not path:
        return contextlib.nullcontext()
    from distributed import performance_report as report

    return report(filename=path)


def _worker_memory_fraction() -> float:
    """Run on a worker: the fraction of its memory limit at which it pauses (its own dask config)."""
    from pipeline.plan import memory_fraction

    return memory_fraction()


def import_jax_on_workers(client) -> None:
    """Have every worker start importing JAX in a thread (:func:`pipeline.lazy_jax.import_in_background`,
    about 0.3 s) while the client writes the output and submits the tasks, instead of in its first task.
    Only an early start: a worker that cannot (an old kgrad) imports JAX in its first task as before."""
    from .lazy_jax import import_in_background

    try:
        client.run(import_in_background)
    except Exception:  # noqa: BLE001 - the tasks import it anyway
        pass


def check_cluster_memory(client, plan: Plan) -> None:
    """Refuse, before anything is written, a plan whose tasks cannot fit the smallest worker below the
    memory fraction at which that worker's dask pauses it (each worker reports its own)."""
    from .plan import WORKER_BASELINE_BYTES, MiB, memory_fraction, worker_memory_needed
    from .text import count

    try:
        client.wait_for_workers(1, timeout=30)
    except TimeoutError:
        pass
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        raise InputError("the dask cluster has no workers; start some (see cluster/) and try again")
    try:
        fractions = client.run(_worker_memory_fraction)
    except Exception:  # noqa: BLE001 - an old worker without kgrad importable: assume our own dask config
        fractions = {}
    for address, worker in workers.items():  # a worker runs as many tasks at once as it has threads
        limit, threads = worker.get("memory_limit"), worker.get("nthreads", 1)
        fraction = fractions.get(address) or memory_fraction()
        need = worker_memory_needed(plan.task_memory_bytes, threads, fraction)
        if limit and need > limit:
            raise InputError(f"a worker with {count(threads, 'thread')} needs about {need / MiB:.0f} MiB "
                             f"({plan.task_memory_bytes / MiB:.0f} MiB per task + {WORKER_BASELINE_BYTES / MiB:.0f}"
                             f" MiB baseline, below the {fraction:.0%} at which dask pauses it) but has "
                             f"{limit / MiB:.0f} MiB; give workers more memory or fewer threads"
                             + (", or use float32" if plan.dtype == "float64" else ""))



def close(client, cluster=None) -> None:
    """Close the client (None: none) and a local cluster, each within a bounded time (a frozen scheduler
    never answers), whatever the state they are in."""
    try:
        if client is not None:
            client.close(timeout=5)
    except Exception:  # noqa: BLE001 - already closed, or the scheduler is gone
        pass
    if cluster is not None:
        try:
            cluster.close(timeout=10)
        except Exception:  # noqa: BLE001
            pass



def main(argv=None) -> int:
    """``python -m pipeline.cluster env [--shell]``: print the worker environment."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster",
                                     description="kgrad's cluster helpers.")
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="print the environment every kgrad worker needs (K=V lines)",
                              description="Print the environment every kgrad worker process needs before it "
                                          "starts, one K=V a line; with --shell as export lines, for "
                                          "eval \"$(python -m pipeline.cluster env --shell)\".")
    env.add_argument("--shell", action="store_true", help="print 'export K=V' lines for a POSIX shell")
    args = parser.parse_args(argv)
    if args.command == "env":
        print("\n".join(environment_lines(shell=args.shell)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
