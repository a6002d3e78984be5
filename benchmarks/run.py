"""kgrad's benchmark harness: every formulation side by side, in one run, on one machine.

    python benchmarks/run.py                  # full run (~15 min on 2 cores): results + BENCHMARKS.md
    python benchmarks/run.py --quick          # smoke test, small sizes (< 2 min): benchmarks/results/quick
    python benchmarks/run.py --scale-1e6      # also one N = 10^6 end-to-end run (~10+ min more)
    python benchmarks/run.py --gpu --out DIR  # the GPU subset (see benchmarks/gpu.sh)

The quantity is g_j = sum_i grad_q k(x_j, x_i) for N points in D = 3, float32, RBF kernel with unit
lengthscale, unit weights and sources = points (M = N), so one call does N * M "pairs".  Methods:

* ``seed_jacfwd`` / ``seed_jacrev``: the classic post's whole-matrix ``vmap(jacfwd|jacrev)`` (seed.txt),
  summed after; N * N * D memory, so only up to a size limit.
* ``gemm``: the whole-matrix GEMM form, one jit (N * N memory).
* ``keops``: KeOps on the CPU, LazyTensor with the closed-form gradient (optional: pykeops).
* ``kgrad``: ``pipeline.kernel_gradients`` in this process (also computes the kernel sum v).
* ``kgrad_e2e``: ``python -m pipeline run`` in a fresh process on a local dask cluster, zarr in and out,
  Python start-up, imports, cluster start and compiles included.
* the ceiling: ``jit(sum(exp(a)))`` over 2^25 floats (2^27 on a GPU); one element = one pair.

Outputs in ``--out`` (default ``benchmarks/results``): ``results.json`` (every measurement),
``throughput.png``, ``BENCHMARKS.md`` (also copied to the repository root by a full CPU run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import formulations as F  # noqa: E402
import measure as M  # noqa: E402
import report  # noqa: E402

# Sizes and limits per mode.  The seed's Jacobian is N * N * D * 4 bytes (3.2 GB at N = 16384, with a
# ~30 s compile), the GEMM form holds N * N matrices, and KeOps on 2 cores does ~0.3 G pairs/s.
MODES = {
    "quick": dict(main=[100, 1024, 4096], seed_max=1024, seed_jacrev_max=100, gemm_max=4096, keops_max=4096,
                  e2e=[16384], fit_min=1024, periodic=[256, 1024], periodic_seed_max=1024, periodic_e2e=4096,
                  periodic_jacrev_max=256, float64=[4096], float64_e2e=4096, cache_n=4096, reference_max=4096, e2e_runs=(1, 1),
                  max_repeats=5, budget_s=1.5, ceiling_log2=(20, 25)),
    "full": dict(main=[100, 1024, 4096, 8192, 16384, 65536, 262144], seed_max=8192, seed_jacrev_max=1024,
                 gemm_max=16384, keops_max=65536, e2e=[1024, 16384, 65536, 262144], fit_min=16384,
                 periodic=[256, 1024, 4096], periodic_seed_max=4096, periodic_jacrev_max=256, periodic_e2e=65536,
                 float64=[16384, 65536], float64_e2e=262144, cache_n=16384, reference_max=8192, e2e_runs=(3, 2), max_repeats=7,
                 budget_s=8.0, ceiling_log2=(20, 22, 25)),
}
# vmap(jacrev(row_kernel)): reverse mode needs one backward pass per output of the row kernel (N of them),
# so the seed's jacrev variant does O(N^3) work (13 s per call at N = 1024 on 2 loaded cores).
JACREV_NOTE = "the seed's vmap(jacrev(row kernel)) does one backward pass per output, O(N^3) work"
E2E_SMALL = 16384  # e2e_runs[0] runs at N <= this, e2e_runs[1] above
SCALE_1E6 = 1_000_000

SEED_PUBLISHED = {  # shared/seed.txt: N = 100 points, D = 1, "grad map 1" (first call) and "2" (warm)
    "jax_jacfwd": {"label": "JAX vmap(jacfwd) (post)", "first_s": 0.077634, "warm_s": 0.000091},
    "jax_jacrev": {"label": "JAX vmap(jacrev) (post)", "first_s": 0.192222, "warm_s": 0.000453},
    "julia_forwarddiff": {"label": "Julia ForwardDiff (post)", "first_s": 0.616478, "warm_s": 0.000298},
    "julia_zygote": {"label": "Julia Zygote (post)", "first_s": 0.792268, "warm_s": 0.087710},
}
KEOPS_PUBLISHED = {"label": "KeOps published: Gaussian kernel sum, N = 10^6, D = 3, RTX 2080 Ti",
                   "seconds": 1.38, "n": 10**6, "dim": 3}


class Harness:
    """Collects measurements into one results dict and writes it after every section."""

    def __init__(self, args, mode: str):
        self.args = args
        self.mode = mode
        self.cfg = MODES["quick" if mode == "quick" else "full"]
        self.out = args.out
        self.work = os.path.join(M.REPO, "benchmarks", "_work")
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        self.results = {"mode": mode, "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {}, "ceilings": {},
                        "measurements": [], "skipped": [], "errors": [], "cache": {}, "scale_fit": {},
                        "seed_published": SEED_PUBLISHED, "keops_published": KEOPS_PUBLISHED}
        self.references: dict = {}
        self.kgrad_out: dict = {}
        self.keops = None
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------------- bookkeeping

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self._t0, 1)
        report.finalize(self.results)
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=_json_default)

    def skip(self, section, method, reason, n=None):
        self.results["skipped"].append({"section": section, "method": method, "N": n, "reason": reason})

    def error(self, section, method, n, exc):
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        print(f"  ! {method} N={n}: {text}", flush=True)
        self.results["errors"].append({"section": section, "method": method, "N": n, "error": text[-1500:]})

    def add(self, section, method, n, *, dim=3, dtype="float32", kernel="rbf", first=None, warm=(),
            m=None, **extra) -> dict:
        m = n if m is None else m
        warm = list(warm)
        rec = {"section": section, "method": method, "label": report.LABELS.get(method, method), "N": n,
               "M": m, "D": dim, "dtype": dtype, "kernel": kernel, "pairs": n * m,
               "first_call_s": first, "warm_median_s": M.median(warm), "warm_min_s": min(warm) if warm else None,
               "warm_s": warm, "repeats": len(warm), **extra}
        seconds = rec["warm_median_s"] or first
        rec["pairs_per_s"] = n * m / seconds if seconds else None
        self.results["measurements"].append(rec)
        print(f"  {method:<14} N={n:<8} first {_fmt_s(first)}  warm {_fmt_s(rec['warm_median_s'])}  "
              f"{(rec['pairs_per_s'] or 0) / 1e9:8.4f} G pairs/s"
              + (f"  err {rec['rel_err']:.1e}" if rec.get("rel_err") is not None else ""), flush=True)
        return rec

    def timed(self, section, method, n, fn, *, reference=None, sample_memory=True, repeats=None, budget=None,
              min_repeats=1, **extra):
        """Time ``fn`` (first call + warm repeats), check its output against ``reference``, record it."""
        repeats = repeats or self.cfg["max_repeats"]
        budget = budget or self.cfg["budget_s"]
        try:
            if sample_memory:
                with M.PeakRSS() as mem:
                    first, warm, out = M.time_calls(fn, max_repeats=repeats, budget_s=budget,
                                                    min_repeats=min_repeats)
                extra.setdefault("peak_rss_delta_bytes", mem.delta)
            else:
                first, warm, out = M.time_calls(fn, max_repeats=repeats, budget_s=budget,
                                                min_repeats=min_repeats)
        except Exception as exc:  # one broken method must not end the run
            self.error(section, method, n, exc)
            return None, None
        out = np.asarray(out)
        err = None if reference is None else F.relative_error(out, reference)
        if reference is not None:
            extra.setdefault("reference_name", "float64 numpy")
        return self.add(section, method, n, first=first, warm=warm, rel_err=err, **extra), out

    @staticmethod
    def xla_memory(rec, fn, x):
        """Record the compiled program's scratch bytes (after timing, so the first call still compiles)."""
        if rec is not None:
            rec["xla_temp_bytes"] = F.xla_temp_bytes(fn, x)

    def reference(self, kernel, x):
        key = (kernel, x.shape, x.dtype.str)
        if key not in self.references:
            self.references[key] = F.reference_gradient(kernel, x)
        return self.references[key]

    # ------------------------------------------------------------------------- sections

    def ceilings(self, dtype="float32", when="start"):
        """XLA's fused exp+sum (and sin+sum) over a flat array of the largest size in the mode's
        ``ceiling_log2`` (2^25 on the CPU), measured at the start and at the end of a run; the ceiling is the better
        of the two, so a moment of load from other work on the machine does not lower the bar.  Smaller,
        cache-resident arrays are measured too and kept in results.json as context (on a shared machine
        they swing by 2x between samples)."""
        print(f"ceilings ({dtype}, {when})", flush=True)
        import jax

        main_log2 = max(self.cfg["ceiling_log2"])
        for log2 in self.cfg["ceiling_log2"]:
            n = 2 ** log2
            a = jax.device_put(F.ceiling_input(n, dtype))  # on the device once: the ceiling is compute only
            for name, fn in (("exp_sum", F.exp_sum()), ("sin_sum", F.sin_sum())):
                if dtype == "float64" and name == "sin_sum":
                    continue
                first, warm, _ = M.time_calls(lambda fn=fn: fn(a), max_repeats=9, budget_s=2.0, min_repeats=3)
                rate = n / M.median(warm)
                rec = self.results["ceilings"].setdefault(f"{name}_{dtype}", {"samples": []})
                rec["samples"].append({"when": when, "log2": log2, "first_call_s": first,
                                       "warm_median_s": M.median(warm), "elements_per_s": rate})
                main = [r for r in rec["samples"] if r["log2"] == main_log2]
                if main:
                    best = max(main, key=lambda r: r["elements_per_s"])
                    rec.update(op=f"jit(sum({name.split('_')[0]}(a))) over 2^{main_log2} {dtype}",
                               elements=2 ** main_log2, elements_per_s=best["elements_per_s"],
                               warm_median_s=best["warm_median_s"], first_call_s=best["first_call_s"])
                print(f"  {name} {dtype} 2^{log2}: {rate / 1e9:.3f} G elements/s", flush=True)
        self.save()

    def n100(self):
        """The seed's own setting: X = linspace(-1, 1, 100), D = 1, float32, first call and warm."""
        print("N = 100, D = 1 (the seed's setting)", flush=True)
        from pipeline import kernel_gradients

        x = np.linspace(-1.0, 1.0, 100).astype("float32")
        ref = self.reference("rbf", x)
        kw = dict(reference=ref, sample_memory=False, repeats=200, budget=0.5, dim=1)
        for ad in ("jacfwd", "jacrev"):
            fn = F.seed_map("rbf", ad)
            self.timed("n100", f"seed_{ad}", 100, lambda fn=fn: fn(x), **kw)
        gemm = F.gemm_rbf()
        self.timed("n100", "gemm", 100, lambda: gemm(x), **kw)
        if self.keops:
            keops = F.keops_rbf()
            self.timed("n100", "keops", 100, lambda: keops(x), note="first call includes KeOps' C++ build "
                       "unless its cache (~/.cache/keops*) already holds it", **kw)
        self.timed("n100", "kgrad", 100, lambda: kernel_gradients(x), **kw)
        self.save()

    def main_table(self):
        print("main table: RBF, float32, D = 3", flush=True)
        from pipeline import kernel_gradients

        c = self.cfg
        for n in c["main"]:
            x = M.points(n)
            ref = self.reference("rbf", x) if n <= c["reference_max"] else None
            rec, g = self.timed("main", "kgrad", n, lambda: kernel_gradients(x), reference=ref,
                                reference_name="float64 numpy" if ref is not None else None)
            if g is not None:
                self.kgrad_out[n] = g
            if ref is None:
                ref = self.kgrad_out.get(n)
            ref_name = "float64 numpy" if n <= c["reference_max"] else "kgrad in-process"
            for ad in ("jacfwd", "jacrev"):
                if ad == "jacrev" and n > c["seed_jacrev_max"]:
                    self.skip("main", "seed_jacrev", f"N > {c['seed_jacrev_max']}: {JACREV_NOTE}", n)
                    continue
                if n > c["seed_max"]:
                    self.skip("main", f"seed_{ad}", f"N > {c['seed_max']}: time ~ N^2 at ~0.01 G pairs/s "
                              f"(~{n * n / 0.01e9:.0f} s a call at N = {n}); its (N, N, D) Jacobian would be "
                              f"{F.seed_bytes(n, 3, 4) / 2**30:.2g} GiB unless XLA fuses the sum into it", n)
                    continue
                fn = F.seed_map("rbf", ad)
                rec, _ = self.timed("main", f"seed_{ad}", n, lambda fn=fn: fn(x), reference=ref,
                                    reference_name=ref_name, jacobian_bytes=F.seed_bytes(n, 3, 4))
                self.xla_memory(rec, fn, x)
            if n > c["gemm_max"]:
                self.skip("main", "gemm", f"N > {c['gemm_max']}: N x N matrices "
                          f"({F.gemm_bytes(n, 4) / 2**30:.1f} GiB each at N = {n})", n)
            else:
                gemm = F.gemm_rbf()
                rec, _ = self.timed("main", "gemm", n, lambda: gemm(x), reference=ref, reference_name=ref_name,
                                    matrix_bytes=F.gemm_bytes(n, 4))
                self.xla_memory(rec, gemm, x)
            if not self.keops:
                pass
            elif n > c["keops_max"]:
                self.skip("main", "keops", f"N > {c['keops_max']}: KeOps CPU at ~0.3 G pairs/s would take "
                          f"~{n * n / 0.3e9:.0f} s per call", n)
            else:
                keops = F.keops_rbf()
                self.timed("main", "keops", n, lambda: keops(x), reference=ref, reference_name=ref_name)
            self.save()

    def periodic(self):
        """The generic path: kgrad mode="jacfwd"/"jacrev" on the periodic kernel vs the seed's form of it."""
        print("periodic kernel (generic path), float32, D = 3", flush=True)
        from pipeline import kernel_gradients

        c = self.cfg
        for n in c["periodic"]:
            x = M.points(n)
            ref = self.reference("periodic", x)
            for mode in ("auto", "jacfwd", "jacrev"):
                self.timed("periodic", f"kgrad_{mode}", n,
                           lambda mode=mode: kernel_gradients(x, kernel="periodic", mode=mode),
                           reference=ref, kernel="periodic")
            for ad in ("jacfwd", "jacrev"):
                if ad == "jacrev" and n > c["periodic_jacrev_max"]:
                    self.skip("periodic", "seed_jacrev", f"N > {c['periodic_jacrev_max']}: {JACREV_NOTE}", n)
                    continue
                if n > c["periodic_seed_max"]:
                    self.skip("periodic", f"seed_{ad}", f"N > {c['periodic_seed_max']} (time)", n)
                    continue
                fn = F.seed_map("periodic", ad)
                rec, _ = self.timed("periodic", f"seed_{ad}", n, lambda fn=fn: fn(x), reference=ref,
                                    kernel="periodic", jacobian_bytes=F.seed_bytes(n, 3, 4))
                self.xla_memory(rec, fn, x)
        # The generic path end to end (kgrad run, mode auto), against the seed's in-process rate above.
        cache = os.path.join(self.work, "jax-cache-e2e")
        self.e2e_one("periodic", c["periodic_e2e"], cache, runs=2, extra_args=("--kernel", "periodic"),
                     kernel="periodic")
        self.save()

    def float64(self):
        """kgrad (and the GEMM form) in float64, against the float64 exp+sum ceiling."""
        import jax

        jax.config.update("jax_enable_x64", True)  # last in-process section: x64 stays on from here
        self.ceilings("float64")
        print("float64: RBF, D = 3", flush=True)
        from pipeline import kernel_gradients

        c = self.cfg
        for n in c["float64"]:
            x = M.points(n, dtype="float64")
            ref = self.reference("rbf", x) if n <= c["reference_max"] else None
            self.timed("float64", "kgrad", n, lambda: kernel_gradients(x, dtype="float64"), reference=ref,
                       dtype="float64")
            if n <= c["gemm_max"]:
                gemm = F.gemm_rbf()
                rec, _ = self.timed("float64", "gemm", n, lambda: gemm(x), reference=ref, dtype="float64",
                                    matrix_bytes=F.gemm_bytes(n, 8))
                self.xla_memory(rec, gemm, x)
            else:
                self.skip("float64", "gemm", f"N > {c['gemm_max']}", n)
        n = c["float64_e2e"]
        self.e2e_one("float64", n, os.path.join(self.work, "jax-cache-e2e"), runs=1, dtype="float64")
        self.save()

    def e2e(self):
        """``kgrad run`` end to end at each size (fresh process each run), then the scale fit."""
        print("end to end: python -m pipeline run, local cluster, zarr in and out", flush=True)
        c = self.cfg
        cache = os.path.join(self.work, "jax-cache-e2e")
        shutil.rmtree(cache, ignore_errors=True)
        for n in c["e2e"]:
            self.e2e_one("e2e", n, cache, runs=c["e2e_runs"][0] if n <= E2E_SMALL else c["e2e_runs"][1])
        self.save()
        self.results["scale_fit"] = report.scale_fit(self.results["measurements"], c["fit_min"])
        self.save()

    def e2e_one(self, section, n, cache, runs, workers=None, extra_args=(), method="kgrad_e2e", kernel="rbf",
                dtype="float32"):
        name = f"points-{n}.zarr" if dtype == "float32" else f"points-{n}-{dtype}.zarr"
        store = M.write_points_store(os.path.join(self.work, name), M.points(n, dtype=dtype))
        out = os.path.join(self.work, f"out-{section}-{n}.zarr")
        if dtype != "float32":
            extra_args = (*extra_args, "--dtype", dtype)
        walls, infos = [], []
        for _ in range(runs):
            info = M.run_kgrad(store, out, cache_dir=cache, workers=workers, extra_args=extra_args)
            if info["returncode"] != 0:
                self.error(section, method, n, RuntimeError(info.get("error", "kgrad run failed")))
                return None
            walls.append(info["wall_s"])
            infos.append(info)
        ref = None
        if kernel != "rbf":
            from pipeline import kernel_gradients

            ref = kernel_gradients(M.points(n), kernel=kernel)
        elif dtype == "float32":
            ref = self.kgrad_out.get(n)
            if ref is None and n <= 65536 and section != "gpu":  # check the output against kgrad in-process
                from pipeline import kernel_gradients

                ref = self.kgrad_out[n] = kernel_gradients(M.points(n))
        err = ref_name = None
        if ref is not None:
            err, ref_name = F.relative_error(M.read_gradient(out), ref), "kgrad in-process"
        elif n <= self.cfg["reference_max"]:
            err = F.relative_error(M.read_gradient(out), self.reference("rbf", M.points(n, dtype=dtype)))
            ref_name = "float64 numpy"
        t = [i["timings"] for i in infos]
        per_worker = [max(i["peak_rss_per_worker_bytes"] or [0]) for i in infos]
        return self.add(section, method, n, kernel=kernel, dtype=dtype, first=walls[0], warm=walls[1:], rel_err=err,
                        reference_name=ref_name,
                        execute_s=M.median([x["execute_seconds"] for x in t]),
                        kgrad_total_s=M.median([x["total_seconds"] for x in t]),
                        cluster_start_s=M.median([x["cluster_start_seconds"] for x in t]),
                        compute_s_total=M.median([x["compute_seconds_total"] for x in t]),
                        pairs_per_s_execute=n * n / M.median([x["execute_seconds"] for x in t]),
                        workers=len(t[0].get("worker_pids", [])), tasks=t[0].get("tasks_run"),
                        plan=infos[0]["plan"], peak_rss_per_worker_bytes=infos[-1]["peak_rss_per_worker_bytes"],
                        peak_rss_worker_max_bytes=max(per_worker), peak_rss_main_bytes=infos[-1]["peak_rss_main_bytes"],
                        command=infos[0]["command"])

    def cache(self):
        """The persistent compilation cache: the same small run twice, with one fresh cache directory."""
        print("compilation cache: the same kgrad run twice (fresh KGRAD_CACHE_DIR), and in-process",
              flush=True)
        n = self.cfg["cache_n"]
        store = M.write_points_store(os.path.join(self.work, f"points-{n}.zarr"), M.points(n))
        cache = os.path.join(self.work, "jax-cache-probe")
        shutil.rmtree(cache, ignore_errors=True)
        runs = []
        plan = [("1st process, empty cache", cache, {}), ("2nd process, same cache", cache, {})]
        if self.mode != "quick":
            plan.append(("cache off (KGRAD_NO_CACHE=1)", None, {"KGRAD_NO_CACHE": "1"}))
        for label, directory, env in plan:
            info = M.run_kgrad(store, os.path.join(self.work, "out-cache.zarr"), cache_dir=directory, env_extra=env)
            if info["returncode"] != 0:
                self.error("cache", "kgrad_e2e", n, RuntimeError(info.get("error")))
                return
            t = info["timings"]
            files = sum(len(f) for _, _, f in os.walk(cache)) if os.path.isdir(cache) else 0
            runs.append({"run": label, "wall_s": info["wall_s"], "kgrad_total_s": t["total_seconds"],
                         "cluster_start_s": t["cluster_start_seconds"], "execute_s": t["execute_seconds"],
                         "compute_s_total": t["compute_seconds_total"], "cache_files": files})
            print(f"  {label:<30} wall {info['wall_s']:.2f} s, kgrad total {t['total_seconds']:.2f} s, "
                  f"execute {t['execute_seconds']:.2f} s ({files} cache files)", flush=True)
        probe_dir = os.path.join(self.work, "jax-cache-inprocess")
        shutil.rmtree(probe_dir, ignore_errors=True)
        probes = []
        for label in ("1st process, empty cache", "2nd process, same cache"):
            info = M.child_json([os.path.join("benchmarks", "cache_probe.py"), str(n), probe_dir])
            if "error" in info:
                self.error("cache", "kgrad", n, RuntimeError(info["error"]))
                break
            probes.append({"run": label, **info})
            print(f"  in-process {label:<26} first call {info['first_call_s']:.3f} s, warm "
                  f"{info['warm_median_s']:.3f} s", flush=True)
        self.results["cache"] = {"N": n, "D": 3, "dtype": "float32", "kernel": "rbf", "e2e": runs,
                                 "in_process": probes}
        self.save()

    def scale_1e6(self):
        n = self.args.scale_n
        print(f"scale: N = {n} end to end (peak memory per worker)", flush=True)
        self.e2e_one("scale_1e6", n, os.path.join(self.work, "jax-cache-e2e"), runs=1)
        self.save()

    # ------------------------------------------------------------------------- GPU subset

    def gpu(self):
        """kgrad in-process and end to end on one GPU worker, N = 10^6, D = 3, RBF (+ KeOps if on CUDA).

        Stays within ``--gpu-deadline`` seconds: a step that would start after it is skipped.
        """
        import jax
        from pipeline import kernel_gradients

        self.results["gpu_devices"] = [str(d) for d in jax.devices()]
        if jax.default_backend() != "gpu":
            self.results["errors"].append({"section": "gpu", "method": "-", "N": None,
                                           "error": f"JAX backend is {jax.default_backend()!r}, not gpu"})
        self.cfg = {**self.cfg, "ceiling_log2": (22, 27)}
        self.ceilings("float32")
        n = int(self.args.gpu_n)
        x = M.points(n)
        deadline = self._t0 + self.args.gpu_deadline

        def late(method):
            if time.perf_counter() < deadline:
                return False
            self.skip("gpu", method, f"past the --gpu-deadline of {self.args.gpu_deadline:.0f} s", n)
            return True

        print(f"GPU: kgrad in-process, N = {n}", flush=True)
        rec, g = self.timed("gpu", "kgrad", n, lambda: kernel_gradients(x), repeats=3, budget=60.0,
                            min_repeats=0, sample_memory=False)
        if g is not None:
            self.kgrad_out[n] = g
        if self.keops and F.keops_on_gpu() and not late("keops"):
            keops = F.keops_rbf()
            self.timed("gpu", "keops", n, lambda: keops(x), reference=self.kgrad_out.get(n), repeats=3,
                       budget=30.0, min_repeats=0, sample_memory=False, reference_name="kgrad in-process")
        elif self.keops:  # KeOps would fall back to the CPU: 10^12 pairs there take many minutes
            self.skip("gpu", "keops", "pykeops found no CUDA (it would run on the CPU)", n)
        self.save()
        cache = os.path.join(self.work, "jax-cache-gpu")
        shutil.rmtree(cache, ignore_errors=True)
        print(f"GPU: kgrad end to end on one GPU worker, N = {n} (run 2: warm compilation cache)", flush=True)
        if not late("kgrad_e2e"):
            self.e2e_one("gpu", n, cache, runs=2 if time.perf_counter() < deadline - 200 else 1, workers=1)
            self.save()
        if not late("kgrad_e2e_bigtiles"):
            self.e2e_one("gpu", n, cache, runs=1, workers=1, method="kgrad_e2e_bigtiles",
                         extra_args=("--tile-rows", "4096", "--tile-cols", "8192"))
        self.save()


def _fmt_s(value) -> str:
    return "      -   " if value is None else f"{value:10.6f}"


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


SECTIONS = ("ceiling", "n100", "main", "periodic", "float64", "e2e", "cache")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (< 2 min): a smoke test")
    p.add_argument("--scale-1e6", dest="scale_1e6", action="store_true",
                   help="also one N = 10^6 end-to-end run with peak memory per worker (~10+ min)")
    p.add_argument("--out", help="results folder (default benchmarks/results, or benchmarks/results/quick "
                                 "with --quick)")
    p.add_argument("--markdown", help="where to write BENCHMARKS.md (default: the repository root for a "
                                      "full CPU run, else the results folder)")
    p.add_argument("--only", help=f"comma-separated sections to run ({','.join(SECTIONS)}); "
                                  f"for development")
    p.add_argument("--no-keops", dest="keops", action="store_false", help="skip KeOps")
    p.add_argument("--gpu", action="store_true", help="the GPU subset only (kgrad in-process + end to end)")
    p.add_argument("--gpu-n", dest="gpu_n", type=int, default=SCALE_1E6, help=argparse.SUPPRESS)
    p.add_argument("--scale-n", dest="scale_n", type=int, default=SCALE_1E6, help=argparse.SUPPRESS)
    p.add_argument("--gpu-deadline", dest="gpu_deadline", type=float, default=420.0,
                   help="--gpu: start no new step after this many seconds (default 420)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "gpu" if args.gpu else ("quick" if args.quick else "full")
    default_out = {"quick": "benchmarks/results/quick", "gpu": "benchmarks/results/gpu"}.get(mode,
                                                                                             "benchmarks/results")
    args.out = os.path.abspath(args.out or os.path.join(M.REPO, default_out))
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        print(f"run.py: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    h = Harness(args, mode)
    print(f"kgrad benchmarks ({mode}) -> {args.out}", flush=True)
    h.results["machine"] = M.machine_info()
    if args.keops and (mode == "gpu" or only & {"n100", "main"}):
        ok, why = F.keops_available()
        h.keops = ok
        h.results["machine"]["keops_status"] = why if not ok else f"pykeops {why}, CPU"
        if not ok:
            h.skip("all", "keops", why)
            print(f"  KeOps skipped: {why}", flush=True)
    elif not args.keops:
        h.skip("all", "keops", "--no-keops given")
    if mode == "gpu":
        h.gpu()
    else:
        if "ceiling" in only:
            h.ceilings("float32")
        for name in ("n100", "main", "periodic", "float64", "e2e", "cache"):
            if name in only:
                getattr(h, {"main": "main_table"}.get(name, name))()
                print(f"  [{time.perf_counter() - h._t0:.0f} s elapsed]", flush=True)
        if args.scale_1e6:
            h.scale_1e6()
        else:
            h.skip("scale_1e6", "kgrad_e2e", "N = 10^6 end to end is off by default (~10+ min): pass --scale-1e6",
                   SCALE_1E6)
        if "ceiling" in only:  # again at the end: the ceiling is the best of both
            h.ceilings("float32", when="end")
            if "float64" in only:
                h.ceilings("float64", when="end")
    h.results["machine"]["loadavg_end"] = list(os.getloadavg())
    h.save()
    png = report.plot(h.results, os.path.join(args.out, "throughput.png"))
    markdown = args.markdown or (os.path.join(M.REPO, "BENCHMARKS.md") if mode == "full" and not args.only
                                 else os.path.join(args.out, "BENCHMARKS.md"))
    text = report.markdown(h.results, png, markdown)
    with open(markdown, "w") as f:
        f.write(text)
    if os.path.abspath(markdown) != os.path.join(args.out, "BENCHMARKS.md"):
        shutil.copyfile(markdown, os.path.join(args.out, "BENCHMARKS.md"))
    h.save()
    print(report.console_table(h.results))
    print(f"wrote {os.path.join(args.out, 'results.json')}, {png}, {markdown} "
          f"in {h.results['elapsed_s']:.0f} s", flush=True)
    return 1 if h.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
