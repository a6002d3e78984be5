"""Throughput of the in-process API, old code against new, side by side in one process (issue 9).

    python benchmarks/accuracy_speed.py [--old /tmp/old] [--n 262144] [--rounds 4]

``--old``: a checkout of the old commit (``git worktree add /tmp/old d72194c``); its ``pipeline`` package is
loaded under another name, so both run in this process and alternate: old, new, old, new, ...  Dense RBF,
float32, D = 3, standard normal points (the benchmark's), lengthscale 1, unit weights.  Prints each time,
the medians and the ratio new/old of the median throughputs, by wall time and by this process's CPU time
(steadier on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str, root: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "pipeline", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(root, "pipeline")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", default="/tmp/old")
    parser.add_argument("--n", type=int, default=262144)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--kernel", default="rbf")
    args = parser.parse_args(argv)
    packages = {"old": load("pipeline_old", args.old), "new": load("pipeline_new", HERE)}
    x = np.random.default_rng(0).standard_normal((args.n, 3)).astype(np.float32)
    warm = x[: min(args.n, 32768)]  # same tile shape (1024 x 512, 64 tiles per call): compiles once
    for package in packages.values():
        package.kernel_gradients(warm, kernel=args.kernel)
    rates = {name: [] for name in packages}
    cpu_rates = {name: [] for name in packages}
    pairs = args.n * args.n / 1e9
    for round_ in range(args.rounds):
        for name, package in packages.items():
            started, cpu = time.perf_counter(), time.process_time()
            package.kernel_gradients(x, kernel=args.kernel)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
            rates[name].append(pairs / seconds)
            cpu_rates[name].append(pairs / cpu_seconds)
            print(f"round {round_} {name}: {seconds:.2f} s, {rates[name][-1]:.3f} G pairs/s; "
                  f"{cpu_seconds:.2f} CPU s, {cpu_rates[name][-1]:.3f} G pairs per CPU s", flush=True)
    for label, table in (("wall", rates), ("CPU", cpu_rates)):
        med = {name: statistics.median(r) for name, r in table.items()}
        print(f"{label}: median old {med['old']:.3f}, new {med['new']:.3f} G pairs/s, "
              f"ratio new/old {med['new'] / med['old']:.3f}")


if __name__ == "__main__":
    main()
