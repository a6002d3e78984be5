"""``kgrad inspect``: what an output group holds and how it was made."""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .output import OutputGroup
from .text import count


def describe_output(location: str, storage_options: tuple = ()) -> dict:
    """What ``kgrad inspect`` prints (and ``--json`` gives): state, sizes, inputs, arrays, timings."""
    output = OutputGroup(location, storage_options)
    if not output.exists():
        raise InputError(f"output {location!r} does not exist")
    record = output.record()
    group = output.open()
    done = output.done_tasks()
    if not record.complete and record.method:  # a run's progress is where its method keeps it (order/)
        from .methods import METHODS  # JAX: only for an incomplete output

        if record.method in METHODS:
            done = METHODS[record.method].done_tasks(output, record.run_fingerprint, done.size)
    info = {"location": location, "complete": record.complete,
            "tasks_done": int(done.sum()), "tasks_total": int(done.size),
            "arrays": {name: {"shape": list(group[name].shape), "dtype": str(group[name].dtype),
                              "chunks": list(group[name].chunks),
                              "dimension_names": list(group[name].metadata.dimension_names or ())}
                       for name in sorted(group.array_keys())},
            "kernel_description": record.kernel_description, "formulation": record.formulation,
            "dtype": record.dtype, "mode": record.mode, "N": record.n_points, "M": record.n_sources,
            "D": record.dim, "inputs": record.inputs, "kgrad_version": record.kgrad_version,
            "run_fingerprint": record.run_fingerprint, "plan": record.plan, "timings": record.timings or None}
    writer = live_writer(location, storage_options)
    if writer:
        info["being_written_by"] = writer
    attrs = dict(group.attrs)
    info.update({key: attrs[key] for key in ("tolerance", "error_bound", "pairs_computed", "pairs_total",
                                             "exact_reason") if key in attrs})
    if record.complete:
        g = np.asarray(group["gradient"][:], dtype=np.float64)
        norms = np.linalg.norm(g, axis=1)
        info["gradient_norm"] = {"min": float(norms.min()), "median": float(np.median(norms)),
                                 "max": float(norms.max()), "nan": int(np.isnan(g).sum())}
    return info


def live_writer(location: str, storage_options: tuple = ()) -> str | None:
    """The live run that holds the output's lease, in words ("run 1a2b3c4d (pid 42 on host, since ...)"),
    or None: an output being written is not to be resumed, and ``kgrad inspect`` says who writes it (as
    ``kgrad plan`` does) instead."""
    from . import lease

    owner = lease.read(location, storage_options)
    return lease.describe(owner) if lease.is_live(owner) else None


def _state(info: dict) -> str:
    """complete; being written by a live run (named); or incomplete, to be finished with --resume."""
    if info["complete"]:
        return "complete"
    written = f"{info['tasks_done']}/{count(info['tasks_total'], 'task')} written"
    if info.get("being_written_by"):
        return f"BEING WRITTEN ({written} so far) by kgrad {info['being_written_by']}; wait for it to finish"
    return f"INCOMPLETE ({written}; finish it with kgrad run ... --resume)"


def format_output(info: dict) -> str:
    state = _state(info)
    lines = [f"{info['location']}: {state}",
             f"  kernel      {info['kernel_description']}  [{info['formulation']}, mode={info['mode']}, "
             f"{info['dtype']}]",
             f"  sizes       N={info['N']} points, M={info['M']} sources, D={info['D']}"]
    if info.get("tolerance"):
        lines.append(f"  tolerance   {_tolerance_line(info)}")
    for role, meta in (info.get("inputs") or {}).items():
        if meta:
            where = meta["location"] + (f"[{meta['array']}]" if meta.get("array") else "")
            lines.append(f"  {role:<11} {where}  (fingerprint {meta['fingerprint'][:12]})")
    for name, meta in info["arrays"].items():
        lines.append(f"  array       {name} {tuple(meta['shape'])} {meta['dtype']} "
                     f"dims={tuple(meta['dimension_names'])} chunks={tuple(meta['chunks'])}")
    if "gradient_norm" in info:
        n = info["gradient_norm"]
        lines.append(f"  |gradient|  min {n['min']:.4g}, median {n['median']:.4g}, max {n['max']:.4g}, "
                     f"NaN {n['nan']}")
    t = info.get("timings") or {}
    if t:
        lines.append(f"  timings     total {t.get('total_seconds')} s, tasks {t.get('execute_seconds')} s, "
                     f"{_rate(info)}, {count(t.get('tasks_run'), 'task')} run, {t.get('tasks_skipped')} resumed")
    lines.append(f"  made by     kgrad {info['kgrad_version']}, run {info['run_fingerprint'][:12]}")
    return "\n".join(lines)


# The dtype's own rounding (README, "float32 error bound"): max |g - g_ref| / max |g_ref|.
ROUNDING_BOUND = {"float32": "2e-5 (for float64 inputs)", "float64": "1e-10"}


def _tolerance_line(info: dict) -> str:
    """The tolerance and what it bought: the per-query bounds and the share of pairs computed, or, for a run
    that computed every pair (the kernel does not prune, or pruning would have saved too little), that it
    ran exact and only the dtype's rounding applies (its error bound is 0, not a bound of 0 on the result).
    A run with bounds whose faster methods declined says why after them (``exact_reason`` holds the reasons of
    every method that declined, so it is there for a pruned run whose far field declined too)."""
    tolerance, bound = info["tolerance"], info.get("error_bound") or {}
    pairs, total = info.get("pairs_computed"), info.get("pairs_total")
    declined = (info.get("exact_reason") or "").removesuffix(": the run is exact")
    if not (bound.get("gradient") or bound.get("value")):
        reason = declined or "every pair was computed"
        rounding = ROUNDING_BOUND.get(info.get("dtype"), "the dtype's bound")
        return (f"{tolerance:g} asked, but the run was exact: {reason}; only {info.get('dtype')} rounding "
                f"applies: max |g^ - g| within {rounding} of max |g|")
    share = f"; {pairs / total:.2%} of the pairs computed" if pairs and total else ""
    return (f"{tolerance:g}: per query |g^ - g| <= {bound.get('gradient', 0):.3g}, "
            f"|v^ - v| <= {bound.get('value', 0):.3g}{share}" + (f" ({declined})" if declined else ""))


def _rate(info: dict) -> str:
    """Pairs covered per second (N x M for the tasks run, comparable between exact and pruned runs), and,
    where pruning skipped pairs, the pairs computed per second beside it."""
    t, plan = info.get("timings") or {}, info.get("plan") or {}
    seconds = max(t.get("execute_seconds") or 0, 1e-9)
    share_run = (t.get("tasks_run") or 0) / max(plan.get("n_tasks") or 1, 1)
    total = info.get("pairs_total") or (info.get("N") or 0) * (info.get("M") or 0)
    covered = total * share_run / seconds
    computed = info.get("pairs_computed")
    if not computed or computed >= total:
        return f"{covered / 1e9:.2f} G pairs/s"
    return f"{covered / 1e9:.2f} G pairs/s covered ({computed * share_run / seconds / 1e9:.3g} G/s computed)"
