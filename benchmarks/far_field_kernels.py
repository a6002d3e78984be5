"""The far field for each kernel it handles, side by side on one data set, in one run.

    python benchmarks/far_field_kernels.py              # N = 10^5, 10^6 -> results/far_field_kernels.json + BENCHMARKS.md
    python benchmarks/far_field_kernels.py --max-n 1e5  # N = 10^5 only

Data: the GP field of ``benchmarks/far_field.py`` (2-D, uniform in a 100-box, lengthscale 5, weights of both
signs; the same files).  For rbf, rational_quadratic (alpha = 1), imq (c = 1, beta = 1/2) and the Matern
kernels (split: pipeline/matern_split.py): ``kgrad run --tolerance 1e-6`` end to end (float32, g and v, 2 local
workers: the method the plan chooses), ``kgrad run --method dense`` at N = 10^5 (projected to 10^6 as x 100,
marked ``~``), for the Matern kernels ``--method pruned`` likewise (what they ran before the split), and for
imq ferreus-bbfmm's
inverse multiquadric at Chebyshev order 8 (values only, in memory; its kernel is 1 / sqrt(1 + (6.5 r)^2), so
points are divided by 6.5 lengthscales).  Errors at 200 random queries against a float64 numpy oracle, in the
bound's units (S gmax, S kmax).  Writes benchmarks/results/far_field_kernels.json and the section of
BENCHMARKS.md between ``report.KERNELS_BEGIN`` and ``report.KERNELS_END``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import far_field as F  # noqa: E402
import measure as M  # noqa: E402
import report  # noqa: E402

EPS = 1e-6
SIZES = (100_000, 1_000_000)
DENSE_MAX = 100_000  # measured up to here, projected as N^2 above
QUERIES = 200
KERNELS = {  # name -> (kgrad flags, the profile f(r2) / kmax and df/dr2 / kmax, slope sup|f'| / kmax)
    "rbf": ((), lambda r2: (np.exp(-0.5 * r2), -0.5 * np.exp(-0.5 * r2)), math.exp(-0.5)),
    "rational_quadratic": (("--kernel", "rational_quadratic", "--param", "alpha=1"),
                           lambda r2: (1 / (1 + r2 / 2), -0.5 / (1 + r2 / 2) ** 2), None),
    "imq": (("--kernel", "imq"), lambda r2: ((1 + r2) ** -0.5, -0.5 * (1 + r2) ** -1.5), None),
    "matern52": (("--kernel", "matern52"), lambda r2: _matern52(np.sqrt(5 * r2)), None),
    "matern32": (("--kernel", "matern32"), lambda r2: _matern32(np.sqrt(3 * r2)), None),
    "matern12": (("--kernel", "matern12"), lambda r2: _matern12(np.sqrt(r2)), None),
}
PRUNED_FOR = ("matern52", "matern32", "matern12")  # kernels whose run before the far field was pruning


def _matern52(a):  # a = sqrt5 r: f and df/dr2 = f'(r) / (2 r)
    e = np.exp(-a)
    return (1 + a + a * a / 3) * e, -(5.0 / 6.0) * (1 + a) * e


def _matern32(a):  # a = sqrt3 r
    e = np.exp(-a)
    return (1 + a) * e, -1.5 * e


def _matern12(r):  # a pair at distance 0 gets no gradient (as in kgrad)
    e = np.exp(-r)
    with np.errstate(divide="ignore", invalid="ignore"):
        return e, np.where(r > 0, -e / (2 * np.where(r > 0, r, 1.0)), 0.0)
FERREUS_IMQ_SCALE = 6.5  # ferreus-bbfmm's InverseMultiquadraticRbf is 1 / sqrt(1 + (6.5 r)^2) (measured)


def slope(kernel: str) -> float:
    from pipeline.kernels import make_spec
    from pipeline.scale_mixtures import mixture_for

    if kernel.startswith("matern"):
        from pipeline.matern_split import NU, SLOPE

        return SLOPE[NU[kernel]]
    flags = KERNELS[kernel][0]
    params = {k: float(v) for k, v in (a.split("=") for a in flags[3:4])}
    return mixture_for(make_spec(kernel, 2, **params)).slope


def oracle(x, w, q, ell, kernel, chunk=8192):
    """float64 g and v (kmax = 1) at queries ``q`` over all sources ``x``."""
    profile = KERNELS[kernel][1]
    q = q.astype(np.float64)
    g, v = np.zeros_like(q), np.zeros(len(q))
    for start in range(0, len(x), chunk):
        d = (q[:, None, :] - x[start:start + chunk].astype(np.float64)[None]) / ell
        f, df = profile((d * d).sum(-1))
        ws = w[start:start + chunk]
        v += (f * ws).sum(1)
        g += np.einsum("qm,qmd->qd", 2 * df * ws, d) / ell
    return g, v


def errors(data, ref, g, v, kernel):
    g_ref, v_ref = ref
    gmax = slope(kernel) / data["lengthscale"]
    return {"gradient_over_scale": float(np.linalg.norm(g - g_ref, axis=1).max() / (data["S"] * gmax)),
            "value_over_scale": float(np.abs(v - v_ref).max() / data["S"])}


def kgrad(data, kernel, method, work) -> dict:
    import zarr

    out = os.path.join(work, "out", f"{kernel}-{method}-{data['N']}.zarr")
    extra = ["--lengthscale", repr(data["lengthscale"]), "--tolerance", "1e-6", "--method", method,
             "--weights", data["weights"], *KERNELS[kernel][0]]
    info = M.run_kgrad(data["points"], out, cache_dir=os.path.join(work, "jax-cache"), workers=2, extra_args=extra,
                       timeout=3600, log_dir=os.path.join(work, "logs"))
    if info["returncode"] != 0:
        raise RuntimeError(f"kgrad run exited {info['returncode']} (log {info['log']})")
    group = zarr.open_group(out, mode="r")
    attrs = dict(group.attrs)
    return {"seconds": info["wall_s"], "method_used": attrs.get("method"), "out": out, "command": info["command"],
            "group": group}


def ferreus_imq(data, rows) -> dict:
    import ferreus_bbfmm as fb

    scale = 1.0 / (FERREUS_IMQ_SCALE * data["lengthscale"])
    x = np.ascontiguousarray(data["x"].astype(np.float64) * scale)
    q = x[rows]
    w = data["w"].reshape(-1, 1)
    started = time.perf_counter()
    tree = fb.FmmTree(x, 8, fb.KernelParams(fb.FmmKernelType.InverseMultiquadraticRbf), False,
                      params=fb.FmmParams(256, fb.M2LCompressionType.SVD, 1e-8, 1024), target_points=x)
    tree.set_weights(w)
    values = np.asarray(tree.evaluate(w, x), np.float64).reshape(-1)
    return {"seconds": time.perf_counter() - started, "values": values[rows], "queries": q}


def markdown(results) -> str:
    lines = [report.KERNELS_BEGIN, "## The far field for each kernel", "",
             f"`{results['command']}` ({results['started'][:10]}, {results['elapsed_s']:.0f} s; 2 cores). The GP field "
             "of the far-field section (2-D, uniform in a 100-box, lengthscale 5, weights of both signs), "
             f"EPS = {EPS:g}, float32, g and v, `kgrad run` end to end on 2 local workers (about 5 s of it fixed "
             "start-up). `~`: dense projected from N = 10^5 as N^2. ferreus-bbfmm: inverse multiquadric, order 8, "
             "values only, in memory. kgrad pruned: `--method pruned` (the Matern kernels' path before the far field), "
             "projected likewise. Errors at 200 random queries against a float64 oracle, in units of S gmax "
             "(g) and S kmax (v).", "",
             "| kernel | N | kgrad auto | method used | kgrad pruned | kgrad dense | ferreus-bbfmm o8 (v only) | kgrad error g / v |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        dense = r.get("dense_seconds")
        dense = "-" if dense is None else ("~" if r.get("dense_projected") else "") + report._s(dense)
        pruned = r.get("pruned_seconds")
        pruned = "-" if pruned is None else ("~" if r.get("pruned_projected") else "") + report._s(pruned)
        fer = r.get("ferreus_seconds")
        fer = "-" if fer is None else f"{report._s(fer)} (err v {r['ferreus_value_error']:.1e})"
        acc = r["accuracy"]
        lines.append(f"| {r['kernel']} | {r['N']:.0e} | {report._s(r['seconds'])} | {r['method_used']} | {pruned} | {dense} | "
                     f"{fer} | {acc['gradient_over_scale']:.1e} / {acc['value_over_scale']:.1e} |")
    lines += ["", report.KERNELS_END]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-n", dest="max_n", type=float, default=1e6)
    args = p.parse_args()
    work = os.path.join(M.REPO, "benchmarks", "_work", "far_field")
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    results = {"command": " ".join(["python", "benchmarks/far_field_kernels.py", *sys.argv[1:]]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": M.machine_info(), "tolerance": EPS, "rows": []}
    dense = {}
    for n in (s for s in SIZES if s <= args.max_n):
        data = F.case_data("gp", n, work)
        rows = np.random.default_rng([F.SEED, n, 7]).choice(n, QUERIES, replace=False)
        for kernel in KERNELS:
            ref = oracle(data["x"], data["w"], data["x"][rows], data["lengthscale"], kernel)
            run = kgrad(data, kernel, "auto", work)
            g = np.asarray(run["group"]["gradient"][:])[rows].astype(np.float64)
            v = np.asarray(run["group"]["value"][:])[rows].astype(np.float64)
            row = {"kernel": kernel, "N": n, "seconds": run["seconds"], "method_used": run["method_used"],
                   "command": run["command"], "accuracy": errors(data, ref, g, v, kernel)}
            if n <= DENSE_MAX:
                dense[kernel] = (n, kgrad(data, kernel, "dense", work)["seconds"])
                row["dense_seconds"] = dense[kernel][1]
            elif kernel in dense:
                n0, seconds = dense[kernel]
                row["dense_seconds"], row["dense_projected"] = seconds * (n / n0) ** 2, True
            if kernel in PRUNED_FOR and n <= DENSE_MAX:
                dense[kernel, "pruned"] = (n, kgrad(data, kernel, "pruned", work)["seconds"])
                row["pruned_seconds"] = dense[kernel, "pruned"][1]
            elif (kernel, "pruned") in dense:  # uniform data: the share of pairs kept does not change with N
                n0, seconds = dense[kernel, "pruned"]
                row["pruned_seconds"], row["pruned_projected"] = seconds * (n / n0) ** 2, True
            if kernel == "imq":
                try:
                    fer = ferreus_imq(data, rows)
                    row["ferreus_seconds"] = fer["seconds"]
                    row["ferreus_value_error"] = float(np.abs(fer["values"] - ref[1]).max() / data["S"])
                except ImportError:
                    pass
            print(f"N={n} {kernel:<18} {row['seconds']:.1f} s ({row['method_used']}) "
                  f"dense {row.get('dense_seconds', float('nan')):.1f} s ferreus {row.get('ferreus_seconds', float('nan')):.1f} s "
                  f"err g {row['accuracy']['gradient_over_scale']:.1e} v {row['accuracy']['value_over_scale']:.1e}",
                  flush=True)
            results["rows"].append(row)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    out = os.path.join(M.REPO, "benchmarks", "results", "far_field_kernels.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    path = os.path.join(M.REPO, "BENCHMARKS.md")
    existing = open(path).read() if os.path.exists(path) else ""
    with open(path, "w") as f:
        f.write(report.with_marked_block(existing, markdown(results), report.KERNELS_BEGIN, report.KERNELS_END) + "\n")
    print(f"wrote {out} and {path} in {results['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
