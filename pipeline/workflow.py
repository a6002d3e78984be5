"""A run from its options to its output: validation and planning (:func:`prepare`), then the run itself
(:func:`run_prepared`), on a dask cluster, zarr in and out.

The data go one way.  :func:`prepare` is a series of typed stages, each taking only what the one before
made, and nothing is written until all of them have passed:

    RunOptions -> checked options -> Inputs (resolved, read, fingerprinted) -> Problem (kernel, plan,
    centre; shared with the in-process API) -> Provenance (run identity, attributes) -> output action
    -> Job (what every task needs) = Prepared

:func:`run_prepared` then takes the output's lease, creates or resumes the output, runs the tasks
(:mod:`pipeline.execute` on a cluster from :mod:`pipeline.cluster`) and marks it complete.  The options
and the workflow file are defined in :mod:`pipeline.options`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__ as VERSION  # noqa: N812
from . import lease, store
from .cluster import (CONNECT_SECONDS, StartingCluster, check_cluster_memory, close, connect, import_jax_on_workers,
                      local_cluster, performance_report, probe_scheduler, quiet_dask_logs, security)
from .dashboard import dashboard_link
from .errors import ENDED_STEP, RESTART_STEP, RESUME_STEP, InputError, RunEnded, RunFailed
from .execute import execute, map_on_workers
from .inputs import check_same_dim
from .fenced import ID_KEY, accepted_ids, new_id
from .kernels import user_kernel_code
from .options import RunOptions, check_usage, load_workflow
from .methods import ClientRun
from .methods import get as get_method
from .output import OutputGroup
from .plan import Plan, memory_fraction, usable_cores
from .problem import Problem, make_problem
from .progress import progress_display
from .task import Job
from .text import count

RunConfig = RunOptions  # the name scripts written for earlier versions import
__all__ = ["RunOptions", "RunConfig", "load_workflow", "prepare", "run_prepared", "run_workflow"]


@dataclass(frozen=True)
class Prepared:
    """A validated run: what it reads, computes and writes.  Nothing has been written yet."""

    config: RunOptions
    job: Job
    plan: Plan
    attributes: dict
    action: str  # "create", "overwrite", "resume", "complete"; "none" (no output); "plan" (kgrad plan)
    identity: dict = field(default_factory=dict)  # what the run fingerprint hashes
    problem: Problem | None = field(default=None, repr=False)  # the method, its plan and fixed data
    inputs: "Inputs | None" = field(default=None, repr=False)  # the data as read and checked
    taken_ids: frozenset = frozenset()  # the ids an existing output's arrays carried when this run took its
    # lease: it removes or takes over only those (pipeline/fenced.py)
    output_note: str = ""  # kgrad plan: what a run with these flags would do with the output, in words


# ----------------------------------------------------------------------------------------- stage 1: options


def _parse_memory(value) -> int | None:
    if value in (None, "auto"):
        return None
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(value))
    except (ValueError, TypeError):
        raise InputError(f"memory_limit={value!r} is not a size; use e.g. '4GiB' or 'auto'") from None


def local_worker_memory(options: RunOptions, workers: int) -> int:
    """Memory per local worker: ``memory_limit``, or this machine's (cgroup-aware, as dask sees it) share."""
    explicit = _parse_memory(options.memory_limit)
    if explicit:
        return explicit
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT / workers)


def check_options(options: RunOptions, planning: bool = False) -> RunOptions:
    """Every check that needs no data, and local paths made absolute (workers resolve paths in their own
    working directories).  dtype and mode are checked again with the problem (:func:`make_problem`)."""
    check_usage(options, planning)
    timeout = options.scheduler_timeout
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise InputError(f"scheduler_timeout={timeout!r} must be a number of seconds > 0")
    if options.performance_report:
        try:
            import bokeh  # noqa: F401  (distributed renders the report with bokeh)
        except ImportError:
            raise InputError("--performance-report needs bokeh; pip install 'kgrad[dashboard]'") from None
    workers = options.workers if options.workers is not None else usable_cores()
    for name, value in (("workers", workers), ("threads_per_worker", options.threads_per_worker)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name}={value!r} must be a whole number >= 1")
    private = [role for role in ("points", "sources", "weights", "out")
               if str(getattr(options, role) or "").startswith("memory://")]
    if private:
        raise InputError(f"{private[0]}={getattr(options, private[0])!r}: a memory:// store lives inside one "
                         f"process, and kgrad's workers are other processes; use a path or an object store "
                         f"(s3://...), or kernel_gradients() in process")
    if not isinstance(options.storage_options, dict):
        raise InputError(f"storage_options={options.storage_options!r} must be a table/dict of fsspec options")
    options = options.replace(workers=workers, **{
        role: store.absolute(getattr(options, role))
        for role in ("points", "sources", "weights", "out") if getattr(options, role)})
    for role in ("points", "sources", "weights"):
        location = getattr(options, role)
        if location and options.out and store.overlaps(options.out, location):
            raise InputError(f"--out {options.out!r} would overwrite the {role} input {location!r}; "
                             f"write the output somewhere else")
    return options


# ----------------------------------------------------------------------------------------- stage 2: inputs


@dataclass(frozen=True)
class Inputs:
    """The run's inputs: where each lives, its data as stored, and its fingerprint."""

    points: store.InputRef
    sources: store.InputRef | None  # None: the points are the sources
    weights: store.InputRef | None  # None: unit weights
    point_data: np.ndarray = field(repr=False)
    source_data: np.ndarray = field(repr=False)
    fingerprints: dict = field(default_factory=dict)  # role -> blake2b of shape, dtype and bytes
    weight_data: np.ndarray | None = field(default=None, repr=False)  # None: unit weights

    def identity(self) -> dict:
        """Location, array, fingerprint (and shape) of each input, as the run identity records them."""
        def entry(ref, role, shape=None):
            if ref is None:
                return None
            item = {"location": ref.location, "array": ref.array, "fingerprint": self.fingerprints[role]}
            return item if shape is None else {**item, "shape": list(shape)}

        return {"points": entry(self.points, "points", self.point_data.shape),
                "sources": entry(self.sources, "sources", self.source_data.shape),
                "weights": entry(self.weights, "weights")}


def read_inputs(options: RunOptions, storage: tuple) -> Inputs:
    """Resolve, read, check and fingerprint the points, sources and weights."""
    points_ref = store.resolve_input(options.points, "points", storage)
    fingerprints: dict = {}
    points, fingerprints["points"] = store.load_input(points_ref, "points")
    sources_ref, sources = None, points
    if options.sources:
        sources_ref = store.resolve_input(options.sources, "sources", storage)
        sources, fingerprints["sources"] = store.load_input(sources_ref, "sources")
        check_same_dim(points, sources)
    weights_ref = (store.resolve_input(options.weights, "weights", storage) if options.weights
                   else store.group_weights(sources_ref or points_ref))
    weights = None
    if weights_ref is not None:
        weights, fingerprints["weights"] = store.load_input(weights_ref, "weights")
        if weights.shape[0] != sources.shape[0]:
            raise InputError(f"weights ({weights_ref.describe()}) has {weights.shape[0]} entries but there "
                             f"are M={sources.shape[0]} sources; give one weight per source")
    return Inputs(points_ref, sources_ref, weights_ref, points, sources, fingerprints, weights)


# ----------------------------------------------------------------------------------------- stage 3: problem


def plan_problem(options: RunOptions, inputs: Inputs, worker_memory: int | None = None) -> Problem:
    """The problem, planned for this run's workers (on a local cluster: against their memory)."""
    if worker_memory is None and options.scheduler == "local":
        worker_memory = local_worker_memory(options, options.workers)
    return make_problem(inputs.point_data, inputs.source_data, kernel=options.kernel,
                        lengthscale=options.lengthscale, variance=options.variance, params=options.params,
                        dtype=options.dtype, mode=options.mode, tolerance=options.tolerance, method=options.method,
                        weights=inputs.weight_data, sources_are_points=inputs.sources is None, workers=options.workers,
                        worker_memory_bytes=worker_memory, rows=options.tile_rows, cols=options.tile_cols,
                        rows_per_task=options.rows_per_task, cores=usable_cores(),
                        threads_per_worker=options.threads_per_worker, usable_fraction=memory_fraction())


# ----------------------------------------------------------------------------------------- stage 4: provenance


@dataclass(frozen=True)
class Provenance:
    """What identifies a run (a resume must match it) and the attributes its output records."""

    identity: dict
    fingerprint: str
    attributes: dict


def describe_run(inputs: Inputs, problem: Problem) -> Provenance:
    spec, plan = problem.spec, problem.plan
    identity = {
        **inputs.identity(),
        "kernel": spec.name, "lengthscale": list(spec.lengthscale), "variance": spec.variance,
        "kernel_params": dict(spec.params), "dtype": problem.dtype, "mode": problem.mode,
        "tile_rows": plan.rows, "tile_cols": plan.cols, "tiles_per_call": plan.tiles_per_call,
        "rows_per_task": plan.rows_per_task, "tolerance": problem.tolerance, "method": problem.method.name,
        "kgrad_version": VERSION,
    }
    code = user_kernel_code(spec, plan.dim)
    if code is not None:  # a user kernel: what it computes, not only its name (kgrad's own: the version)
        identity["kernel_code"] = code
    fingerprint = hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(),
                                  digest_size=16).hexdigest()
    attributes = {
        **{k: v for k, v in identity.items() if k not in ("points", "sources", "weights")},
        "inputs": {k: identity[k] for k in ("points", "sources", "weights")},
        "formulation": problem.formulation, "kernel_description": spec.describe(),
        "N": plan.n_points, "M": plan.n_sources, "D": plan.dim, "run_fingerprint": fingerprint,
        "kgrad_version": VERSION, "plan": plan.summary(),
        "pairs_total": plan.pairs, "method": problem.method.name, "pruned": problem.method.name == "pruned",
        "error_bound": problem.error_bounds,
        **({"exact_reason": plan.exact_reason} if plan.exact_reason else {}),
    }
    return Provenance(identity, fingerprint, attributes)


# ----------------------------------------------------------------------------------------- all stages


def prepare(config: RunOptions, worker_memory: int | None = None, planning: bool = False) -> Prepared:
    """Validate everything and plan the run.  Raises InputError on any bad input; writes nothing.

    ``planning``: for ``kgrad plan``: the output may be left out, and an existing output is described
    (with the flag a run would need) instead of refused."""
    options = check_options(config, planning)
    storage = tuple(sorted(options.storage_options.items()))
    inputs = read_inputs(options, storage)
    problem = plan_problem(options, inputs, worker_memory)
    provenance = describe_run(inputs, problem)
    action, note = "none", ""
    if options.out and planning:
        action, note = "plan", _planned_action(options, provenance.fingerprint, provenance.identity, storage, problem)
    elif options.out:
        action = _output_action(options, provenance.fingerprint, provenance.identity, storage, problem)
    pin = (options.scheduler == "local" and options.workers <= usable_cores() and options.threads_per_worker == 1)
    job = Job(points=inputs.points, sources=inputs.sources, weights=inputs.weights, spec=problem.spec,
              mode=problem.mode, dtype=problem.dtype, shape=problem.shape, center=problem.center,
              out=options.out, out_options=storage, fingerprint=provenance.fingerprint,
              sources_fingerprint=inputs.fingerprints.get("sources", inputs.fingerprints["points"]),
              weights_fingerprint=inputs.fingerprints.get("weights"),
              pin_cores=pin if options.pin_cores is None else options.pin_cores, cache_dir=options.cache_dir,
              method=problem.method.name, data=problem.method.job_data(problem.request, problem.planned))
    return Prepared(options, job, problem.plan, provenance.attributes, action, provenance.identity,
                    problem, inputs, output_note=note)


# ----------------------------------------------------------------------------------------- output action


def _output_action(config: RunOptions, fingerprint: str, identity: dict, opts: tuple, problem: Problem):
    """What a run does with its output location: create it, overwrite or resume a kgrad output, or
    nothing (complete).  Raises InputError for anything kgrad must not touch."""
    output = OutputGroup(config.out, opts)
    if output.kind() in ("absent", "empty"):
        return "create"
    if config.overwrite:
        return "overwrite"
    if not config.resume:
        raise InputError(f"output {config.out!r} already exists; pass --overwrite to start over or "
                         f"--resume to finish an interrupted run of the same inputs and parameters")
    if output.half_created():
        return "overwrite"  # killed while being created: no task ever ran, so start it afresh
    group = output.open()
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
        differs = [_kernel_code_changed(identity) if k == "kernel_code" else k for k in differs]
        raise InputError(f"cannot resume {config.out!r}: it was made with different inputs or parameters "
                         f"({', '.join(differs) or 'unknown run'}); use --overwrite to start over")
    if attrs.get("complete"):
        return "complete"
    if not attrs.get(ID_KEY):
        raise InputError(f"cannot resume {config.out!r}: an earlier kgrad made it, before outputs carried the id "
                         f"that keeps a stale run's writes out; use --overwrite to start over")
    return "resume"


def _kernel_code_changed(identity: dict) -> str:
    """The refusal's words for a user kernel whose code differs from the one that made the output."""
    return f"the code of kernel {identity['kernel']!r} changed since the output was made"


def _planned_action(config: RunOptions, fingerprint: str, identity: dict, opts: tuple, problem: Problem):
    """For ``kgrad plan``: what a run with these flags would do with the output, in words; never refuses (an existing output is described, with the flag a run would need)."""
    owner = lease.read(config.out, opts)
    if lease.is_live(owner):
        return f"being written by kgrad {lease.describe(owner)}: a run now is refused until it ends"
    try:
        kind = OutputGroup(config.out, opts).kind()
    except InputError as exc:  # a file or a foreign directory: no flag makes a run touch it
        return f"refused, whatever the flags: {exc}"
    if kind in ("absent", "empty"):
        return "create"
    if config.overwrite:
        return "exists: a run with --overwrite replaces it"
    try:
        action = _output_action(dataclasses.replace(config, resume=True), fingerprint, identity, opts, problem)
    except InputError as exc:  # not a kgrad output, or another run's
        prefix = f"cannot resume {config.out!r}: "
        reason = (str(exc)[len(prefix):].split("; use --overwrite")[0] if str(exc).startswith(prefix)
                  else "it is not a kgrad output")
        return (f"exists, {reason}: a run with --resume refuses it; use --overwrite (starts over)" if config.resume
                else f"exists, {reason}: a run needs --overwrite (starts over)")
    if action == "complete":
        return ("exists, complete: nothing to do with --resume" if config.resume else
                "exists, complete: a run needs --overwrite (starts over) or does nothing with --resume")
    if action == "overwrite":  # left half-created by a killed run
        return ("exists, half-created by a run that was stopped: a run "
                + ("with --resume starts it afresh" if config.resume else "needs --resume or --overwrite "
                   "(either starts it afresh)"))
    plan = problem.plan
    done = problem.method.done_tasks(OutputGroup(config.out, opts), fingerprint, plan.n_tasks)  # the method's marks
    n_done = int(done.sum())
    left = f"{plan.n_tasks - n_done} of {plan.n_tasks} tasks left"
    return (f"exists, incomplete: a run with --resume runs the {left}" if config.resume else
            f"exists, incomplete ({left}): a run needs --resume (finishes it) or --overwrite (starts over)")


def run_prepared(prepared: Prepared, stream=None, starting: StartingCluster | None = None) -> dict:
    """Write the output for a prepared run on the configured scheduler; return the final attributes.

    The run takes the output's lease first (:mod:`pipeline.lease`; another live run there -> InputError),
    decides again under it what to do with the output, and gives the lease back on every way out.
    ``starting``: the local cluster already starting for this run (:func:`run_workflow`), else one is started
    here; the caller cancels it if the run does not take it."""

    stream = stream or sys.stderr
    config = prepared.config
    opts = prepared.job.out_options
    if prepared.action == "complete":
        print(f"kgrad: {config.out} is already complete; nothing to do", file=stream)
        return OutputGroup(config.out, opts).attributes()
    _check_scheduler(config)
    held = lease.acquire(config.out, opts)
    try:
        # Under the lease: the output may have changed since prepare() looked (another run finished).
        action = _output_action(config, prepared.job.fingerprint, prepared.identity, opts, prepared.problem)
        if action == "complete":
            print(f"kgrad: {config.out} is already complete; nothing to do", file=stream)
            return OutputGroup(config.out, opts).attributes()
        held.start_heartbeat()
        taken = (accepted_ids(OutputGroup(config.out, opts).attributes()) if action in ("resume", "overwrite")
                 else frozenset())
        owned = dataclasses.replace(prepared, job=dataclasses.replace(prepared.job, lease_token=held.token),
                                    action=action, taken_ids=taken)
        return _run_owned(owned, stream, starting)
    finally:
        held.release()


def _check_scheduler(config: RunOptions) -> None:
    """An existing scheduler must answer as one within ``scheduler_timeout`` (at most 20 s) before the run
    takes its output's lease: a wrong address or another service fails in one line (exit 2) instead of
    hanging with the output locked."""
    if config.scheduler == "local":
        return

    quiet_dask_logs()
    probe_scheduler(config.scheduler, security(config.scheduler, config.security),
                    timeout=min(float(config.scheduler_timeout), CONNECT_SECONDS))


def _incomplete(config: RunOptions, cause: str, step: str = RESUME_STEP) -> str:
    """The one line for a run that stopped with its output written in part: cause, output, next step."""
    where = "" if config.scheduler == "local" or config.scheduler in cause else f" (scheduler {config.scheduler})"
    return f"{cause}{where}; {config.out} is incomplete: {step}"


def _lost(config: RunOptions, cause: str) -> str:
    """The one line for a run that lost its output to another run: never a call to resume what is not its own."""
    return f"{cause}; {config.out} is another run's now, not this run's to finish: {ENDED_STEP}"


def _taken_over(job: "Job") -> bool:
    """Whether this run has lost the output's lease (it was frozen or cut off past it, and another run took
    it over, and may have finished and given it back): only this run deletes its own lease, at its end."""

    record = lease.read(job.out, job.out_options)
    return record is None or record.get("token") != job.lease_token


def _run_owned(prepared: Prepared, stream, starting: StartingCluster | None = None) -> dict:
    """The run itself, with the lease held: cluster, output, tasks, checks, completion flag."""

    config, plan, job = prepared.config, prepared.plan, prepared.job
    output = OutputGroup(config.out, job.out_options)
    quiet_dask_logs()
    started = time.perf_counter()
    cluster = None
    if config.scheduler == "local":
        try:
            cluster = (starting.result() if starting is not None else
                       local_cluster(plan.workers, memory_limit=config.memory_limit,
                                     threads_per_worker=config.threads_per_worker))
        except KeyboardInterrupt:  # waiting for the cluster: this run has written nothing yet
            raise KeyboardInterrupt(_incomplete(config, "interrupted", step="finish it with 'kgrad run ... --resume'")
                                    if prepared.action == "resume" else "interrupted; nothing was written") from None
        from distributed import Client

        try:
            client = Client(cluster)
        except BaseException:
            close(None, cluster)
            raise
    else:
        try:
            client = connect(config.scheduler, security(config.scheduler, config.security))
        except InputError:
            raise
        except (OSError, TypeError, ValueError) as exc:  # TypeError: a tls:// address, no certificates
            raise InputError(f"could not reach the dask scheduler {config.scheduler!r} ({exc}); "
                             f"check the address or scheduler file, and TLS settings") from None
    cluster_seconds = time.perf_counter() - started
    output_exists = prepared.action == "resume"
    try:
        if get_method(job.method).workers_use_jax:
            import_jax_on_workers(client)
        check_cluster_memory(client, plan)
        if prepared.action == "overwrite":
            output_exists = True
            lease.check_owner(config.out, job.lease_token, job.out_options)  # not taken over while we waited
            output.remove(prepared.taken_ids)
        # Every write of the run goes only into arrays that carry its own id (pipeline/fenced.py).
        if prepared.action in ("create", "overwrite"):
            output_exists = True
            output_id = output.create(n_points=plan.n_points, dim=plan.dim, dtype=plan.dtype,
                                      rows_per_task=plan.rows_per_task, n_tasks=plan.n_tasks,
                                      attributes=prepared.attributes)
        else:  # resume: the output becomes this run's; writers of the runs before it are fenced out
            output_id = new_id()
            output.take_over(prepared.taken_ids, output_id)
        job = dataclasses.replace(job, output_id=output_id)
        prepared = dataclasses.replace(prepared, job=job)
        link = dashboard_link(client, local=cluster is not None)
        n_workers = len(client.scheduler_info()["workers"])
        print(f"kgrad: {count(plan.n_tasks, 'task')} ({plan.n_points} x {plan.n_sources} pairs, D={plan.dim}, "
              f"{plan.dtype}, {plan.formulation}) on {count(n_workers, 'worker')}"
              + (f"; dashboard {link}" if link else ""), file=stream, flush=True)
        with performance_report(config.performance_report):
            per_task = plan.pairs_to_compute / max(plan.n_tasks, 1)
            callbacks = [progress_display(per_task, stream)] if config.progress else []
            scheduler = "(local)" if cluster is not None else getattr(client.scheduler, "address", config.scheduler)
            run_tasks = functools.partial(execute, plan=plan, client=client, callbacks=callbacks,
                                          scheduler_timeout=config.scheduler_timeout, scheduler=scheduler)
            on_workers = functools.partial(map_on_workers, client, scheduler_timeout=config.scheduler_timeout,
                                           scheduler=scheduler)
            run = _client_run(prepared, output, on_workers)
            timings, pairs = prepared.problem.method.run_tasks(run, run_tasks)
        _check_inputs_unchanged(prepared)
        prepared.problem.method.finish(run, timings)
    except RunEnded as exc:  # the client's own writes found the output another run's
        raise RunFailed(_lost(config, str(exc)), ENDED_STEP) from exc
    except RunFailed as exc:
        if exc.step == ENDED_STEP or _taken_over(job):
            raise RunFailed(_lost(config, str(exc)), ENDED_STEP) from exc
        if not output_exists:
            raise
        raise RunFailed(_incomplete(config, str(exc), exc.step), exc.step) from exc
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_incomplete(config, "interrupted", step="finish it with 'kgrad run ... --resume'")
                                if output_exists else "interrupted; nothing was written") from None
    except InputError:
        raise
    except Exception as exc:
        if _taken_over(job):
            raise RunFailed(_lost(config, f"{type(exc).__name__}: {exc}"), ENDED_STEP) from exc
        if not output_exists:
            raise
        raise RunFailed(_incomplete(config, f"{type(exc).__name__}: {exc}")) from exc
    finally:
        close(client, cluster)
    total = time.perf_counter() - started
    timings.update({"cluster_start_seconds": round(cluster_seconds, 4), "total_seconds": round(total, 4),
                    "pairs_per_second": round(pairs * (timings["tasks_run"] / max(plan.n_tasks, 1))
                                              / max(timings["execute_seconds"], 1e-9)),
                    "resumed": prepared.action == "resume", "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    missing = int((~output.done_tasks()).sum())
    if missing:
        raise RunFailed(_incomplete(config, f"{missing} of {count(plan.n_tasks, 'task')} "
                                            f"{'is' if missing == 1 else 'are'} not marked done"))
    try:  # the last word: still this run's output, still its lease (a frozen client may have lost both)
        lease.check_owner(config.out, job.lease_token, job.out_options)
    except RunEnded as exc:
        raise RunFailed(_lost(config, str(exc)), ENDED_STEP) from exc
    if output.attributes().get("run_fingerprint") != job.fingerprint:
        raise RunFailed(_lost(config, "the output now holds another run's data"), ENDED_STEP)
    try:
        output.finish({"timings": timings, "pairs_computed": int(output.attributes().get("pairs_computed", pairs))},
                      job.output_id)
    except RunEnded as exc:
        raise RunFailed(_lost(config, str(exc)), ENDED_STEP) from exc
    print(f"kgrad: wrote {config.out} in {total:.2f} s ({count(timings['tasks_run'], 'task')} run, "
          f"{timings['tasks_skipped']} already done)", file=stream, flush=True)
    return {**prepared.attributes, "timings": timings}


def _client_run(prepared: Prepared, output: OutputGroup, on_workers=None) -> ClientRun:
    """What the method's client steps see of this run (``on_workers``: its map over the cluster's workers)."""
    inputs = prepared.inputs
    return ClientRun(job=prepared.job, plan=prepared.plan, layout=prepared.problem.layout, output=output,
                     points=inputs.point_data, sources=None if inputs.sources is None else inputs.source_data,
                     weights=inputs.weight_data, map_on_workers=on_workers)


def _check_inputs_unchanged(prepared: Prepared) -> None:
    """Read each input once more before the output is marked complete: a complete output is exactly the
    result for the data its fingerprints name (each task also checked the rows it read)."""

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


def _needs_local_cluster(options: RunOptions) -> bool:
    """Whether a run of these (checked) options will start a local cluster whatever its inputs and plan turn
    out to be: it creates or overwrites its output, which no other live run holds.  (A refusal, a complete
    output or a resume are found only after planning: they do not wait for a cluster to start and close.)"""
    if options.scheduler != "local" or not options.out:
        return False
    opts = tuple(sorted(options.storage_options.items()))
    try:
        if lease.is_live(lease.read(options.out, opts)):
            return False
        kind = OutputGroup(options.out, opts).kind()  # raises for what no flag lets a run touch
        return kind in ("absent", "empty") or options.overwrite
    except Exception:  # noqa: BLE001 - only a head start: anything odd is found and reported by the run itself
        return False


def run_workflow(config: RunOptions | str, **overrides) -> dict:
    """Validate, plan and run a workflow (RunOptions or a TOML path) with ``overrides`` (an override of None
    keeps the workflow's value); return the output's attributes."""
    if isinstance(config, str):
        config = load_workflow(config)
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})  # None: keep the file's
    options = check_options(config)
    # A local cluster starts while the inputs are read and the run is planned (about 0.9 s of its start
    # overlaps them), when the run will need it whatever the plan says.
    if options.scheduler == "local":
        quiet_dask_logs()
    starting = (StartingCluster(options.workers, options.memory_limit, options.threads_per_worker)
                if _needs_local_cluster(options) else None)
    try:
        return run_prepared(prepare(options), starting=starting)
    finally:
        if starting is not None:
            starting.cancel()
