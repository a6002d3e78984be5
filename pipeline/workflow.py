"""Workflows: a run's configuration (TOML file and/or flags), its validation and plan, and the run itself.

The data go one way: inputs -> validate -> plan -> tile tasks on dask workers -> output group.  Every
check in :func:`prepare` happens before anything is written; :func:`run_workflow` then writes.

Workflow file schema (TOML; every key optional except ``inputs.points``; command-line flags override the
file).  Relative paths in the file (inputs, out, performance_report, cache_dir, the security files and a
scheduler file) are relative to the directory that holds the file, so it works from any current directory;
paths given as flags (``--points``, ``--out`` ...) are relative to the current directory::

    [inputs]
    points = "data/points.zarr"      # zarr array, zarr group with 'points' (+ 'weights'), or .npy; or URL
    sources = "data/sources.zarr"    # default: the points
    weights = "data/weights.npy"     # default: the group's 'weights' array if any, else ones
    storage_options = {}             # fsspec options for URLs (s3://...), e.g. {anon = false}

    [kernel]
    name = "rbf"                     # or a user kernel "module:function"
    lengthscale = 1.0                # or one per dimension: [0.5, 1.0, 2.0]
    variance = 1.0
    [kernel.params]                  # the kernel's own parameters
    alpha = 1.0

    [run]
    out = "out/result.zarr"
    dtype = "float32"                # float32 | float64
    mode = "auto"                    # auto | jacfwd | jacrev
    scheduler = "local"              # local | tcp://host:port | tls://... | scheduler.json
    workers = 2                      # local cluster only; default: the cores available
    threads_per_worker = 1           # local cluster only
    pin_cores = true                 # local cluster only; default: pin when workers <= cores
    memory_limit = "auto"            # per local worker, e.g. "4GiB"
    tile_rows = 512                  # optional tile overrides
    tile_cols = 1024
    rows_per_task = 8192
    progress = true                  # tasks done / total, rate, time left on stderr
    performance_report = "report.html"   # optional: dask's HTML performance report (needs bokeh)
    cache_dir = "~/.cache/kgrad/jax"     # JAX compilation cache (must be private to the user)
    security = {tls_ca_file = "ca.pem", tls_client_cert = "client.pem", tls_client_key = "client-key.pem"}
    scheduler_timeout = 60           # fail (exit 1) when the scheduler has not answered for this long
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import __version__ as VERSION  # noqa: N812
from . import store
from .errors import RESTART_STEP, RESUME_STEP, InputError
from .gradients import DTYPES, MODES, TileShape, formulation, source_center
from .inputs import check_range, check_same_dim
from .kernels import make_spec
from .plan import Plan, make_plan, memory_fraction, usable_cores

if TYPE_CHECKING:
    from .worker import Job

_NUMBER = "a number"
_TEXT = "a string"
_WHOLE = "a whole number"
_TABLE = "a table"
_SECTIONS = {
    "inputs": {"points": _TEXT, "sources": _TEXT, "weights": _TEXT, "storage_options": _TABLE},
    "kernel": {"name": _TEXT, "lengthscale": "a number or a list of numbers", "variance": _NUMBER,
               "params": _TABLE},
    "run": {"out": _TEXT, "dtype": _TEXT, "mode": _TEXT, "scheduler": _TEXT, "workers": _WHOLE,
            "threads_per_worker": _WHOLE, "pin_cores": "true or false",
            "memory_limit": "a size such as '4GiB'", "tile_rows": _WHOLE, "tile_cols": _WHOLE,
            "rows_per_task": _WHOLE, "progress": "true or false", "cache_dir": _TEXT, "security": _TABLE,
            "performance_report": _TEXT, "scheduler_timeout": _NUMBER},
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(kind: str, value) -> bool:
    if kind == _TEXT:
        return isinstance(value, str)
    if kind == _NUMBER:
        return _is_number(value)
    if kind == _WHOLE:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _TABLE:
        return isinstance(value, dict)
    if kind.startswith("a number or a list"):
        return _is_number(value) or (isinstance(value, list) and all(_is_number(v) for v in value))
    if kind.startswith("a size"):
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    if kind == "true or false":
        return isinstance(value, bool)
    return True


@dataclass
class RunConfig:
    """One run's settings, from a workflow file, flags, or Python."""

    points: str | None = None
    sources: str | None = None
    weights: str | None = None
    storage_options: dict = field(default_factory=dict)
    kernel: str = "rbf"
    lengthscale: float | list = 1.0
    variance: float = 1.0
    params: dict = field(default_factory=dict)
    out: str | None = None
    dtype: str = "float32"
    mode: str = "auto"
    scheduler: str = "local"
    workers: int | None = None
    threads_per_worker: int = 1
    pin_cores: bool | None = None  # None: pin when a local cluster has no more workers than cores
    memory_limit: str | int = "auto"
    tile_rows: int | None = None
    tile_cols: int | None = None
    rows_per_task: int | None = None
    progress: bool = True
    performance_report: str | None = None  # write dask's HTML performance report here
    cache_dir: str | None = None
    security: dict = field(default_factory=dict)  # tls_ca_file, tls_client_cert, tls_client_key
    scheduler_timeout: float = 60.0  # seconds without an answer from the scheduler before the run fails
    resume: bool = False
    overwrite: bool = False

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_workflow(path: str) -> RunConfig:
    """Read a TOML workflow file (data only: nothing in it is executed)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise InputError(f"workflow file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"workflow file {path!r} is not valid TOML: {exc}") from None
    values: dict = {}
    for section, table in doc.items():
        if section not in _SECTIONS or not isinstance(table, dict):
            raise InputError(f"workflow file {path!r}: unknown section [{section}]; "
                             f"allowed: {', '.join('[' + s + ']' for s in _SECTIONS)}")
        for key, value in table.items():
            if key not in _SECTIONS[section]:
                raise InputError(f"workflow file {path!r}: unknown key {key!r} in [{section}]; "
                                 f"allowed: {', '.join(sorted(_SECTIONS[section]))}")
            kind = _SECTIONS[section][key]
            if not _type_ok(kind, value):
                raise InputError(f"workflow file {path!r}: [{section}] {key} = {value!r} must be {kind}")
            if (section, key) == ("kernel", "params"):
                bad = [k for k, v in value.items() if not _is_number(v)]
                if bad:
                    raise InputError(f"workflow file {path!r}: [kernel.params] {bad[0]} = {value[bad[0]]!r} "
                                     f"must be a number")
            values["kernel" if (section, key) == ("kernel", "name") else key] = value
    return RunConfig(**_relative_to(values, os.path.dirname(os.path.abspath(path))))


_PATH_KEYS = ("points", "sources", "weights", "out", "performance_report", "cache_dir")


def _is_local_relative(value: str) -> bool:
    """A relative local path: not a URL (``s3://``, ``file://``), not absolute, not ``~/...``."""
    return "://" not in value and not os.path.isabs(value) and not value.startswith("~")


def _relative_to(values: dict, base: str) -> dict:
    """A workflow file's values with its relative local paths resolved against ``base``, the file's own
    directory (so the file works from any current directory): inputs, out, performance_report, cache_dir,
    the security files, and a scheduler file (a scheduler ending in .json or holding a path separator)."""
    values = dict(values)
    for key in _PATH_KEYS:
        if isinstance(values.get(key), str) and _is_local_relative(values[key]):
            values[key] = os.path.join(base, values[key])
    scheduler = values.get("scheduler")
    if (isinstance(scheduler, str) and scheduler != "local" and _is_local_relative(scheduler)
            and (scheduler.endswith(".json") or os.sep in scheduler)):
        values["scheduler"] = os.path.join(base, scheduler)
    if isinstance(values.get("security"), dict):
        values["security"] = {k: os.path.join(base, v) if isinstance(v, str) and _is_local_relative(v) else v
                              for k, v in values["security"].items()}
    return values


@dataclass(frozen=True)
class Prepared:
    """A validated run: what it reads, computes and writes.  Nothing has been written yet."""

    config: RunConfig
    job: "Job"
    plan: Plan
    attributes: dict
    action: str  # "create", "overwrite", "resume" or "complete"
    done: np.ndarray | None
    identity: dict = field(default_factory=dict)  # what the run fingerprint hashes
    task_digests: tuple = ()  # per task: blake2b of its query rows as read (workers check them)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise InputError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)}")


def _parse_memory(value) -> int | None:
    if value in (None, "auto"):
        return None
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(value))
    except (ValueError, TypeError):
        raise InputError(f"memory_limit={value!r} is not a size; use e.g. '4GiB' or 'auto'") from None


def local_worker_memory(config: RunConfig, workers: int) -> int:
    explicit = _parse_memory(config.memory_limit)
    if explicit:
        return explicit
    import psutil

    return int(psutil.virtual_memory().total / workers)


def prepare(config: RunConfig, worker_memory: int | None = None, planning: bool = False) -> Prepared:
    """Validate everything and plan the run.  Raises InputError on any bad input; writes nothing.

    ``planning``: for ``kgrad plan``; the output may be left out (its state is then not checked)."""
    from .worker import Job

    if not config.points:
        raise InputError("no points given; pass --points PATH or set [inputs] points in the workflow")
    if not config.out and not planning:
        raise InputError("no output given; pass --out PATH or set [run] out in the workflow")
    _check_choice("dtype", config.dtype, DTYPES)
    _check_choice("mode", config.mode, MODES)
    if config.resume and config.overwrite:
        raise InputError("--resume and --overwrite exclude each other; choose one")
    if not isinstance(config.scheduler_timeout, (int, float)) or isinstance(config.scheduler_timeout, bool) \
            or not config.scheduler_timeout > 0:
        raise InputError(f"scheduler_timeout={config.scheduler_timeout!r} must be a number of seconds > 0")
    if config.performance_report:
        try:
            import bokeh  # noqa: F401  (distributed renders the report with bokeh)
        except ImportError:
            raise InputError("--performance-report needs bokeh; pip install 'kgrad[dashboard]'") from None
    workers = config.workers if config.workers is not None else usable_cores()
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise InputError(f"workers={workers!r} must be a whole number >= 1")
    # Workers resolve paths in their own working directory: make local paths absolute here.
    config = config.replace(**{role: store.absolute(getattr(config, role))
                               for role in ("points", "sources", "weights", "out") if getattr(config, role)})
    if not isinstance(config.storage_options, dict):
        raise InputError(f"storage_options={config.storage_options!r} must be a table/dict of fsspec options")
    opts = tuple(sorted(config.storage_options.items()))
    for role in ("points", "sources", "weights"):
        location = getattr(config, role)
        if location and config.out and store.overlaps(config.out, location):
            raise InputError(f"--out {config.out!r} would overwrite the {role} input {location!r}; "
                             f"write the output somewhere else")

    points_ref = store.resolve_input(config.points, "points", opts)
    points, points_fp = store.load_input(points_ref, "points")
    if config.sources:
        sources_ref = store.resolve_input(config.sources, "sources", opts)
        sources, sources_fp = store.load_input(sources_ref, "sources")
        check_same_dim(points, sources)
    else:
        sources_ref, sources, sources_fp = None, points, points_fp
    weights_ref = (store.resolve_input(config.weights, "weights", opts) if config.weights
                   else store.group_weights(sources_ref or points_ref))
    weights_fp = None
    if weights_ref is not None:
        weights, weights_fp = store.load_input(weights_ref, "weights")
        if weights.shape[0] != sources.shape[0]:
            raise InputError(f"weights ({weights_ref.describe()}) has {weights.shape[0]} entries but there "
                             f"are M={sources.shape[0]} sources; give one weight per source")

    n, dim = points.shape
    m = sources.shape[0]
    spec = make_spec(config.kernel, dim, config.lengthscale, config.variance, **config.params)
    form = formulation(spec, config.mode)
    if worker_memory is None and config.scheduler == "local":
        worker_memory = local_worker_memory(config, workers)
    plan = make_plan(n, m, dim, dtype=config.dtype, formulation=form, workers=workers,
                     worker_memory_bytes=worker_memory, rows=config.tile_rows, cols=config.tile_cols,
                     rows_per_task=config.rows_per_task, cores=usable_cores(),
                     threads_per_worker=config.threads_per_worker, distances=spec.kernel.distances,
                     usable_fraction=memory_fraction())
    identity = {
        "points": {"location": points_ref.location, "array": points_ref.array, "fingerprint": points_fp,
                   "shape": list(points.shape)},
        "sources": None if sources_ref is None else {"location": sources_ref.location,
                                                      "array": sources_ref.array,
                                                      "fingerprint": sources_fp, "shape": [m, dim]},
        "weights": None if weights_ref is None else {"location": weights_ref.location,
                                                      "array": weights_ref.array, "fingerprint": weights_fp},
        "kernel": spec.name, "lengthscale": list(spec.lengthscale), "variance": spec.variance,
        "kernel_params": dict(spec.params), "dtype": config.dtype, "mode": config.mode,
        "tile_rows": plan.rows, "tile_cols": plan.cols, "tiles_per_call": plan.tiles_per_call,
        "rows_per_task": plan.rows_per_task, "kgrad_version": VERSION,
    }
    fingerprint = hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(),
                                  digest_size=16).hexdigest()
    attributes = {
        **{k: v for k, v in identity.items() if k not in ("points", "sources", "weights")},
        "inputs": {k: identity[k] for k in ("points", "sources", "weights")},
        "formulation": form, "kernel_description": spec.describe(),
        "N": n, "M": m, "D": dim, "run_fingerprint": fingerprint, "kgrad_version": VERSION,
        "plan": plan.summary(),
    }
    output_action = _planned_action if planning else _output_action
    action, done = output_action(config, fingerprint, identity, opts, plan) if config.out else ("none", None)
    center = source_center(sources, spec)
    check_range(sources, "sources", center, spec.lengthscale, config.dtype)
    check_range(points, "points", center, spec.lengthscale, config.dtype)
    job = Job(points=points_ref, sources=sources_ref, weights=weights_ref, spec=spec, mode=config.mode,
              dtype=config.dtype, shape=TileShape(plan.rows, plan.cols, plan.tiles_per_call),
              center=tuple(float(c) for c in center), out=config.out, out_options=opts,
              fingerprint=fingerprint, sources_fingerprint=sources_fp, weights_fingerprint=weights_fp,
              pin_cores=(config.scheduler == "local" and workers <= usable_cores()
                         and config.threads_per_worker == 1) if config.pin_cores is None else config.pin_cores,
              cache_dir=config.cache_dir)
    digests = tuple(store.rows_digest(points[t.start:t.stop]) for t in plan.tasks)
    return Prepared(config, job, plan, attributes, action, done, identity, digests)


def _output_action(config: RunConfig, fingerprint: str, identity: dict, opts: tuple, plan: Plan):
    """What a run does with its output location: create it, overwrite or resume a kgrad output, or
    nothing (complete).  Raises InputError for anything kgrad must not touch."""
    if store.output_kind(config.out, opts) in ("absent", "empty"):
        return "create", None
    if config.overwrite:
        return "overwrite", None
    if not config.resume:
        raise InputError(f"output {config.out!r} already exists; pass --overwrite to start over or "
                         f"--resume to finish an interrupted run of the same inputs and parameters")
    if store.half_created(config.out, opts):
        return "overwrite", None  # killed while being created: no task ever ran, so start it afresh
    group = store.open_output(config.out, opts)
    attrs = dict(group.attrs)
    if "run_fingerprint" not in attrs or "task_done" not in group.array_keys():
        raise InputError(f"cannot resume {config.out!r}: it is not a kgrad output; "
                         f"use --overwrite to replace it")
    if attrs.get("run_fingerprint") != fingerprint:
        differs = [k for k in identity if k not in ("points", "sources", "weights")
                   and attrs.get(k) != json.loads(json.dumps(identity[k]))]
        stored_inputs = attrs.get("inputs", {}) or {}
        for k in ("points", "sources", "weights"):
            old, new = stored_inputs.get(k), identity[k]
            if (old or {}).get("fingerprint") != (new or {}).get("fingerprint"):
                differs.append(f"{k} data")
            elif (old or {}).get("location") != (new or {}).get("location"):
                differs.append(f"{k} location")
        raise InputError(f"cannot resume {config.out!r}: it was made with different inputs or parameters "
                         f"({', '.join(differs) or 'unknown run'}); use --overwrite to start over")
    if attrs.get("complete"):
        return "complete", None
    return "resume", store.done_tasks(config.out, opts)


def _planned_action(config: RunConfig, fingerprint: str, identity: dict, opts: tuple, plan: Plan):
    """For ``kgrad plan``: what a run with these flags would do with the output, in words; never refuses
    (an existing output is described, with the flag a run would need)."""
    if not store.exists(config.out, opts):
        return "create", None
    if config.overwrite:
        return "exists: a run with --overwrite replaces it", None
    try:
        action, done = _output_action(dataclasses.replace(config, resume=True), fingerprint, identity, opts, plan)
    except InputError as exc:  # not a kgrad output, or another run's
        prefix = f"cannot resume {config.out!r}: "
        reason = (str(exc)[len(prefix):].split("; use --overwrite")[0] if str(exc).startswith(prefix)
                  else "it is not a kgrad output")
        return (f"exists, {reason}: a run with --resume refuses it; use --overwrite (starts over)" if config.resume
                else f"exists, {reason}: a run needs --overwrite (starts over)"), None
    if action == "complete":
        return ("exists, complete: nothing to do with --resume" if config.resume else
                "exists, complete: a run needs --overwrite (starts over) or does nothing with --resume"), None
    if action == "overwrite":  # left half-created by a killed run
        return ("exists, half-created by a run that was stopped: a run "
                + ("with --resume starts it afresh" if config.resume else "needs --resume or --overwrite "
                   "(either starts it afresh)")), None
    n_done = int(done.sum())
    left = f"{plan.n_tasks - n_done} of {plan.n_tasks} tasks left"
    return (f"exists, incomplete: a run with --resume runs the {left}" if config.resume else
            f"exists, incomplete ({left}): a run needs --resume (finishes it) or --overwrite (starts over)"), done


_SECURITY_KEYS = ("tls_ca_file", "tls_client_cert", "tls_client_key")


def _security(config: RunConfig):
    """distributed Security for ``config.security`` (CA, client certificate and key), or None.

    None leaves it to dask's configuration (``distributed.comm.tls.ca-file``, ``...tls.client.cert``,
    ``...tls.client.key``, e.g. from DASK_DISTRIBUTED__COMM__TLS__* variables).
    """
    if not config.security:
        import dask

        if config.scheduler.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file", None):
            raise InputError(f"scheduler {config.scheduler!r} uses TLS but no certificates were given; pass "
                             f"--tls-ca-file, --tls-cert and --tls-key (or [run] security in the workflow)")
        return None
    unknown = sorted(set(config.security) - set(_SECURITY_KEYS))
    missing = [k for k in _SECURITY_KEYS if not config.security.get(k)]
    if unknown or missing:
        raise InputError(f"security={config.security!r}: "
                         + (f"unknown keys {', '.join(unknown)}; " if unknown else "")
                         + (f"missing {', '.join(missing)}; " if missing else "")
                         + f"give all of {', '.join(_SECURITY_KEYS)} (--tls-ca-file, --tls-cert, --tls-key)")
    for key in _SECURITY_KEYS:
        if not os.path.isfile(config.security[key]):
            raise InputError(f"security {key}={config.security[key]!r} is not a file; "
                             f"see cluster/make-tls-certs.sh")
    from distributed.security import Security

    return Security(require_encryption=True, **config.security)


def _performance_report(path: str | None):
    """dask's performance report (an HTML page of task stream, profiles, bandwidth) around the run."""
    if not path:
        return contextlib.nullcontext()
    from distributed import performance_report

    return performance_report(filename=path)


def _worker_memory_fraction() -> float:
    """Run on a worker: the fraction of its memory limit at which it pauses (its own dask config)."""
    from pipeline.plan import memory_fraction

    return memory_fraction()


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


def run_prepared(prepared: Prepared, stream=None) -> dict:
    """Write the output for a prepared run on the configured scheduler; return the final attributes.

    The run takes the output's lease first (:mod:`pipeline.lease`; another live run there -> InputError),
    decides again under it what to do with the output, and gives the lease back on every way out."""
    from . import lease

    stream = stream or sys.stderr
    config = prepared.config
    opts = prepared.job.out_options
    if prepared.action == "complete":
        print(f"kgrad: {config.out} is already complete; nothing to do", file=stream)
        return dict(store.open_output(config.out, opts).attrs)
    held = lease.acquire(config.out, opts)
    try:
        # Under the lease: the output may have changed since prepare() looked (another run finished).
        action, done = _output_action(config, prepared.job.fingerprint, prepared.identity, opts, prepared.plan)
        if action == "complete":
            print(f"kgrad: {config.out} is already complete; nothing to do", file=stream)
            return dict(store.open_output(config.out, opts).attrs)
        held.start_heartbeat()
        owned = dataclasses.replace(prepared, job=dataclasses.replace(prepared.job, lease_token=held.token),
                                    action=action, done=done)
        return _run_owned(owned, stream)
    finally:
        held.release()


def _incomplete(config: RunConfig, cause: str, step: str = RESUME_STEP) -> str:
    """The one line for a run that stopped with its output written in part: cause, output, next step."""
    where = "" if config.scheduler == "local" or config.scheduler in cause else f" (scheduler {config.scheduler})"
    return f"{cause}{where}; {config.out} is incomplete: {step}"


def _run_owned(prepared: Prepared, stream) -> dict:
    """The run itself, with the lease held: cluster, output, tasks, checks, completion flag."""
    from .dashboard import dashboard_link
    from .errors import RunFailed
    from .cluster import connect, local_cluster, quiet_dask_logs
    from .execute import execute
    from .progress import progress_display
    from .text import count

    config, plan, job = prepared.config, prepared.plan, prepared.job
    quiet_dask_logs()
    started = time.perf_counter()
    cluster = None
    if config.scheduler == "local":
        cluster = local_cluster(plan.workers, memory_limit=config.memory_limit,
                                threads_per_worker=config.threads_per_worker)
        from distributed import Client

        client = Client(cluster)
    else:
        try:
            client = connect(config.scheduler, _security(config))
        except (OSError, TypeError, ValueError) as exc:  # TypeError: a tls:// address, no certificates
            raise InputError(f"could not reach the dask scheduler {config.scheduler!r} ({exc}); "
                             f"check the address or scheduler file, and TLS settings") from None
    cluster_seconds = time.perf_counter() - started
    output_exists = prepared.action == "resume"
    try:
        check_cluster_memory(client, plan)
        if prepared.action == "overwrite":
            output_exists = True
            store.remove_output(config.out, job.out_options)
        if prepared.action in ("create", "overwrite"):
            output_exists = True
            store.create_output(config.out, n_points=plan.n_points, dim=plan.dim, dtype=plan.dtype,
                                rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks,
                                attributes=prepared.attributes, storage_options=job.out_options)
        link = dashboard_link(client)
        n_workers = len(client.scheduler_info()["workers"])
        print(f"kgrad: {count(plan.n_tasks, 'task')} ({plan.n_points} x {plan.n_sources} pairs, D={plan.dim}, "
              f"{plan.dtype}, {plan.formulation}) on {count(n_workers, 'worker')}"
              + (f"; dashboard {link}" if link else ""), file=stream, flush=True)
        with _performance_report(config.performance_report):
            callbacks = [progress_display(plan.rows_per_task * plan.n_sources, stream)] if config.progress else []
            timings = execute(job, plan, client, done=prepared.done, callbacks=callbacks,
                              rows_digests=prepared.task_digests, scheduler_timeout=config.scheduler_timeout,
                              scheduler="(local)" if cluster is not None
                              else getattr(client.scheduler, "address", config.scheduler))
        _check_inputs_unchanged(prepared)
    except RunFailed as exc:
        if not output_exists:
            raise
        raise RunFailed(_incomplete(config, str(exc), exc.step), exc.step) from exc
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_incomplete(config, "interrupted", step="finish it with 'kgrad run ... --resume'")
                                if output_exists else "interrupted; nothing was written") from None
    except InputError:
        raise
    except Exception as exc:
        if not output_exists:
            raise
        raise RunFailed(_incomplete(config, f"{type(exc).__name__}: {exc}")) from exc
    finally:
        _close(client, cluster)
    total = time.perf_counter() - started
    timings.update({"cluster_start_seconds": round(cluster_seconds, 4), "total_seconds": round(total, 4),
                    "pairs_per_second": round(plan.pairs * (timings["tasks_run"] / max(plan.n_tasks, 1))
                                              / max(timings["execute_seconds"], 1e-9)),
                    "resumed": prepared.action == "resume", "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    missing = int((~store.done_tasks(config.out, job.out_options)).sum())
    if missing:
        raise RunFailed(_incomplete(config, f"{missing} of {count(plan.n_tasks, 'task')} "
                                            f"{'is' if missing == 1 else 'are'} not marked done"))
    store.finish_output(config.out, {"timings": timings}, job.out_options)
    print(f"kgrad: wrote {config.out} in {total:.2f} s ({count(timings['tasks_run'], 'task')} run, "
          f"{timings['tasks_skipped']} already done)", file=stream, flush=True)
    return {**prepared.attributes, "timings": timings}


def _close(client, cluster) -> None:
    """Close the client and a local cluster, each within a bounded time (a frozen scheduler never
    answers), whatever the state they are in."""
    try:
        client.close(timeout=5)
    except Exception:  # noqa: BLE001 - already closed, or the scheduler is gone
        pass
    if cluster is not None:
        try:
            cluster.close(timeout=10)
        except Exception:  # noqa: BLE001
            pass


def _check_inputs_unchanged(prepared: Prepared) -> None:
    """Read each input once more before the output is marked complete: a complete output is exactly the
    result for the data its fingerprints name (each task also checked the rows it read)."""
    from .errors import RunFailed

    job = prepared.job
    for role, ref, expected in (("points", job.points, prepared.identity["points"]["fingerprint"]),
                                ("sources", job.sources, job.sources_fingerprint),
                                ("weights", job.weights, job.weights_fingerprint)):
        if ref is None or expected is None:
            continue
        found = store.fingerprint(ref)
        if found != expected:
            raise RunFailed(f"the {role} at {ref.describe()} changed during the run (fingerprint "
                            f"{expected[:12]} -> {found[:12]})", RESTART_STEP)


def run_workflow(config: RunConfig | str, **overrides) -> dict:
    """Validate, plan and run a workflow (a RunConfig or a TOML path); return the output's attributes."""
    if isinstance(config, str):
        config = load_workflow(config)
    config = config.replace(**overrides)
    return run_prepared(prepare(config))
