"""One fresh process: kgrad in-process with the persistent compilation cache on; prints one JSON line.

    python benchmarks/cache_probe.py N CACHE_DIR

Run it twice with the same (initially empty) CACHE_DIR: the second process's first call loads the
compiled program from the cache instead of compiling it.  Used by ``run.py``'s cache section.
"""

from __future__ import annotations

import json
import os
import sys
import time

started = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipeline import kernel_gradients  # noqa: E402
from pipeline.cache import enable_compilation_cache  # noqa: E402


def main() -> None:
    n, cache_dir = int(sys.argv[1]), sys.argv[2]
    enabled = enable_compilation_cache(cache_dir)
    imported = time.perf_counter() - started
    x = np.random.default_rng(0).standard_normal((n, 3)).astype("float32")
    t = time.perf_counter()
    kernel_gradients(x)
    first = time.perf_counter() - t
    warm = []
    for _ in range(3):
        t = time.perf_counter()
        kernel_gradients(x)
        warm.append(time.perf_counter() - t)
    files = sum(len(f) for _, _, f in os.walk(cache_dir)) if enabled else 0
    print(json.dumps({"n": n, "cache_dir": enabled, "import_s": imported, "first_call_s": first,
                      "warm_median_s": sorted(warm)[1], "cache_files_after": files,
                      "process_s": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
