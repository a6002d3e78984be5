"""Error-bounded pruning (``kgrad run --tolerance``) on clustered 3-D data, side by side in one run with dense
kgrad, scikit-learn's tree KDE and KeOps, and its measured error against the bound it promises.

    python benchmarks/pruning.py                  # N = 10^5, 10^6, 10^7 -> benchmarks/results/pruning.* + BENCHMARKS.md
    python benchmarks/pruning.py --quick          # N = 10^4, 10^5, a smoke test -> benchmarks/results/quick/
    python benchmarks/pruning.py --max-n 1000000  # only the sizes up to 10^6

Data: ``CLUSTERS`` isotropic Gaussian clusters of standard deviation ``CLUSTER_WIDTH``, centres uniform in
[0, BOX]^3, each point's cluster drawn at random (so the rows come in random order), float64, seed ``SEED``,
cached as .npy in ``benchmarks/_work/pruning/``.  Sources = points with unit weights (M = N), RBF kernel with
variance 1 and lengthscale ``LENGTHSCALE`` (a fifth of the cluster width: a point's sums come from the few hundred
points of its neighbourhood, and almost all of the N * M pairs are negligible).  The contract of ``--tolerance EPS``: per query,
|g^_j - g_j| <= EPS sum_i |w_i| gmax and |v^_j - v_j| <= EPS sum_i |w_i| kmax (RBF: kmax = 1,
gmax = exp(-1/2) / l).  Methods, at every size unless said otherwise:

* ``kgrad_tolerance``: ``python -m pipeline run --points P.npy --kernel rbf --lengthscale 0.2 --tolerance 1e-9
  --out OUT --overwrite --no-progress`` in a fresh process (``measure.run_kgrad``), float32, g and v; the
  output's attributes give the pairs computed and the bound.  ``kgrad_tolerance_float64``: the same with
  ``--dtype float64`` up to ``float64_max``, where float32 rounding does not cover the pruning's own error.
* ``kgrad_dense``: the same run without ``--tolerance``, at the smallest size N0 only; above it extrapolated as
  a + b N^2, with b (seconds per pair) from the execute times at N0 and N0 / 10, and a the rest of the wall
  time at N0 (start-up, and what each task costs whatever its size).
* ``sklearn``: ``KernelDensity(kernel="gaussian", bandwidth=LENGTHSCALE, rtol=1e-8, algorithm="kd_tree")``, in
  this process (one core), fit on all N, ``score_samples`` of all N queries up to ``sklearn_all_max``; above it
  of a random sample, extrapolated to N queries by its time per query.  Values only (log density, normalised:
  v = exp(score) N (2 pi l^2)^(3/2)).
* ``keops``: KeOps on the CPU, dense, gradient only (``formulations.keops_rbf``), float32, at the smallest size;
  above it extrapolated as time * (N / N0)^2.  Optional: skipped with the reason when pykeops is missing.
* accuracy: a float64 numpy oracle (exact differences) at a random sample of queries, against every method's
  output there: max_j |g^_j - g_j| / (sum|w| gmax) and max_j |v^_j - v_j| / (sum|w| kmax), the bound's own
  units (next to EPS), and max |g^ - g| / max |g| (elementwise, the project's float32 measure).
* large bandwidth: N = the smallest size, lengthscale ``WIDE_LENGTHSCALE`` (ten box widths: nothing can be
  pruned), kgrad with ``--tolerance`` against dense, end to end, alternating; the overhead of the tolerance path.

Every kgrad run uses one persistent compilation cache, filled first by unrecorded warm-up runs at N = 10^4.
Outputs: ``pruning.json`` (every measurement, the machine, load average at start and end) and ``pruning.png``
(time against N) in ``benchmarks/results/`` and the pruning section of the root ``BENCHMARKS.md`` (between
``report.PRUNING_BEGIN`` and ``report.PRUNING_END``); ``--quick``: ``benchmarks/results/quick/``, with the
section in ``pruning.md`` there.  Exit status 1 when a measurement failed (recorded; the others still run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import formulations as F  # noqa: E402
import measure as M  # noqa: E402
import report  # noqa: E402

LENGTHSCALE = 0.2  # RBF lengthscale = KDE bandwidth: a fifth of CLUSTER_WIDTH: neighbourhoods of hundreds of points
CLUSTER_WIDTH = 1.0  # standard deviation of each (isotropic) cluster
CLUSTERS = 2000  # cluster centres, uniform in [0, BOX]^3
BOX = 100.0
SEED = 0
TOLERANCE = 1e-9  # --tolerance EPS
SKLEARN_RTOL = 1e-8
WIDE_LENGTHSCALE = 1000.0  # the large-bandwidth case: ten box widths, so no pair is negligible
WARMUP_N = 10**4  # the warm-up runs that fill the compilation cache
UNDERFLOW = 40.0  # lengthscales: exp(-40^2 / 2) = exp(-800) is exactly 0.0 in float64 (below exp(-745))
TIMEOUT_S = 3 * 3600  # one kgrad run


def _num(value: float) -> str:
    """1e-09 -> 1e-9, 0.1 -> 0.1: for flags and text."""
    return f"{value:g}".replace("e-0", "e-").replace("e+0", "e+")


MODES = {
    "quick": dict(sizes=[10**4, 10**5], oracle_queries=500, sklearn_all_max=10**4, sklearn_sample=5000,
                  float64_max=10**5, wide_repeats=1),
    "full": dict(sizes=[10**5, 10**6, 10**7], oracle_queries=2000, sklearn_all_max=10**6, sklearn_sample=20000,
                 float64_max=10**6, wide_repeats=3),
}
LABELS = {
    "kgrad_tolerance": f"kgrad --tolerance {_num(TOLERANCE)}, float32 (g, v; end to end)",
    "kgrad_tolerance_float64": f"kgrad --tolerance {_num(TOLERANCE)}, float64 (g, v; end to end)",
    "kgrad_dense": "kgrad dense, float32 (g, v; end to end)",
    "sklearn": f"scikit-learn KernelDensity kd_tree, rtol {_num(SKLEARN_RTOL)} (v; fit + score, 1 core)",
    "keops": "KeOps CPU dense, float32 (g)",
}


# The large-bandwidth case compares these (medians); the cluster's start varies by a second from run to run.
WIDE_MEASURES = {
    "wall": lambda r: r["wall_s"],
    "kgrad total without the cluster start": lambda r: r["kgrad_total_s"] - r["cluster_start_s"],
    "execute": lambda r: r["execute_s"],
}


def gmax(lengthscale: float) -> float:
    """max |grad_q k| of the RBF with variance 1 (at r = l); kmax = 1."""
    return float(np.exp(-0.5) / lengthscale)


# ----------------------------------------------------------------------------- data and the oracle


def clustered_points(n: int, work: str) -> str:
    """The .npy file of the benchmark's N points (written once, atomically, then reused)."""
    path = os.path.join(work, f"clusters-{n}-seed{SEED}.npy")
    if not os.path.exists(path):
        centres = np.random.default_rng(SEED).uniform(0.0, BOX, (CLUSTERS, 3))  # the same at every N
        rng = np.random.default_rng([SEED, n])
        x = centres[rng.integers(0, CLUSTERS, n)]
        x += rng.standard_normal((n, 3)) * CLUSTER_WIDTH
        partial = path + ".partial.npy"
        np.save(partial, x)
        os.replace(partial, path)
    return path


def oracle(x: np.ndarray, queries: np.ndarray, lengthscale: float, *, window: bool = True,
           block: int = 32, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """float64 g and v at ``queries`` over all sources ``x`` (unit weights, variance 1), exact differences.

    With ``window``, each block of queries (sorted by their first coordinate) visits only the sources within
    ``UNDERFLOW`` lengthscales of it in that coordinate: every term it leaves out is exp(-r^2 / 2 l^2) with
    r >= 40 l, which is exactly 0.0 in float64, so the result is still the float64 sum over all N sources
    (``window=False`` visits every source; the run compares the two at its smallest size).  Blocks run on
    a thread per core (numpy releases the GIL).
    """
    order = np.argsort(x[:, 0], kind="stable")
    xs = x[order]
    first = np.ascontiguousarray(xs[:, 0])
    rows_by_first = np.argsort(queries[:, 0], kind="stable")
    reach = UNDERFLOW * lengthscale if window else np.inf
    g = np.zeros_like(queries)
    v = np.zeros(len(queries))

    def one_block(start):
        rows = rows_by_first[start:start + block]
        q = queries[rows]
        lo = np.searchsorted(first, q[:, 0].min() - reach)
        hi = np.searchsorted(first, q[:, 0].max() + reach, side="right")
        gb = np.zeros_like(q)
        vb = np.zeros(len(q))
        for c in range(lo, hi, chunk):
            s = xs[c:min(c + chunk, hi)]
            d = [s[None, :, i] - q[:, i, None] for i in range(3)]  # x_i - q, one array per coordinate
            k = np.exp((d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) * (-0.5 / lengthscale**2))
            vb += k.sum(axis=1)
            gb += np.stack([np.einsum("qm,qm->q", k, di) for di in d], axis=1)  # sum_i k_i (x_i - q)
        g[rows] = gb / lengthscale**2  # grad_q k = k (x - q) / l^2
        v[rows] = vb

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one_block, range(0, len(queries), block)))
    return g, v


def accuracy(n: int, ref, g=None, v=None) -> dict:
    """A method's error at the oracle's queries: in the bound's units (the largest per-query |error| over
    sum|w| gmax, resp. sum|w| kmax; sum|w| = N) and relative to the largest value (elementwise)."""
    g_ref, v_ref = ref
    out = {}
    if g is not None:
        out["gradient_over_scale"] = float(np.linalg.norm(g - g_ref, axis=1).max() / (n * gmax(LENGTHSCALE)))
        out["gradient_rel_to_max"] = F.relative_error(g, g_ref)
    if v is not None:
        out["value_over_scale"] = float(np.abs(v - v_ref).max() / n)
        out["value_rel_to_max"] = F.relative_error(v, v_ref)
        out["value_rel_pointwise"] = float(np.max(np.abs(v - v_ref) / v_ref))
    return out


def read_rows(out: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g and v of a kgrad output at ``rows``, as float64."""
    import zarr

    group = zarr.open_group(out, mode="r")
    return (np.asarray(group["gradient"][:])[rows].astype(np.float64),
            np.asarray(group["value"][:])[rows].astype(np.float64))


# ----------------------------------------------------------------------------- the run


class Bench:
    """Runs the measurements into one results dict, written after every step."""

    def __init__(self, args, mode: str):
        self.args = args
        self.mode = mode
        self.cfg = MODES[mode]
        self.sizes = [n for n in self.cfg["sizes"] if n <= args.max_n]
        self.out = os.path.join(M.REPO, "benchmarks", "results", *(("quick",) if mode == "quick" else ()))
        self.work = os.path.join(M.REPO, "benchmarks", "_work", "pruning")
        self.cache = os.path.join(self.work, "jax-cache")
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        self.keops = False
        self.results = {
            "mode": mode, "command": " ".join(["python", "benchmarks/pruning.py", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {},
            "data": {"clusters": CLUSTERS, "box": BOX, "cluster_width": CLUSTER_WIDTH, "seed": SEED, "dim": 3,
                     "dtype": "float64", "sources": "the points", "weights": "ones"},
            "kernel": {"name": "rbf", "variance": 1.0, "lengthscale": LENGTHSCALE, "kmax": 1.0,
                       "gmax": gmax(LENGTHSCALE)},
            "tolerance": TOLERANCE, "sklearn_rtol": SKLEARN_RTOL, "sizes": self.sizes, "config": self.cfg,
            "warmup": [], "measurements": [], "oracle": [], "wide": {}, "summary": [], "checks": [],
            "skipped": [], "errors": []}
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------------- bookkeeping

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self._t0, 1)
        with open(os.path.join(self.out, "pruning.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))

    def error(self, method: str, n, what) -> None:
        text = (what if isinstance(what, str) else "".join(traceback.format_exception_only(type(what), what))).strip()
        print(f"  ! {method} N={n}: {text[-600:]}", flush=True)
        self.results["errors"].append({"method": method, "N": n, "error": text[-1500:]})

    def check(self, ok: bool, message: str) -> None:
        """A property of kgrad's output that should hold; a failure is listed, not fatal."""
        if not ok:
            print(f"  ! check: {message}", flush=True)
            self.results["checks"].append(message)

    def add(self, method: str, n: int, seconds: float, **extra) -> dict:
        rec = {"method": method, "label": LABELS[method], "N": n, "M": n, "pairs": n * n, "seconds": seconds,
               "extrapolated": False, **extra}
        self.results["measurements"].append(rec)
        acc = rec.get("accuracy") or {}
        print(f"  {method:<24} N={n:<9} {'~' if rec['extrapolated'] else ' '}{report._s(seconds):>9}"
              + (f"  pairs {rec['pairs_fraction']:.2e} of N*M" if rec.get("pairs_fraction") is not None else "")
              + "".join(f"  {k} {v:.1e}" for k, v in acc.items() if k.endswith("scale")), flush=True)
        return rec

    def find(self, method: str, n: int) -> dict | None:
        return next((r for r in self.results["measurements"] if r["method"] == method and r["N"] == n), None)

    # ------------------------------------------------------------------------- kgrad end to end

    def kgrad(self, points: str, name: str, *, lengthscale: float = LENGTHSCALE, tolerance: float | None = None,
              dtype: str = "float32", method: str | None = None) -> dict | str:
        """One ``kgrad run`` in a fresh process: its wall time and its output's attributes; or the error text."""
        import zarr

        extra = ["--kernel", "rbf", "--lengthscale", _num(lengthscale)]
        if tolerance is not None:
            extra += ["--tolerance", _num(tolerance)]
        if method is not None:
            extra += ["--method", method]
        if dtype != "float32":
            extra += ["--dtype", dtype]
        out = os.path.join(self.work, f"out-{name}.zarr")
        info = M.run_kgrad(points, out, cache_dir=self.cache, extra_args=extra, timeout=TIMEOUT_S,
                           log_dir=os.path.join(self.work, "logs"))
        if info["returncode"] != 0:
            return info.get("error") or f"kgrad run exited {info['returncode']} (log {info['log']})"
        attrs = dict(zarr.open_group(out, mode="r").attrs)
        t = attrs.get("timings") or {}
        run = {"wall_s": info["wall_s"], "kgrad_total_s": t.get("total_seconds"),
               "execute_s": t.get("execute_seconds"), "cluster_start_s": t.get("cluster_start_seconds"),
               "compute_s_total": t.get("compute_seconds_total"), "tasks": t.get("tasks_run"),
               "plan_estimated_pairs": info["plan"].get("estimated_pairs"),
               "plan_estimated_seconds": info["plan"].get("estimated_seconds"), "workers": len(t.get("worker_pids", [])), "dtype": dtype,
               "lengthscale": lengthscale, "peak_rss_worker_max_bytes": max(info["peak_rss_per_worker_bytes"] or [0]),
               "command": info["command"], "log": info["log"], "out": out}
        if tolerance is not None:
            run.update({key: attrs.get(key) for key in ("tolerance", "error_bound", "pairs_computed", "pairs_total",
                                                        "pruned", "exact_reason")})
            run["method_used"] = attrs.get("method")
            missing = [key for key in ("tolerance", "error_bound", "pairs_computed", "pairs_total", "timings")
                       if key not in attrs]
            if missing:
                return f"{out} lacks the attribute(s) {', '.join(missing)}"
            run["pairs_fraction"] = attrs["pairs_computed"] / attrs["pairs_total"]
        return run

    def kgrad_record(self, method: str, n: int, points: str, ref, rows, **kw) -> dict | None:
        """A measured kgrad run at size n: its record with accuracy at the oracle's queries, checks on its
        attributes; None (error recorded) if it failed."""
        run = self.kgrad(points, f"{method}-{n}", **kw)
        if isinstance(run, str):
            self.error(method, n, run)
            return None
        g, v = read_rows(run["out"], rows)
        acc = accuracy(n, ref, g, v)
        if "tolerance" in kw:
            self.contract_checks(method, n, run, acc)
        return self.add(method, n, run["wall_s"], accuracy=acc, **run)

    def contract_checks(self, method: str, n: int, run: dict, acc: dict) -> None:
        """The output's attributes against the contract; for float64 runs, the measured error against EPS."""
        bound = run["error_bound"] or {}
        want = {"gradient": TOLERANCE * n * gmax(LENGTHSCALE), "value": TOLERANCE * n * 1.0}
        self.check(run["pairs_total"] == n * n, f"{method} N={n}: pairs_total {run['pairs_total']} != N*M = {n * n}")
        self.check(0 < run["pairs_computed"] <= run["pairs_total"],
                   f"{method} N={n}: pairs_computed {run['pairs_computed']} not in (0, N*M]")
        self.check(run["tolerance"] == TOLERANCE, f"{method} N={n}: tolerance attribute {run['tolerance']!r}")
        for key, value in want.items():
            got = bound.get(key)
            self.check(got is not None and abs(got - value) <= 1e-6 * value,
                       f"{method} N={n}: error_bound[{key!r}] = {got!r}, expected EPS sum|w| "
                       f"{'gmax' if key == 'gradient' else 'kmax'} = {value:.6g}")
        if run["dtype"] == "float64":
            for key in ("gradient", "value"):
                measured = acc[f"{key}_over_scale"]
                self.check(measured <= TOLERANCE, f"{method} N={n}: measured {key} error {measured:.3g} x the "
                                                  f"bound's scale exceeds EPS = {_num(TOLERANCE)}")

    # ------------------------------------------------------------------------- steps

    def warmup(self) -> None:
        """Unrecorded kgrad runs at N = 10^4 that fill the compilation cache for every configuration."""
        print(f"warm-up: kgrad at N = {WARMUP_N} (fills the compilation cache)", flush=True)
        points = clustered_points(WARMUP_N, self.work)
        for lengthscale in (LENGTHSCALE, WIDE_LENGTHSCALE):
            for tolerance in (None, TOLERANCE):
                run = self.kgrad(points, "warmup", lengthscale=lengthscale, tolerance=tolerance)
                ok = not isinstance(run, str)
                self.results["warmup"].append({"lengthscale": lengthscale, "tolerance": tolerance,
                                               "wall_s": run["wall_s"] if ok else None,
                                               "error": None if ok else run[-600:]})
                print(f"  lengthscale {lengthscale:g}, tolerance {tolerance}: "
                      + (report._s(run["wall_s"]) if ok else "failed"), flush=True)
        self.save()

    def size(self, n: int) -> None:
        """Every measurement at one size."""
        print(f"N = {n}", flush=True)
        cfg = self.cfg
        points = clustered_points(n, self.work)
        x = np.load(points)
        picks = np.random.default_rng([SEED, n, 1]).choice(n, max(cfg["oracle_queries"], cfg["sklearn_sample"]),
                                                           replace=False)
        rows = picks[:cfg["oracle_queries"]]
        started = time.perf_counter()
        ref = oracle(x, x[rows], LENGTHSCALE)
        info = {"N": n, "queries": len(rows), "seconds": time.perf_counter() - started,
                "max_abs_g": float(np.abs(ref[0]).max()), "max_v": float(ref[1].max()),
                "median_v": float(np.median(ref[1]))}
        if n == self.sizes[0]:  # the window leaves out only terms that are exactly 0.0: compare with all
            full = oracle(x, x[rows], LENGTHSCALE, window=False)
            info["window_vs_all_sources"] = max(F.relative_error(ref[0], full[0]), F.relative_error(ref[1], full[1]))
            self.check(info["window_vs_all_sources"] <= 1e-12, f"oracle N={n}: windowed sum differs from the sum "
                                                              f"over all sources by {info['window_vs_all_sources']:.2g}")
        self.results["oracle"].append(info)
        print(f"  oracle: {len(rows)} queries in {info['seconds']:.1f} s, max v {info['max_v']:.4g}, "
              f"median v {info['median_v']:.4g}", flush=True)

        self.kgrad_record("kgrad_tolerance", n, points, ref, rows, tolerance=TOLERANCE)
        self.save()
        if n <= cfg["float64_max"]:
            self.kgrad_record("kgrad_tolerance_float64", n, points, ref, rows, tolerance=TOLERANCE, dtype="float64")
            self.save()
        if n == self.sizes[0]:
            self.kgrad_record("kgrad_dense", n, points, ref, rows)
            small = self.kgrad(clustered_points(n // 10, self.work), f"kgrad_dense-{n // 10}")
            if isinstance(small, str):
                self.error("kgrad_dense", n // 10, small)
            else:
                self.results["dense_small"] = {"N": n // 10, "wall_s": small["wall_s"], "execute_s": small["execute_s"]}
                print(f"  kgrad_dense              N={n // 10:<9}  {report._s(small['wall_s']):>9}  execute "
                      f"{report._s(small['execute_s'])} (for the extrapolation)", flush=True)
            self.save()
        self.sklearn(n, x, picks, ref)
        self.save()
        if n == self.sizes[0] and self.keops:
            self.keops_dense(n, x, rows, ref)
            self.save()

    def sklearn(self, n: int, x: np.ndarray, picks: np.ndarray, ref) -> None:
        """scikit-learn's tree KDE: fit on all N, score all N queries (or a sample, extrapolated)."""
        try:
            from sklearn.neighbors import KernelDensity

            started = time.perf_counter()
            kde = KernelDensity(kernel="gaussian", bandwidth=LENGTHSCALE, rtol=SKLEARN_RTOL,
                                algorithm="kd_tree").fit(x)
            fit = time.perf_counter() - started
            sampled = n > self.cfg["sklearn_all_max"]
            queries = x[picks] if sampled else x
            started = time.perf_counter()
            score = kde.score_samples(queries)
            scoring = time.perf_counter() - started
        except Exception as exc:  # one broken method must not end the run
            self.error("sklearn", n, exc)
            return
        del kde
        at_oracle = score[:self.cfg["oracle_queries"]] if sampled else score[picks[:self.cfg["oracle_queries"]]]
        v = np.exp(at_oracle) * n * (2.0 * np.pi * LENGTHSCALE**2) ** 1.5  # back from the normalised density
        import sklearn

        rec = self.add("sklearn", n, fit + scoring * n / len(queries), fit_s=fit, score_s=scoring,
                       queries_scored=len(queries), accuracy=accuracy(n, ref, v=v), sklearn=sklearn.__version__)
        kgrad = self.find("kgrad_tolerance", n)
        if kgrad:  # the sanity check: the same v as kgrad's, up to the normalisation
            v_kgrad = read_rows(kgrad["out"], picks[:self.cfg["oracle_queries"]])[1]
            rec["value_vs_kgrad_tolerance"] = float(np.max(np.abs(v - v_kgrad) / v_kgrad))
        if sampled:
            rec.update(extrapolated=True, basis=f"fit on all N ({report._s(fit)}) + score_samples of {len(queries)} "
                                                f"random queries ({report._s(scoring)}) x N / {len(queries)}")

    def keops_dense(self, n: int, x: np.ndarray, rows: np.ndarray, ref) -> None:
        """KeOps on the CPU, dense gradient (unit lengthscale on x / l, then scaled back), one timed call."""
        try:
            fn = F.keops_rbf()
            u = ((x - BOX / 2) / LENGTHSCALE).astype(np.float32)  # centred: float32 keeps more digits
            fn(u[:1000])  # KeOps builds (or loads) its module for this formula here, not in the timed call
            started = time.perf_counter()
            g = fn(u)
            seconds = time.perf_counter() - started
        except Exception as exc:
            self.error("keops", n, exc)
            return
        g = np.asarray(g, np.float64)[rows] / LENGTHSCALE  # sum (u_i - u_q) k = l * sum (x_i - q) k / l^2
        self.add("keops", n, seconds, accuracy=accuracy(n, ref, g=g), pykeops=self.results["machine"].get("pykeops"))

    def wide(self) -> None:
        """Lengthscale WIDE_LENGTHSCALE: nothing prunes; --tolerance against dense, alternating, end to end
        (``auto`` picks the method: the far field there, a few grid nodes holding every source)."""
        n = self.sizes[0]
        print(f"large bandwidth: lengthscale {WIDE_LENGTHSCALE:g}, N = {n}, tolerance vs dense", flush=True)
        points = clustered_points(n, self.work)
        runs = {"dense": [], "tolerance": []}
        for _ in range(self.cfg["wide_repeats"]):
            for kind, tolerance in (("dense", None), ("tolerance", TOLERANCE)):
                run = self.kgrad(points, f"wide-{kind}-{n}", lengthscale=WIDE_LENGTHSCALE, tolerance=tolerance)
                if isinstance(run, str):
                    self.error(f"wide_{kind}", n, run)
                    return
                runs[kind].append(run)
                print(f"  {kind:<9} wall {report._s(run['wall_s'])}, execute {report._s(run['execute_s'])}"
                      + (f", pairs {run['pairs_fraction']:.4f} of N*M" if tolerance else ""), flush=True)
        dense, tol = runs["dense"][-1], runs["tolerance"][-1]
        g_dense, _ = read_rows(dense["out"], slice(None))
        g_tol, _ = read_rows(tol["out"], slice(None))
        medians = {measure: {kind: M.median([seconds(r) for r in v]) for kind, v in runs.items()}
                   for measure, seconds in WIDE_MEASURES.items()}
        self.results["wide"] = {
            "N": n, "lengthscale": WIDE_LENGTHSCALE, "repeats": self.cfg["wide_repeats"], "runs": runs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "median_s": medians, "overhead": {m: t["tolerance"] / t["dense"] - 1.0 for m, t in medians.items()},
            "pairs_fraction": tol["pairs_fraction"], "tolerance_vs_dense_rel": F.relative_error(g_tol, g_dense)}
        w = self.results["wide"]
        print(f"  overhead of --tolerance: {_overheads(w)}; outputs differ by {w['tolerance_vs_dense_rel']:.1e} of "
              "max |g|", flush=True)
        w["method"] = tol.get("method_used")
        self.check(w["method"] != "pruned" or tol["pairs_fraction"] == 1.0,
                   f"large bandwidth N={n}: the pruned method skipped pairs (pairs_computed / N*M = "
                   f"{tol['pairs_fraction']}): nothing should be pruned")
        self.save()

    def extrapolate(self) -> None:
        """Dense kgrad and KeOps at the sizes above the one they ran at: time ~ N^2 (kgrad: a + b N^2)."""
        n0 = self.sizes[0]
        dense, small, keops = self.find("kgrad_dense", n0), self.results.get("dense_small"), self.find("keops", n0)
        for n in self.sizes[1:]:
            scale = (n / n0) ** 2
            if dense and small:
                per_pair = (dense["execute_s"] - small["execute_s"]) / (n0**2 - small["N"] ** 2)
                fixed = dense["seconds"] - per_pair * n0**2
                self.add("kgrad_dense", n, fixed + per_pair * n * n, extrapolated=True,
                         basis=f"{report._s(fixed)} + N^2 x {1e9 * per_pair:.3g} ns per pair ({1e-9 / per_pair:.3g} G "
                               f"pairs/s: the execute times at N = {small['N']} and {n0}; the rest of the wall time "
                               f"at N = {n0})")
            if keops:
                self.add("keops", n, keops["seconds"] * scale, extrapolated=True,
                         basis=f"{report._s(keops['seconds'])} at N = {n0} "
                               f"({n0 * n0 / keops['seconds'] / 1e9:.3g} G pairs/s) x (N / {n0})^2")

    def summarize(self) -> None:
        """Per size: each method's time over kgrad --tolerance's (above 1: kgrad with the tolerance is faster)."""
        rows = []
        for n in self.sizes:
            tol = self.find("kgrad_tolerance", n)
            row = {"N": n, "kgrad_tolerance_s": tol and tol["seconds"],
                   "pairs_fraction": tol and tol.get("pairs_fraction")}
            for method in ("kgrad_dense", "sklearn", "keops"):
                rec = self.find(method, n)
                row[f"{method}_s"] = rec and rec["seconds"]
                row[f"{method}_extrapolated"] = bool(rec and rec["extrapolated"])
                row[f"{method}_over_tolerance"] = rec["seconds"] / tol["seconds"] if rec and tol else None
            rows.append(row)
        self.results["summary"] = rows


# ----------------------------------------------------------------------------- plot and text


def plot(results, path: str) -> str:
    """Time against N, log-log, one line per method; extrapolated points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    for i, method in enumerate(LABELS):
        recs = sorted((r for r in results["measurements"] if r["method"] == method), key=lambda r: r["N"])
        if not recs:
            continue
        color = f"C{i}"
        measured = [r for r in recs if not r["extrapolated"]]
        ax.plot([r["N"] for r in measured], [r["seconds"] for r in measured], "-o", color=color, ms=7,
                label=LABELS[method])
        extrapolated = [r for r in recs if r["extrapolated"]]
        ax.plot([r["N"] for r in measured[-1:] + extrapolated], [r["seconds"] for r in measured[-1:] + extrapolated],
                "--", color=color)
        ax.plot([r["N"] for r in extrapolated], [r["seconds"] for r in extrapolated], "o", color=color, ms=7,
                mfc="none")
    ax.plot([], [], "o--", color="0.4", mfc="none", label="hollow, dashed: extrapolated, not run")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N points (= M sources), D = 3, clustered")
    ax.set_ylabel("seconds for all N queries")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    machine = results.get("machine", {})
    ax.set_title(f"RBF lengthscale {LENGTHSCALE:g}, {CLUSTERS} clusters of width {CLUSTER_WIDTH:g} in "
                 f"[0, {BOX:g}]^3 ({results['mode']} run) -- {machine.get('cpu_model', '?')}, "
                 f"{machine.get('cpus_usable', '?')} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _t(rec_seconds, extrapolated) -> str:
    return "-" if rec_seconds is None else ("~" if extrapolated else "") + report._s(rec_seconds)


def _ratio(value, extrapolated) -> str:
    return "-" if value is None else ("~" if extrapolated else "") + f"{value:.3g}x"


def _overheads(wide: dict) -> str:
    return ", ".join(f"{100 * value:+.1f}% {measure}" for measure, value in wide["overhead"].items())


def _e(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def near_field_rates(results) -> str:
    """The pruned runs' rate of computed pairs against the dense tiles' on the same data: execute time (the
    tasks, the workers' start-up included), and between the two largest N (what each added pair cost)."""
    small, dense = results.get("dense_small"), next((r for r in results["measurements"] if r["method"] == "kgrad_dense"
                                                      and not r["extrapolated"]), None)
    pruned = sorted((r for r in results["measurements"] if r["method"] == "kgrad_tolerance" and r.get("execute_s")),
                    key=lambda r: r["N"])
    if not (small and dense and pruned):
        return "Near-field rate: not measured (needs the dense runs and the pruned runs)."
    dense_rate = (dense["N"] ** 2 - small["N"] ** 2) / (dense["execute_s"] - small["execute_s"])
    parts = [f"{report._g(r['pairs_computed'] / r['execute_s'])} at N = {r['N']} "
             f"({r['pairs_computed'] / r['execute_s'] / dense_rate:.2f} of dense)" for r in pruned]
    text = (f"Near-field rate (pairs computed per second of execute, both workers): the dense tiles "
            f"{report._g(dense_rate)} (the added pairs between N = {small['N']} and {dense['N']}); the pruned runs "
            + ", ".join(parts))
    if len(pruned) >= 2:
        a, b = pruned[-2], pruned[-1]
        added = (b["pairs_computed"] - a["pairs_computed"]) / (b["execute_s"] - a["execute_s"])
        text += (f"; the added pairs between N = {a['N']} and {b['N']}: {report._g(added)} "
                 f"({added / dense_rate:.2f} of dense)")
    return text + ". A pruned run's execute time includes each worker's start-up (JAX, compiled code) and its " \
        "selection of the pairs, which weigh most at small N."


def markdown(results, png_path: str, md_path: str) -> str:
    """The pruning section, markers included."""
    m = results.get("machine", {})
    png = os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path)))
    eps = _num(results["tolerance"])
    cfg = results["config"]
    lines = [
        report.PRUNING_BEGIN,
        "## Error-bounded pruning on clustered data (`--tolerance`)",
        "",
        f"g and v for N clustered points in 3-D against M = N sources (the points, unit weights): {CLUSTERS} "
        f"Gaussian clusters of standard deviation {CLUSTER_WIDTH:g}, centres uniform in [0, {BOX:g}]^3, each "
        f"point's cluster at random (float64, seed {SEED}); RBF kernel, variance 1, lengthscale {LENGTHSCALE:g} "
        "(a fifth of the cluster width: almost all pairs are negligible). With `--tolerance EPS` kgrad promises, "
        "per query, |g^ - g| <= EPS sum|w| gmax and |v^ - v| <= EPS sum|w| kmax (kmax = 1, gmax = exp(-1/2) / l). "
        f"Generated by `benchmarks/pruning.py` ({results['mode']} run, {results['started']}, "
        f"{results.get('elapsed_s', 0):.0f} s); raw data `benchmarks/results/"
        + ("quick/" if results["mode"] == "quick" else "") + "pruning.json`.",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} cores usable, {m.get('memory_gib')} GiB RAM; "
        f"JAX {m.get('jax')}; KeOps: {m.get('keops_status') or 'not run'}. Load average (1, 5, 15 min) at start "
        f"{report._load(m.get('loadavg_start'))}, at end {report._load(m.get('loadavg_end'))}.",
        "",
        f"![pruning: time against N]({png})",
        "",
        f"### Time for all N queries (x: that method's time over kgrad `--tolerance {eps}`'s)",
        "",
    ]
    rows = []
    for s in results["summary"]:
        rows.append([s["N"], report._s(s["kgrad_tolerance_s"]),
                     _e(s["pairs_fraction"]),
                     _t(s["kgrad_dense_s"], s["kgrad_dense_extrapolated"]),
                     _ratio(s["kgrad_dense_over_tolerance"], s["kgrad_dense_extrapolated"]),
                     _t(s["sklearn_s"], s["sklearn_extrapolated"]),
                     _ratio(s["sklearn_over_tolerance"], s["sklearn_extrapolated"]),
                     _t(s["keops_s"], s["keops_extrapolated"]),
                     _ratio(s["keops_over_tolerance"], s["keops_extrapolated"])])
    lines += report._table(["N", f"kgrad --tolerance {eps} (g, v)", "pairs computed / N*M", "kgrad dense (g, v)",
                            "x", "scikit-learn (v)", "x", "KeOps CPU dense (g)", "x"], rows)
    extrapolated = [f"{r['label']} at N = {r['N']}: {r['basis']}" for r in results["measurements"]
                    if r["extrapolated"]]
    if extrapolated:
        lines += ["", "`~`: extrapolated, not run: " + "; ".join(extrapolated) + "."]
    lines += [
        "",
        "kgrad: the whole `python -m pipeline run --points P.npy --kernel rbf --lengthscale "
        f"{_num(LENGTHSCALE)} [--tolerance {eps}] --out OUT --overwrite --no-progress` process (Python start-up, the "
        "local dask cluster with one worker per core, reading the .npy, writing the zarr output), float32, with a "
        f"warm compilation cache (unrecorded warm-up runs at N = {WARMUP_N} first). scikit-learn: "
        f"`KernelDensity(kernel=\"gaussian\", bandwidth={_num(LENGTHSCALE)}, rtol={_num(results['sklearn_rtol'])}, "
        "algorithm=\"kd_tree\")` fit on all N and `score_samples`, in memory, one core (it has no parallel option), "
        "values only; its rtol bounds each value's error relative to that value, tighter than kgrad's bound where "
        "the density is low; its log densities, converted back (v = exp(score) N (2 pi l^2)^(3/2)), agree with "
        "kgrad's v at the oracle's queries to "
        + (", ".join(f"{r['value_vs_kgrad_tolerance']:.1e} (N = {r['N']})" for r in results["measurements"]
                     if r.get("value_vs_kgrad_tolerance") is not None) or "- (not compared)")
        + " (max relative difference). KeOps: one in-process call, dense, float32, gradient only.",
        "",
    ]
    kgrad_rows = [r for r in results["measurements"] if r["method"].startswith("kgrad") and not r["extrapolated"]]
    if kgrad_rows:
        lines += ["kgrad's runs:", ""]
        lines += report._table(
            ["run", "N", "wall", "kgrad total", "cluster start", "execute", "task compute (sum)", "pairs computed",
             "of N*M", "pairs computed / s of execute", "plan's estimate: pairs, compute", "peak RSS / worker"],
            [[r["label"], r["N"], report._s(r["seconds"]), report._s(r.get("kgrad_total_s")),
              report._s(r.get("cluster_start_s")), report._s(r.get("execute_s")), report._s(r.get("compute_s_total")),
              f"{r.get('pairs_computed', r['pairs']):.3g}", _e(r.get("pairs_fraction", 1.0)),
              report._g(r.get("pairs_computed", r["pairs"]) / r["execute_s"]) if r.get("execute_s") else "-",
              f"{r['plan_estimated_pairs']:.3g}, {report._s(r.get('plan_estimated_seconds'))}"
              if r.get("plan_estimated_pairs") else "-", report._b(r.get("peak_rss_worker_max_bytes"))]
             for r in sorted(kgrad_rows, key=lambda r: (r["N"], r["method"]))])
        lines += ["", near_field_rates(results), ""]
    acc_rows = [r for r in results["measurements"] if r.get("accuracy")]
    if acc_rows:
        lines += [
            "### Measured error against the bound",
            "",
            f"Against a float64 numpy oracle (exact differences, the sum over all N sources; the terms it "
            f"skips, 40 lengthscales away or more, are exp(-800) = 0.0 in float64) at {cfg['oracle_queries']} "
            "random queries. \"/ scale\": the largest "
            "per-query error over sum|w| gmax (gradient, Euclidean norm) or sum|w| kmax (value), the units of the "
            f"bound, which is EPS = {eps} there; \"/ max\": max |error| / max |oracle| over the sample, elementwise "
            "(the project's float32 measure: float32 results are documented within 2e-5 of it). float32 rounding "
            "adds its own error to the pruning's, and at these N it can exceed EPS in the bound's units; the float64 "
            "run shows the pruning's error alone.",
            "",
        ]
        lines += report._table(
            ["method", "N", "g / scale", "v / scale", "EPS", "g / max", "v / max", "v / v (pointwise)"],
            [[r["label"], r["N"], _e(r["accuracy"].get("gradient_over_scale")),
              _e(r["accuracy"].get("value_over_scale")), eps, _e(r["accuracy"].get("gradient_rel_to_max")),
              _e(r["accuracy"].get("value_rel_to_max")), _e(r["accuracy"].get("value_rel_pointwise"))]
             for r in sorted(acc_rows, key=lambda r: (r["N"], list(LABELS).index(r["method"])))])
        lines += [""]
    w = results.get("wide") or {}
    if w:
        lines += [
            f"### Nothing to prune: lengthscale {w['lengthscale']:g}, N = {w['N']}",
            "",
            f"The same data with a lengthscale of ten box widths: every pair counts. kgrad with `--tolerance {eps}` "
            f"(`--method auto`, which took the {w.get('method') or '?'} method here) against dense, end to end, "
            f"alternating, {w['repeats']} run(s) each"
            + (f" (run {w['started']}, with `--wide-only`)" if w.get("wide_only") else "")
            + ". Overhead of the tolerance path "
            f"(medians; target: at most 5%): **{_overheads(w)}**; pairs computed {w['pairs_fraction']:.4g} of N*M; "
            f"the two outputs differ by {w['tolerance_vs_dense_rel']:.2g} of max |g|.",
            "",
        ]
        lines += report._table(["run", *WIDE_MEASURES],
                               [[kind, *(", ".join(report._s(seconds(r)) for r in runs)
                                         for seconds in WIDE_MEASURES.values())]
                                for kind, runs in w["runs"].items()])
        lines += [""]
        reason = w["runs"]["tolerance"][-1].get("exact_reason")
        lines += [f"kgrad's plan for the tolerance run: \"{reason}\"", ""] if reason else []
    if results["checks"] or results["skipped"] or results["errors"]:
        lines += ["### Checks, skipped and errors", ""]
        lines += [f"- check failed: {c}" for c in results["checks"]]
        lines += [f"- skipped {s['method']}: {s['reason']}" for s in results["skipped"]]
        lines += [f"- **error** {e['method']} N = {e['N']}: `{e['error'][-300:]}`" for e in results["errors"]]
        lines += [""]
    lines.append(report.PRUNING_END)
    return "\n".join(lines)


def console(results) -> str:
    lines = ["", "summary (time for all N queries; x = over kgrad --tolerance's; ~ = extrapolated):"]
    for s in results["summary"]:
        lines.append(f"  N={s['N']:<9} tolerance {report._s(s['kgrad_tolerance_s']):>8} "
                     f"(pairs {_e(s['pairs_fraction'])} of N*M)  dense {_t(s['kgrad_dense_s'], s['kgrad_dense_extrapolated'])} "
                     f"{_ratio(s['kgrad_dense_over_tolerance'], s['kgrad_dense_extrapolated'])}  "
                     f"sklearn {_t(s['sklearn_s'], s['sklearn_extrapolated'])} "
                     f"{_ratio(s['sklearn_over_tolerance'], s['sklearn_extrapolated'])}  "
                     f"keops {_t(s['keops_s'], s['keops_extrapolated'])} "
                     f"{_ratio(s['keops_over_tolerance'], s['keops_extrapolated'])}")
    w = results.get("wide") or {}
    if w:
        lines.append(f"large bandwidth N={w['N']}: --tolerance overhead {_overheads(w)}")
    lines += [f"check failed: {c}" for c in results["checks"]]
    lines += [f"skipped {s['method']}: {s['reason']}" for s in results["skipped"]]
    lines += [f"ERROR {e['method']} N={e['N']}: {e['error'][-200:]}" for e in results["errors"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 10^4 and 10^5 only, a smoke test; writes "
                                                        "benchmarks/results/quick/ and leaves BENCHMARKS.md alone")
    p.add_argument("--max-n", dest="max_n", type=float, default=float("inf"),
                   help="run only the sizes N <= this (e.g. 1e6)")
    p.add_argument("--no-keops", dest="keops", action="store_false", help="skip KeOps")
    p.add_argument("--wide-only", dest="wide_only", action="store_true",
                   help="rerun only the large-bandwidth comparison into the last full run's results and report")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    bench = Bench(args, mode)
    if not bench.sizes:
        print(f"pruning.py: no size <= --max-n {args.max_n:g}; the sizes are {MODES[mode]['sizes']}", file=sys.stderr)
        return 2
    print(f"kgrad pruning benchmark ({mode}, N = {bench.sizes}) -> {bench.out}", flush=True)
    bench.results["machine"] = M.machine_info()
    if args.keops:
        ok, why = F.keops_available()
        bench.keops = ok
        bench.results["machine"]["keops_status"] = f"pykeops {why}, CPU" if ok else why
        if not ok:
            bench.results["skipped"].append({"method": "keops", "reason": why})
            print(f"  KeOps skipped: {why}", flush=True)
    else:
        bench.results["skipped"].append({"method": "keops", "reason": "--no-keops given"})
    if args.wide_only:  # the last run's results, with the large-bandwidth part measured again
        with open(os.path.join(bench.out, "pruning.json")) as f:
            last = json.load(f)
        bench.results.update({k: v for k, v in last.items() if k not in ("wide", "checks", "errors")})
        bench.results["checks"] = [c for c in last.get("checks", []) if not c.startswith("large bandwidth")]
        bench.results["errors"] = [e for e in last.get("errors", []) if not str(e.get("method")).startswith("wide")]
        bench.wide()
        bench.results["wide"]["wide_only"] = True
        bench._t0 -= float(last.get("elapsed_s") or 0.0)
    else:
        bench.warmup()
        for n in bench.sizes:
            bench.size(n)
            print(f"  [{time.perf_counter() - bench._t0:.0f} s elapsed]", flush=True)
        bench.wide()
        bench.extrapolate()
        bench.summarize()
    bench.results["machine"]["loadavg_end"] = list(os.getloadavg())
    bench.save()
    png = plot(bench.results, os.path.join(bench.out, "pruning.png"))
    if mode == "quick":
        markdown_path = os.path.join(bench.out, "pruning.md")
        text = markdown(bench.results, png, markdown_path) + "\n"
    else:
        markdown_path = os.path.join(M.REPO, "BENCHMARKS.md")
        existing = ""
        if os.path.exists(markdown_path):
            with open(markdown_path) as f:
                existing = f.read()
        text = report.with_marked_block(existing, markdown(bench.results, png, markdown_path))
    with open(markdown_path, "w") as f:
        f.write(text)
    print(console(bench.results))
    print(f"wrote {os.path.join(bench.out, 'pruning.json')}, {png}, {markdown_path} in "
          f"{bench.results['elapsed_s']:.0f} s", flush=True)
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
