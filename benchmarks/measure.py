"""Timing, memory sampling, the machine's description, and ``kgrad run`` as a measured subprocess.

Timing rule: the first call is timed alone (it includes tracing and compiling, in this process, for a
shape not seen before); then warm calls are repeated until ``max_repeats`` or until ``budget_s`` of
wall time is spent (at least ``min_repeats``), and their median is the figure.  Every call ends with
``block_until_ready`` on its outputs; clocks are ``time.perf_counter``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block(out):
    """Wait for every JAX array in ``out`` (numpy outputs are already done)."""
    import jax

    return jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
                                  out)


def time_calls(fn, *, max_repeats: int = 5, budget_s: float = 5.0, min_repeats: int = 1):
    """Return (first-call seconds, [warm seconds...], first output)."""
    started = time.perf_counter()
    out = block(fn())
    first = time.perf_counter() - started
    warm: list[float] = []
    spent = first
    while len(warm) < max_repeats and (len(warm) < min_repeats or spent < budget_s):
        t = time.perf_counter()
        block(fn())
        warm.append(time.perf_counter() - t)
        spent += warm[-1]
    return first, warm, out


def median(values):
    return statistics.median(values) if values else None


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` and ``delta`` (over the start)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self):
        self.start = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def delta(self) -> int:
        return self.peak - self.start


# ----------------------------------------------------------------------------- the machine


def _lscpu() -> dict:
    info = {}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def machine_info() -> dict:
    import dask
    import distributed
    import jax
    import psutil
    import zarr
    from jax._src import lib as jaxlib_internal

    cpu = _lscpu()
    flags = cpu.get("Flags", "").split()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "fma") if f in flags]
    try:
        import pykeops

        keops = getattr(pykeops, "__version__", "?")
    except Exception:
        keops = None
    devices = [str(d) for d in jax.devices()]
    return {
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "simd": simd,
        "l3": cpu.get("L3 cache"),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jaxlib_internal, "version_str", "?"),
        "xla_extension_version": getattr(jaxlib_internal, "jaxlib_extension_version", None),
        "jax_backend": jax.default_backend(),
        "jax_devices": devices,
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "pykeops": keops,
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------- end to end


def points(n: int, dim: int = 3, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """The benchmark's points: standard normal in D dimensions (the same for every method)."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(dtype)


def write_points_store(path: str, x: np.ndarray) -> str:
    """A zarr group holding ``points`` (chunks of 65536 rows), written once and reused."""
    import zarr

    marker = path.rstrip("/") + ".complete"  # beside the store: zarr warns about foreign files inside it
    if os.path.exists(marker):
        return path
    shutil.rmtree(path, ignore_errors=True)
    group = zarr.open_group(path, mode="w")
    group.create_array("points", data=x, chunks=(min(65536, x.shape[0]), x.shape[1]))
    open(marker, "w").close()
    return path


def _is_worker(cmdline: list[str]) -> bool:
    text = " ".join(cmdline)
    return "spawn_main" in text and "resource_tracker" not in text


def run_kgrad(points_path: str, out: str, *, cache_dir: str | None, workers: int | None = None,
              extra_args=(), env_extra: dict | None = None, log_dir: str | None = None,
              timeout: float = 3600, poll: float = 0.05) -> dict:
    """``python -m pipeline run`` in a fresh process (start-up included); peak memory of its workers.

    Returns wall seconds, the output's recorded timings, and the peak RSS of every worker process
    (psutil, sampled every ``poll`` s) and of the main process (client + scheduler + nannies).
    """
    import psutil

    cmd = [sys.executable, "-m", "pipeline", "run", "--points", points_path, "--out", out,
           "--overwrite", "--no-progress", *extra_args]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, **(env_extra or {})}
    if cache_dir is not None:
        env["KGRAD_CACHE_DIR"] = cache_dir
        env.pop("KGRAD_NO_CACHE", None)
    log_dir = log_dir or os.path.dirname(out)
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, os.path.basename(out) + ".log")
    peaks: dict[int, int] = {}
    kinds: dict[int, str] = {}
    main_peak = 0
    with open(log_path, "w") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                if time.perf_counter() - started > timeout:
                    proc.kill()
                    break
                try:
                    main_peak = max(main_peak, root.memory_info().rss)
                    for child in root.children(recursive=True):
                        try:
                            if child.pid not in kinds:
                                kinds[child.pid] = "worker" if _is_worker(child.cmdline()) else "other"
                            peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
                        except psutil.Error:
                            pass
                except psutil.Error:
                    pass
                time.sleep(poll)
        finally:
            rc = proc.wait()
        wall = time.perf_counter() - started
    result = {"wall_s": wall, "returncode": rc, "command": " ".join(cmd[1:]), "log": log_path,
              "peak_rss_main_bytes": main_peak,
              "peak_rss_per_worker_bytes": sorted((v for p, v in peaks.items() if kinds.get(p) == "worker"),
                                                  reverse=True)}
    if rc != 0:
        with open(log_path) as f:
            result["error"] = f.read()[-2000:]
        return result
    import zarr

    attrs = dict(zarr.open_group(out, mode="r").attrs)
    result["timings"] = attrs.get("timings", {})
    result["plan"] = attrs.get("plan", {})
    result["complete"] = bool(attrs.get("complete"))
    return result


def read_gradient(out: str) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_group(out, mode="r")["gradient"][:])


def child_json(args: list[str], env_extra: dict | None = None, timeout: float = 600) -> dict:
    """Run a Python helper script in a fresh process; it prints one JSON object last on stdout."""
    env = {**os.environ, **(env_extra or {})}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:], "wall_s": wall}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return {**json.loads(lines[-1]), "wall_s": wall}
