"""Measure a worker task's memory: run ``pipeline.methods.dense.DENSE.run_task`` in this (fresh) process, as a dask
worker would, and print one JSON object with the figures.  Used by test_memory.py.

    python tests/memory_probe.py JOBS.pkl

JOBS.pkl holds ``{"warmup": (job, tasks), "job": (job, tasks)}`` pickled by the parent (which ran
``pipeline.workflow.prepare`` and created the outputs): the warm-up job has the same tile shape (so the
jitted call is compiled and the compilation cache and allocator are warm) but few sources.  Then:

    baseline_rss  RSS after imports, JAX start-up and the warm-up task (what a worker holds between runs)
    peak_rss      the high-water mark of RSS while the measured job's tasks run (VmHWM, reset just before
                  the job through /proc/self/clear_refs when the kernel allows it; else ru_maxrss)
    task_peak     peak_rss - baseline_rss: what the task itself added at its peak
"""

from __future__ import annotations

import gc
import json
import pickle
import resource
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def main(path: str) -> None:
    started = time.perf_counter()
    import jax  # noqa: F401  (as a worker: JAX loaded before its first task)
    import numpy as np  # noqa: F401

    import distributed  # noqa: F401
    from pipeline.methods.dense import DENSE

    with open(path, "rb") as f:
        jobs = pickle.load(f)
    warm_job, warm_tasks = jobs["warmup"]
    for task in warm_tasks:
        DENSE.run_task(warm_job, task)
    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    reset = _reset_peak()

    job, tasks = jobs["job"]
    seconds = []
    for task in tasks:
        t = time.perf_counter()
        DENSE.run_task(job, task)
        seconds.append(round(time.perf_counter() - t, 3))
    hwm = _status_kib("VmHWM") * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = hwm if reset else maxrss
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "task_peak": peak - baseline,
                      "maxrss_before_job": maxrss_before, "ru_maxrss": maxrss, "vm_hwm": hwm,
                      "peak_reset": reset, "task_seconds": seconds,
                      "total_seconds": round(time.perf_counter() - started, 3)}))


if __name__ == "__main__":
    main(sys.argv[1])
