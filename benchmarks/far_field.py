"""The far-field method (``kgrad run --tolerance EPS --method auto``) on four realistic problems, side by side in
one run with kgrad's pruning only, dense kgrad, ferreus-bbfmm, pyNFFT3 and (KDE) scikit-learn, and the measured
error of each against a float64 oracle.

    python benchmarks/far_field.py               # N = 10^5, 10^6 -> benchmarks/results/far_field.* + BENCHMARKS.md
    python benchmarks/far_field.py --max-n 1e7   # adds N = 10^7 (kgrad's far field only there, and projections)
    python benchmarks/far_field.py --quick       # N = 2 x 10^4, a smoke test -> benchmarks/results/quick/

Data (float32 points, seed ``SEED``, cached as .npy in ``benchmarks/_work/far_field/``; sources = the points,
M = N; RBF kernel, variance 1):

* ``kde``: a kernel density estimate of a 3-D mixture of ``MIXTURE`` Gaussians, centres ~ N(0, 3.5^2 I_3) (the
  same at every N), each point = a random centre + N(0, I_3); lengthscale by Scott's rule (the mean over the
  dimensions of the data's standard deviation times N^(-1/7)); unit weights.
* ``svgd``: SVGD particles ~ N(0, I_3); lengthscale by the median heuristic, med / sqrt(2 ln N) with med the
  median pairwise distance of ``MEDIAN_SAMPLE`` random points; unit weights.
* ``gp``: a 2-D field, points uniform in [0, 100]^2, lengthscale 5, weights ~ N(0, 1) (float64, ``--weights``).
* ``clustered``: the data of ``benchmarks/pruning.py`` (its generator, constants and seed) at its lengthscale
  0.2, unit weights: short range, where the far field does not pay and ``auto`` keeps the pruned method.

Methods, per case and N, one after another (kgrad: each run a fresh process, ``measure.run_kgrad``; float32;
g and v; ``--tolerance EPS``):

* ``kgrad_far_field``: ``--method auto``; the method the run used is read from its output's ``method``
  attribute (auto picks the far field where it pays: rbf, D <= 3).
* ``kgrad_pruned``: ``--method pruned`` (pruning only, as before) up to ``--pruned-max``; above it projected:
  the wall time at the largest measured N times the ratio of the pairs the pruned plan computes
  (``make_problem(..., method="pruned").plan.pairs_to_compute``, planned in this process) at the two sizes.
* ``kgrad_dense``: ``--method dense`` at the smallest N; above it projected as time * (N / N0)^2.
* ``ferreus_o6``, ``ferreus_o8``: ferreus-bbfmm (``peers.ferreus_gaussian_values``), Chebyshev order 6 and 8,
  ``FERREUS_THREADS`` threads; ``pynfft3``: pyNFFT3's fast summation (``peers.nfft_gaussian_values``) at eps
  EPS, not run where its FFT grid would not fit in ``NFFT_MEMORY_SHARE`` of the memory. Values only, float64,
  up to ``--peers-max``, each in a child process (a crash or a runaway stays there; ``PEER_TIMEOUT_S``); the
  time is the library's build + evaluation for all N queries, in memory (kgrad's: the whole process).
* ``sklearn`` (kde only, up to ``--peers-max``): ``KernelDensity(kernel="gaussian", bandwidth=l, rtol=EPS,
  algorithm="kd_tree")`` fit on all N in this process (one core), ``score_samples`` of ``SKLEARN_SAMPLE``
  random queries, the time extrapolated to N queries (marked projected); v = exp(score) N (2 pi l^2)^(3/2).

Accuracy: a float64 numpy oracle (exact differences, summed over all sources in chunks) at ``ORACLE_QUERIES``
random queries; for every method with values there, max_j |v^_j - v_j| / (S kmax), and for kgrad also
max_j |g^_j - g_j| / (S gmax) (Euclidean norm): the units of the bound, next to EPS (S = sum|w|, kmax = 1,
gmax = exp(-1/2) / l).

Every kgrad run uses one persistent compilation cache, filled first by unrecorded warm-up runs at N =
``WARMUP_N`` (each case, each of ``--method far_field``, ``pruned``, ``dense``). Outputs: ``far_field.json``
(every measurement, the commands, kgrad's timings, the machine, load average at start and end) and
``far_field.png`` (seconds against N per case, projected points hollow and dashed) in ``benchmarks/results/``,
and the section of the root ``BENCHMARKS.md`` between ``report.FAR_FIELD_BEGIN`` and ``report.FAR_FIELD_END``;
``--quick``: ``benchmarks/results/quick/``, the section in ``far_field.md`` there. Exit status 1 when a
measurement failed (recorded; the others still run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure as M  # noqa: E402
import peers  # noqa: E402
import pruning as P  # noqa: E402
import report  # noqa: E402

EPS = 1e-6  # --tolerance EPS
SEED = 0
MIXTURE = 20  # kde: Gaussian components
MIXTURE_SPREAD = 3.5  # kde: standard deviation of the components' centres
MEDIAN_SAMPLE = 2000  # svgd: points whose pairwise distances give the median heuristic
GP_BOX = 100.0  # gp: points uniform in [0, GP_BOX]^2
GP_LENGTHSCALE = 5.0
CASES = ("kde", "svgd", "gp", "clustered")
SIZES = (10**5, 10**6, 10**7)  # the run's sizes: those <= --max-n
QUICK_SIZES = (2 * 10**4,)
WARMUP_N = 4096  # the warm-up runs: tile shapes do not depend on N, so these compile what the sizes need
ORACLE_QUERIES = 200
SKLEARN_SAMPLE = 2000  # scikit-learn scores this many random queries; its time is extrapolated to N
FERREUS_ORDERS = (6, 8)
FERREUS_THREADS = 2
NFFT_MEMORY_SHARE = 0.5  # pyNFFT3 runs where its FFT grids take at most this share of the machine's memory
TIMEOUT_S = 3 * 3600  # one kgrad run
PEER_TIMEOUT_S = 1800  # one peer's child process

LABELS = {
    "kgrad_far_field": "kgrad --method auto (far field where it pays)",
    "kgrad_pruned": "kgrad --method pruned (pruning only)",
    "kgrad_dense": "kgrad --method dense",
    "ferreus_o6": "ferreus-bbfmm, order 6 (v)",
    "ferreus_o8": "ferreus-bbfmm, order 8 (v)",
    "pynfft3": f"pyNFFT3 fastsum, eps {P._num(EPS)} (v)",
    "sklearn": f"scikit-learn KernelDensity kd_tree, rtol {P._num(EPS)} (v)",
}
KGRAD_FLAGS = {"kgrad_far_field": "auto", "kgrad_pruned": "pruned", "kgrad_dense": "dense"}


# ----------------------------------------------------------------------------- data


def generate(case: str, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The case's N points (float32) and weights (float64; None for unit weights)."""
    rng = np.random.default_rng([SEED, CASES.index(case), n])
    if case == "kde":
        centres = np.random.default_rng([SEED, CASES.index(case)]).normal(0.0, MIXTURE_SPREAD, (MIXTURE, 3))
        x = centres[rng.integers(0, MIXTURE, n)] + rng.standard_normal((n, 3))
        return x.astype(np.float32), None
    if case == "svgd":
        return rng.standard_normal((n, 3)).astype(np.float32), None
    if case == "gp":
        return rng.uniform(0.0, GP_BOX, (n, 2)).astype(np.float32), rng.standard_normal(n)
    # clustered: benchmarks/pruning.py's generator, its constants and seeds
    centres = np.random.default_rng(P.SEED).uniform(0.0, P.BOX, (P.CLUSTERS, 3))
    rng = np.random.default_rng([P.SEED, n])
    x = centres[rng.integers(0, P.CLUSTERS, n)] + rng.standard_normal((n, 3)) * P.CLUSTER_WIDTH
    return x.astype(np.float32), None


def lengthscale(case: str, x: np.ndarray) -> float:
    """The case's lengthscale for its points ``x`` (Scott's rule, the median heuristic, or fixed)."""
    n = len(x)
    if case == "kde":
        return float(np.mean(x.std(axis=0, dtype=np.float64)) * n ** (-1 / 7))
    if case == "svgd":
        sample = x[np.random.default_rng([SEED, CASES.index(case), n, 1]).choice(n, min(n, MEDIAN_SAMPLE),
                                                                                replace=False)].astype(np.float64)
        distances = np.sqrt(((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1))
        return float(np.median(distances[np.triu_indices(len(sample), 1)]) / math.sqrt(2 * math.log(n)))
    return GP_LENGTHSCALE if case == "gp" else P.LENGTHSCALE


def case_data(case: str, n: int, work: str) -> dict:
    """The case's files at size N (written once, atomically, then reused), arrays and kernel constants."""
    path = os.path.join(work, f"{case}-{n}-seed{SEED}.npy")
    weights_path = path.replace(".npy", "-weights.npy")
    if not os.path.exists(path):
        x, w = generate(case, n)
        for target, array in ((weights_path, w), (path, x)):  # the points last: their file marks the pair done
            if array is not None:
                np.save(target + ".partial.npy", array)
                os.replace(target + ".partial.npy", target)
    x = np.load(path)
    w = np.load(weights_path) if os.path.exists(weights_path) else None
    ell = lengthscale(case, x)
    return {"case": case, "N": n, "x": x, "w": w, "points": path, "weights": weights_path if w is not None else None,
            "lengthscale": ell, "S": float(np.abs(w).sum()) if w is not None else float(n), "gmax": P.gmax(ell)}


# ----------------------------------------------------------------------------- the oracle and errors


def oracle(x: np.ndarray, w: np.ndarray | None, queries: np.ndarray, ell: float,
           chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """float64 g and v at ``queries`` over all sources ``x`` (weights ``w``, None: ones), exact differences,
    the sources taken ``chunk`` at a time."""
    q = queries.astype(np.float64)
    g = np.zeros_like(q)
    v = np.zeros(len(q))
    for start in range(0, len(x), chunk):
        d = x[start:start + chunk].astype(np.float64)[None, :, :] - q[:, None, :]  # x_i - q_j
        k = np.exp((d * d).sum(-1) * (-0.5 / ell**2))
        if w is not None:
            k *= w[start:start + chunk]
        v += k.sum(axis=1)
        g += np.einsum("qm,qmd->qd", k, d)
    return g / ell**2, v  # grad_q k = k (x - q) / l^2


def accuracy(data: dict, ref, g=None, v=None) -> dict:
    """The largest per-query error at the oracle's queries over S gmax (gradient) and S kmax (value)."""
    g_ref, v_ref = ref
    out = {}
    if g is not None:
        out["gradient_over_scale"] = float(np.linalg.norm(g - g_ref, axis=1).max() / (data["S"] * data["gmax"]))
    if v is not None:
        out["value_over_scale"] = float(np.abs(v - v_ref).max() / data["S"])
    return out


def nfft_grid_bytes(x: np.ndarray, ell: float) -> float:
    """Bytes of the FFT grids ``peers.nfft_gaussian_values(x, w, x, ell, eps=EPS)`` allocates: its bandwidth n,
    chosen as it chooses it, and two oversampled grids of (2n)^D complex numbers and the kernel's n^D."""
    centre = (x.max(0).astype(np.float64) + x.min(0)) / 2
    radius = max(float(np.linalg.norm(x - centre, axis=1).max()), ell)
    c = math.sqrt(2.0) * ell * (0.5 - 1 / 16) / 2 / radius
    n = 2 * math.ceil(math.sqrt(max(math.log(math.sqrt(math.pi) * c / EPS), 1.0)) / (math.pi * c))
    return 16.0 * (2 * (2 * n) ** x.shape[1] + n ** x.shape[1])


def peer_child(spec: dict) -> dict:
    """One peer in this (child) process: its build and evaluation seconds and its values at ``spec["rows"]``."""
    x = np.load(spec["points"])
    w = np.load(spec["weights"]) if spec["weights"] else np.ones(len(x))
    if spec["peer"] == "pynfft3":
        values, build, evaluate = peers.nfft_gaussian_values(x, w, x, spec["lengthscale"], eps=EPS)
    else:
        values, build, evaluate = peers.ferreus_gaussian_values(x, w, x, spec["lengthscale"], spec["order"],
                                                                threads=FERREUS_THREADS)
    return {"seconds_build": build, "seconds_eval": evaluate, "values": values[spec["rows"]].tolist()}


# ----------------------------------------------------------------------------- the run


class Bench:
    """Runs the measurements into one results dict, written after every step."""

    def __init__(self, args):
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.sizes = [n for n in (QUICK_SIZES if args.quick else SIZES) if n <= args.max_n]
        self.out = os.path.join(M.REPO, "benchmarks", "results", *(("quick",) if args.quick else ()))
        self.work = os.path.join(M.REPO, "benchmarks", "_work", "far_field")
        self.cache = os.path.join(self.work, "jax-cache")
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        self.results = {
            "mode": self.mode, "command": " ".join(["python", "benchmarks/far_field.py", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": {}, "tolerance": EPS, "sizes": self.sizes,
            "config": {"pruned_max": args.pruned_max, "peers_max": args.peers_max, "oracle_queries": ORACLE_QUERIES,
                       "sklearn_sample": SKLEARN_SAMPLE, "ferreus_threads": FERREUS_THREADS, "warmup_n": WARMUP_N,
                       "seed": SEED},
            "cases": [], "warmup": [], "measurements": [], "skipped": [], "errors": []}
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------------- bookkeeping

    def save(self) -> None:
        """Write far_field.json (with --report-only the measuring's own elapsed time stays)."""
        if not self.args.report_only:
            self.results["elapsed_s"] = round(time.perf_counter() - self._t0, 1)
        with open(os.path.join(self.out, "far_field.json"), "w") as f:
            json.dump(self.results, f, indent=1, default=lambda v: v.item() if isinstance(v, np.generic) else str(v))

    def error(self, case: str, method: str, n: int, what) -> None:
        text = (what if isinstance(what, str) else "".join(traceback.format_exception_only(type(what), what))).strip()
        print(f"  ! {case} {method} N={n}: {text[-600:]}", flush=True)
        self.results["errors"].append({"case": case, "method": method, "N": n, "error": text[-1500:]})

    def skip(self, case: str, method: str, n: int, reason: str) -> None:
        print(f"  - {case} {method} N={n}: not run, {reason}", flush=True)
        self.results["skipped"].append({"case": case, "method": method, "N": n, "reason": reason})

    def add(self, data: dict, method: str, seconds: float, **extra) -> dict:
        rec = {"case": data["case"], "method": method, "label": LABELS[method], "N": data["N"],
               "lengthscale": data["lengthscale"], "seconds": seconds, "projected": False, **extra}
        self.results["measurements"].append(rec)
        acc = rec.get("accuracy") or {}
        print(f"  {method:<16} {'~' if rec['projected'] else ' '}{report._s(seconds):>9}"
              + (f"  ({rec['method_used']})" if rec.get("method_used") else "")
              + "".join(f"  {k.split('_')[0]} error {v:.1e}" for k, v in acc.items()), flush=True)
        self.save()
        return rec

    def find(self, case: str, method: str, n: int) -> dict | None:
        return next((r for r in self.results["measurements"]
                     if (r["case"], r["method"], r["N"]) == (case, method, n)), None)

    # ------------------------------------------------------------------------- kgrad

    def kgrad(self, data: dict, flag: str, name: str) -> dict | str:
        """One ``kgrad run --method flag`` in a fresh process: its record's fields, or the error text."""
        import zarr

        extra = ["--kernel", "rbf", "--lengthscale", repr(data["lengthscale"]), "--tolerance", P._num(EPS),
                 "--method", flag, *(("--weights", data["weights"]) if data["weights"] else ())]
        out = os.path.join(self.work, "out", f"{name}.zarr")
        info = M.run_kgrad(data["points"], out, cache_dir=self.cache, extra_args=extra, timeout=TIMEOUT_S,
                           log_dir=os.path.join(self.work, "logs"))
        if info["returncode"] != 0:
            return info.get("error") or f"kgrad run exited {info['returncode']} (log {info['log']})"
        attrs = dict(zarr.open_group(out, mode="r").attrs)
        t = attrs.get("timings") or {}
        return {"wall_s": info["wall_s"], "method_used": attrs.get("method"),
                "timings": {key: t.get(key) for key in ("cluster_start_seconds", "order_seconds", "execute_seconds",
                                                        "unsort_seconds", "total_seconds")},
                "pairs_computed": attrs.get("pairs_computed"), "pairs_total": attrs.get("pairs_total"),
                "error_bound": attrs.get("error_bound"), "exact_reason": attrs.get("exact_reason"),
                "plan": info["plan"], "command": info["command"], "log": info["log"], "out": out}

    def kgrad_measure(self, data: dict, method: str, rows: np.ndarray, ref) -> None:
        """A measured kgrad run: its wall time, what it used, its timings and its error at the oracle's rows."""
        run = self.kgrad(data, KGRAD_FLAGS[method], f"{data['case']}-{method}-{data['N']}")
        if isinstance(run, str):
            self.error(data["case"], method, data["N"], run)
            return
        import zarr

        group = zarr.open_group(run["out"], mode="r")
        g = np.asarray(group["gradient"][:])[rows].astype(np.float64)
        v = np.asarray(group["value"][:])[rows].astype(np.float64)
        self.add(data, method, run.pop("wall_s"), accuracy=accuracy(data, ref, g, v), **run)

    def warmup(self) -> None:
        """Unrecorded kgrad runs at N = WARMUP_N that fill the compilation cache for every case and method."""
        print(f"warm-up: kgrad at N = {WARMUP_N} (fills the compilation cache)", flush=True)
        for case in CASES:
            data = case_data(case, WARMUP_N, self.work)
            for flag in ("far_field", "pruned", "dense"):
                run = self.kgrad(data, flag, f"warmup-{case}-{flag}")
                ok = not isinstance(run, str)
                self.results["warmup"].append({"case": case, "method": flag, "wall_s": run["wall_s"] if ok else None,
                                               "error": None if ok else run[-600:]})
                print(f"  {case} --method {flag}: " + (report._s(run["wall_s"]) if ok else "declined or failed"),
                      flush=True)
        self.save()

    # ------------------------------------------------------------------------- one case at one size

    def measure(self, case: str, n: int) -> None:
        """Every measurement of one case at one size."""
        data = case_data(case, n, self.work)
        picks = np.random.default_rng([SEED, CASES.index(case), n, 2]).choice(n, SKLEARN_SAMPLE, replace=False)
        rows = picks[:ORACLE_QUERIES]
        started = time.perf_counter()
        ref = oracle(data["x"], data["w"], data["x"][rows], data["lengthscale"])
        seconds = time.perf_counter() - started
        self.results["cases"].append({key: data[key] for key in ("case", "N", "points", "weights", "lengthscale",
                                                                 "S", "gmax")} | {"oracle_seconds": seconds})
        print(f"{case}, N = {n}: lengthscale {data['lengthscale']:.4g}, S = {data['S']:.4g}; oracle at "
              f"{len(rows)} queries in {seconds:.1f} s", flush=True)
        self.kgrad_measure(data, "kgrad_far_field", rows, ref)
        if n <= self.args.pruned_max:
            self.kgrad_measure(data, "kgrad_pruned", rows, ref)
        if n == self.sizes[0]:
            self.kgrad_measure(data, "kgrad_dense", rows, ref)
        if n > self.args.peers_max:
            return
        for order in FERREUS_ORDERS:
            self.peer(data, f"ferreus_o{order}", {"peer": "ferreus", "order": order}, rows, ref)
        grid = nfft_grid_bytes(data["x"], data["lengthscale"])
        limit = NFFT_MEMORY_SHARE * self.results["machine"]["memory_gib"] * 2**30
        if grid > limit:
            self.skip(case, "pynfft3", n, f"its FFT grids would take {report._b(grid)}, above "
                                          f"{NFFT_MEMORY_SHARE:g} of the memory")
        else:
            self.peer(data, "pynfft3", {"peer": "pynfft3"}, rows, ref)
        if case == "kde":
            self.sklearn(data, picks, ref)

    def peer(self, data: dict, method: str, spec: dict, rows: np.ndarray, ref) -> None:
        """One peer library in a child process (``--peer``): build + evaluation seconds, error at the rows."""
        spec = {**spec, "points": data["points"], "weights": data["weights"], "lengthscale": data["lengthscale"],
                "rows": rows.tolist()}
        try:
            child = M.child_json(["benchmarks/far_field.py", "--peer", json.dumps(spec)], timeout=PEER_TIMEOUT_S)
        except Exception as exc:  # a timeout: one method must not end the run
            self.error(data["case"], method, data["N"], exc)
            return
        if "error" in child:
            if "ImportError" in child["error"]:
                self.skip(data["case"], method, data["N"], child["error"].strip().splitlines()[-1])
            else:
                self.error(data["case"], method, data["N"], child["error"])
            return
        v = np.asarray(child.pop("values"))
        self.add(data, method, child["seconds_build"] + child["seconds_eval"], accuracy=accuracy(data, ref, v=v),
                 **child)

    def sklearn(self, data: dict, picks: np.ndarray, ref) -> None:
        """scikit-learn's tree KDE: fit on all N, score a random sample of queries, extrapolated to N."""
        try:
            import sklearn
            from sklearn.neighbors import KernelDensity
        except ImportError as exc:
            self.skip(data["case"], "sklearn", data["N"], f"{exc} (pip install scikit-learn)")
            return
        n, ell = data["N"], data["lengthscale"]
        try:
            started = time.perf_counter()
            kde = KernelDensity(kernel="gaussian", bandwidth=ell, rtol=EPS, algorithm="kd_tree").fit(data["x"])
            fit = time.perf_counter() - started
            started = time.perf_counter()
            score = kde.score_samples(data["x"][picks])
            scoring = time.perf_counter() - started
        except Exception as exc:  # one broken method must not end the run
            self.error(data["case"], "sklearn", n, exc)
            return
        v = np.exp(score[:ORACLE_QUERIES]) * n * (2.0 * np.pi * ell**2) ** 1.5  # back from the normalised density
        self.add(data, "sklearn", fit + scoring * n / len(picks), projected=True, fit_s=fit, score_s=scoring,
                 queries_scored=len(picks), accuracy=accuracy(data, ref, v=v), sklearn=sklearn.__version__,
                 basis=f"fit on all N ({report._s(fit)}) + score_samples of {len(picks)} random queries "
                       f"({report._s(scoring)}) x N / {len(picks)}")

    # ------------------------------------------------------------------------- projections

    def pruned_plan(self, case: str, n: int) -> dict:
        """The pruned plan at size N (``make_problem``, no compute): its pairs to compute, the method it chose
        and why it computes every pair (if it does)."""
        from pipeline.problem import make_problem

        data = case_data(case, n, self.work)
        problem = make_problem(data["x"], data["x"], lengthscale=data["lengthscale"], tolerance=EPS,
                               weights=data["w"], sources_are_points=True, method="pruned")
        return {"plan_pairs": problem.plan.pairs_to_compute, "plan_method": problem.method.name,
                "plan_exact_reason": problem.plan.exact_reason}

    def project(self) -> None:
        """kgrad pruned and dense at the sizes they did not run at (see the module's docstring).  A run's
        fixed part (its wall time less the tasks' execute time: start-up, inputs, sorted copy) is kept, its
        execute time scaled; where ``--method auto`` itself used pruning, that run is the measurement."""
        for case in CASES:
            measured = [r for r in self.results["measurements"] if r["case"] == case and r["method"] == "kgrad_pruned"]
            base = max(measured, key=lambda r: r["N"]) if measured else None
            dense = self.find(case, "kgrad_dense", self.sizes[0])
            base_plan = None
            for info in (c for c in self.results["cases"] if c["case"] == case):
                n, data = info["N"], {"case": case, "N": info["N"], "lengthscale": info["lengthscale"]}
                auto = self.find(case, "kgrad_far_field", n)
                if base and n > base["N"] and auto is not None and auto.get("method_used") == "pruned":
                    self.add(data, "kgrad_pruned", auto["seconds"], basis="the --method auto run, which pruned",
                             **{k: auto[k] for k in ("accuracy", "timings", "method_used") if k in auto})
                elif base and n > base["N"]:
                    try:
                        base_plan = base_plan or self.pruned_plan(case, base["N"])
                        plan = self.pruned_plan(case, n)
                    except Exception as exc:  # make_problem may refuse; the projection is then missing
                        self.error(case, "kgrad_pruned (projection)", n, exc)
                    else:
                        ratio = plan["plan_pairs"] / base_plan["plan_pairs"]
                        fixed, execute = _split(base)
                        self.add(data, "kgrad_pruned", fixed + execute * ratio, projected=True, **plan,
                                 basis=f"{report._s(fixed)} fixed + {report._s(execute)} of tasks at N = {base['N']} "
                                       f"x the pruned plan's pairs, {plan['plan_pairs']:.3g} / "
                                       f"{base_plan['plan_pairs']:.3g}")
                if dense and n > dense["N"]:
                    fixed, execute = _split(dense)
                    self.add(data, "kgrad_dense", fixed + execute * (n / dense["N"]) ** 2, projected=True,
                             basis=f"{report._s(fixed)} fixed + {report._s(execute)} of tasks at N = {dense['N']} "
                                   f"x (N / {dense['N']})^2")


def _split(rec: dict) -> tuple[float, float]:
    """A kgrad run's (fixed seconds, the tasks' execute seconds) from its wall time and recorded timings."""
    execute = float((rec.get("timings") or {}).get("execute_seconds", rec["seconds"]))
    return rec["seconds"] - execute, execute


# ----------------------------------------------------------------------------- plot and text


def plot(results, path: str) -> str:
    """Seconds against N, log-log, one panel per case, one line per method; projected points hollow, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 9))
    for ax, case in zip(axes.flat, CASES):
        for i, method in enumerate(LABELS):
            recs = sorted((r for r in results["measurements"] if (r["case"], r["method"]) == (case, method)),
                          key=lambda r: r["N"])
            if not recs:
                continue
            color = f"C{i}"
            measured = [r for r in recs if not r["projected"]]
            projected = [r for r in recs if r["projected"]]
            ax.plot([r["N"] for r in measured], [r["seconds"] for r in measured], "-o", color=color, ms=6,
                    label=LABELS[method])
            line = measured[-1:] + projected
            ax.plot([r["N"] for r in line], [r["seconds"] for r in line], "--", color=color)
            ax.plot([r["N"] for r in projected], [r["seconds"] for r in projected], "o", color=color, ms=6,
                    mfc="none", label=None if measured else LABELS[method])
            if method == "kgrad_far_field":
                for r in recs:
                    if r.get("method_used") and r["method_used"] != "far_field":
                        ax.annotate(r["method_used"], (r["N"], r["seconds"]), fontsize=7, xytext=(4, -10),
                                    textcoords="offset points")
        lengthscales = sorted({r["lengthscale"] for r in results["cases"] if r["case"] == case})
        ax.set_title(f"{case}, lengthscale " + ", ".join(f"{ell:.3g}" for ell in lengthscales), fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N points (= M sources)")
        ax.set_ylabel("seconds for all N queries")
        ax.grid(True, which="both", alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    handles["hollow, dashed: projected, not run"] = axes.flat[0].plot([], [], "o--", color="0.4", mfc="none")[0]
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=3, frameon=False)
    machine = results.get("machine", {})
    fig.suptitle(f"RBF, --tolerance {P._num(results['tolerance'])}, float32 ({results['mode']} run) -- "
                 f"{machine.get('cpu_model', '?')}, {machine.get('cpus_usable', '?')} cores", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _t(rec: dict | None) -> str:
    return "-" if rec is None else ("~" if rec["projected"] else "") + report._s(rec["seconds"])


def _err(rec: dict | None, key: str = "value_over_scale") -> str:
    return "-" if rec is None or key not in (rec.get("accuracy") or {}) else report._e(rec["accuracy"][key])


def _ratio(rec: dict | None, far: dict | None) -> str:
    """That method's seconds over the far-field run's ("~": one of them projected)."""
    if rec is None or far is None:
        return "-"
    return ("~" if rec["projected"] or far["projected"] else "") + report._x(rec["seconds"] / far["seconds"])


def size_table(results, n: int) -> list[str]:
    """One row per case at size N."""
    def find(case, method):
        return next((r for r in results["measurements"] if (r["case"], r["method"], r["N"]) == (case, method, n)),
                    None)

    rows = []
    for case in CASES:
        info = next((c for c in results["cases"] if (c["case"], c["N"]) == (case, n)), None)
        if info is None:
            continue
        far, o6, o8 = find(case, "kgrad_far_field"), find(case, "ferreus_o6"), find(case, "ferreus_o8")
        rows.append([case, f"{info['lengthscale']:.3g}", (far or {}).get("method_used", "-"), _t(far),
                     _t(find(case, "kgrad_pruned")), _t(find(case, "kgrad_dense")), f"{_t(o6)} / {_t(o8)}",
                     _t(find(case, "pynfft3")), _t(find(case, "sklearn")),
                     f"{_err(far, 'gradient_over_scale')} / {_err(far)}", f"{_err(o6)} / {_err(o8)}",
                     _err(find(case, "pynfft3")), _err(find(case, "sklearn")),
                     _ratio(find(case, "kgrad_pruned"), far), _ratio(o8, far)])
    return report._table(["case", "lengthscale", "kgrad used", "kgrad far field", "kgrad pruning only", "kgrad dense",
                          "ferreus o6 / o8", "pynfft3", "sklearn", "kgrad error g / v", "ferreus error o6 / o8",
                          "pynfft3 error", "sklearn error", "far field vs pruning", "far field vs ferreus o8"], rows)


def markdown(results, png_path: str, md_path: str) -> str:
    """The far-field section, markers included."""
    m = results.get("machine", {})
    cfg = results["config"]
    png = os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path)))
    eps = P._num(results["tolerance"])
    lines = [
        report.FAR_FIELD_BEGIN,
        "## The far field (`--tolerance`, `--method auto`) on realistic problems",
        "",
        f"g and v for N points against M = N sources (the points), RBF kernel, variance 1, float32, `--tolerance "
        f"{eps}`: per query |g^ - g| <= EPS S gmax and |v^ - v| <= EPS S kmax (S = sum|w|, kmax = 1, gmax = "
        "exp(-1/2) / l). Cases: **kde**, a 3-D mixture of 20 Gaussians (centres ~ N(0, 3.5^2 I), unit "
        "components), lengthscale by Scott's rule (mean std x N^(-1/7)), unit weights; **svgd**, particles ~ N(0, I_3), "
        "lengthscale by the median heuristic (median pairwise distance / sqrt(2 ln N)), unit weights; **gp**, 2-D, "
        "uniform in [0, 100]^2, lengthscale 5, weights ~ N(0, 1); **clustered**, the data of the pruning section "
        "below at lengthscale 0.2, unit weights (short range: there `auto` keeps the pruned method). Generated by "
        f"`benchmarks/far_field.py` ({results['mode']} run, {results['started']}, {results.get('elapsed_s', 0):.0f} "
        "s); raw data `benchmarks/results/" + ("quick/" if results["mode"] == "quick" else "") + "far_field.json`.",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} cores usable, {m.get('memory_gib')} GiB RAM; JAX "
        f"{m.get('jax')}. Load average (1, 5, 15 min) at start {report._load(m.get('loadavg_start'))}, at end "
        f"{report._load(m.get('loadavg_end'))}.",
        "",
        f"![far field: seconds against N]({png})",
        "",
        "kgrad: the whole `python -m pipeline run --points P.npy [--weights W.npy] --kernel rbf --lengthscale L "
        f"--tolerance {eps} --method auto|pruned|dense --out OUT --overwrite --no-progress` process (start-up, the "
        "local cluster, reading the .npy, writing the zarr output), warm compilation cache; \"kgrad used\" is the "
        f"method `auto` chose. Pruning only up to N = {cfg['pruned_max']:g}, dense at the smallest N; above, "
        "`~` marks projections (pruning: the wall time at the largest measured N times the ratio of the pruned "
        "plan's pairs to compute; dense: times (N / N0)^2). Peers compute v only, float64, in memory (build + "
        f"evaluation, no start-up), up to N = {cfg['peers_max']:g}: ferreus-bbfmm at Chebyshev order 6 and 8 "
        f"({cfg['ferreus_threads']} threads), pyNFFT3 fastsum at eps {eps}; scikit-learn (kde only) `KernelDensity("
        f"kernel=\"gaussian\", bandwidth=l, rtol={eps}, algorithm=\"kd_tree\")`, one core, fit on all N, "
        f"{cfg['sklearn_sample']} queries scored, its time extrapolated to N queries (`~`).",
        "",
        f"Errors: against a float64 numpy oracle (exact differences, all sources) at {cfg['oracle_queries']} random "
        "queries, the largest per-query error over S gmax (g, Euclidean norm) and S kmax (v): the bound's units, "
        f"where EPS = {eps}. Ratios: that method's seconds over kgrad far field's (above 1x: the far field is "
        "faster).",
        "",
    ]
    for n in results["sizes"]:
        lines += [f"### N = {n:,}".replace(",", " "), ""]
        lines += size_table(results, n)
        lines += [""]
    runs = [r for r in results["measurements"] if r["method"] in KGRAD_FLAGS and not r["projected"]]
    if runs:
        lines += ["kgrad's runs (from the output's timings):", ""]
        lines += report._table(
            ["case", "N", "run", "used", "wall", "cluster start", "sorted copy", "execute", "pairs computed"],
            [[r["case"], r["N"], KGRAD_FLAGS[r["method"]], r.get("method_used"), report._s(r["seconds"]),
              report._s(r["timings"].get("cluster_start_seconds")), report._s(r["timings"].get("order_seconds")),
              report._s(r["timings"].get("execute_seconds")), f"{r['pairs_computed']:.3g}"
              if r.get("pairs_computed") is not None else "-"]
             for r in sorted(runs, key=lambda r: (r["N"], CASES.index(r["case"]), r["method"]))])
        lines += [""]
    projected = [f"{r['case']} {r['method']} at N = {r['N']}: {r['basis']}" for r in results["measurements"]
                 if r["projected"]]
    if projected:
        lines += ["Projections (`~`): " + "; ".join(projected) + ".", ""]
    if results["skipped"] or results["errors"]:
        lines += ["### Not run and errors", ""]
        lines += [f"- not run: {s['case']} {s['method']} N = {s['N']}: {s['reason']}" for s in results["skipped"]]
        lines += [f"- **error** {e['case']} {e['method']} N = {e['N']}: `{e['error'][-300:]}`"
                  for e in results["errors"]]
        lines += [""]
    lines.append(report.FAR_FIELD_END)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 2 x 10^4 only, a smoke test; writes "
                                                        "benchmarks/results/quick/ and leaves BENCHMARKS.md alone")
    p.add_argument("--max-n", dest="max_n", type=float, default=1e6, help="run the sizes N <= this (1e7 adds 10^7)")
    p.add_argument("--pruned-max", dest="pruned_max", type=float, default=1e5,
                   help="measure --method pruned up to this N, project it above")
    p.add_argument("--peers-max", dest="peers_max", type=float, default=1e6,
                   help="run ferreus, pyNFFT3 and scikit-learn up to this N")
    p.add_argument("--report-only", dest="report_only", action="store_true",
                   help="redo the projections, plot and tables from the saved far_field.json (no measuring)")
    p.add_argument("--peer", help=argparse.SUPPRESS)  # internal: one peer in a child process (a JSON spec)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer:
        print(json.dumps(peer_child(json.loads(args.peer))))
        return 0
    bench = Bench(args)
    if not bench.sizes:
        print(f"far_field.py: no size <= --max-n {args.max_n:g}", file=sys.stderr)
        return 2
    print(f"kgrad far-field benchmark ({bench.mode}, N = {bench.sizes}) -> {bench.out}", flush=True)
    if args.report_only:
        with open(os.path.join(bench.out, "far_field.json")) as f:
            bench.results = json.load(f)
        bench.results["measurements"] = [r for r in bench.results["measurements"]
                                         if not (r["projected"] and r["method"] in ("kgrad_pruned", "kgrad_dense"))
                                         and not (r["method"] == "kgrad_pruned" and "basis" in r)]
        bench.project()
        bench.save()
    else:
        bench.results["machine"] = M.machine_info()
        bench.warmup()
        for n in bench.sizes:
            for case in CASES:
                bench.measure(case, n)
            print(f"  [{time.perf_counter() - bench._t0:.0f} s elapsed]", flush=True)
        bench.project()
        bench.results["machine"]["loadavg_end"] = list(os.getloadavg())
        bench.save()
    png = plot(bench.results, os.path.join(bench.out, "far_field.png"))
    if args.quick:
        markdown_path = os.path.join(bench.out, "far_field.md")
        text = markdown(bench.results, png, markdown_path) + "\n"
    else:
        markdown_path = os.path.join(M.REPO, "BENCHMARKS.md")
        existing = open(markdown_path).read() if os.path.exists(markdown_path) else ""
        text = report.with_marked_block(existing, markdown(bench.results, png, markdown_path),
                                        report.FAR_FIELD_BEGIN, report.FAR_FIELD_END)
    with open(markdown_path, "w") as f:
        f.write(text)
    for n in bench.sizes:
        print(f"\nN = {n}, seconds for all N queries (~: projected), errors in units of S gmax / S kmax "
              f"(EPS = {P._num(EPS)}):")
        print("\n".join(size_table(bench.results, n)))
    for e in bench.results["errors"]:
        print(f"ERROR {e['case']} {e['method']} N={e['N']}: {e['error'][-200:]}")
    print(f"wrote {os.path.join(bench.out, 'far_field.json')}, {png}, {markdown_path} in "
          f"{bench.results['elapsed_s']:.0f} s", flush=True)
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
