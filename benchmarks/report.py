"""From ``results.json`` to ratios, the scale fit, ``throughput.png`` and ``BENCHMARKS.md`` (which keeps the
section ``benchmarks/pruning.py`` wrote there, between ``PRUNING_BEGIN`` and ``PRUNING_END``).

Definitions used in every table:

* pairs = N * M (here M = N); pairs/s = pairs / warm median seconds (the first call if there is no warm
  repeat); for end-to-end runs the seconds are the whole process, start-up included.
* x ceiling = pairs/s / (exp+sum elements/s on the largest array measured (2^25 elements on the CPU) in the same dtype, the better of the start
  and the end of the run); for the periodic kernel the ceiling is
  sin+sum elements/s / D (one sin per pair and dimension).
* x seed = pairs/s / (the seed approach's ``vmap(jacfwd)`` pairs/s at the same N, kernel, dtype, D);
  marked ``*`` where the seed was not run at that N and its best measured rate stands in.
"""

from __future__ import annotations

import math
import os

LABELS = {
    "seed_jacfwd": "seed: whole-matrix vmap(jacfwd), sum after",
    "seed_jacrev": "seed: whole-matrix vmap(jacrev), sum after",
    "gemm": "whole-matrix GEMM, one jit",
    "keops": "KeOps CPU, LazyTensor closed form",
    "kgrad": "kgrad in-process (kernel_gradients)",
    "kgrad_e2e": "kgrad end to end (kgrad run, local cluster, zarr)",
    "kgrad_e2e_bigtiles": "kgrad end to end, tiles 4096 x 8192",
    "kgrad_auto": "kgrad mode=auto (generic path: vmap of per-pair grad, structure-of-arrays)",
    "kgrad_jacfwd": "kgrad mode=jacfwd (generic path)",
    "kgrad_jacrev": "kgrad mode=jacrev (generic path)",
}
ORDER = ["seed_jacfwd", "seed_jacrev", "gemm", "keops", "kgrad", "kgrad_e2e"]
# benchmarks/pruning.py's section of BENCHMARKS.md lies between these markers; markdown() carries it over.
PRUNING_BEGIN = "<!-- pruning: python benchmarks/pruning.py -->"
PRUNING_END = "<!-- end of pruning -->"
# ... and benchmarks/dense_order.py's section
DENSE_ORDER_BEGIN = "<!-- dense order: python benchmarks/dense_order.py -->"
DENSE_ORDER_END = "<!-- end of dense order -->"
# ... and benchmarks/far_field.py's section
FAR_FIELD_BEGIN = "<!-- far field: python benchmarks/far_field.py -->"
FAR_FIELD_END = "<!-- end of far field -->"
# ... and benchmarks/far_field_kernels.py's section
KERNELS_BEGIN = "<!-- far field kernels: python benchmarks/far_field_kernels.py -->"
KERNELS_END = "<!-- end of far field kernels -->"
KEPT_SECTIONS = ((PRUNING_BEGIN, PRUNING_END), (DENSE_ORDER_BEGIN, DENSE_ORDER_END), (FAR_FIELD_BEGIN, FAR_FIELD_END),
                 (KERNELS_BEGIN, KERNELS_END))


# ----------------------------------------------------------------------------- ratios and fits


def _ceiling(results, rec):
    ceilings = results.get("ceilings", {})
    if rec["kernel"] == "periodic":
        c = ceilings.get(f"sin_sum_{rec['dtype']}")
        return (c["elements_per_s"] / rec["D"], "sin+sum / D") if c else (None, None)
    c = ceilings.get(f"exp_sum_{rec['dtype']}")
    return (c["elements_per_s"], "exp+sum") if c else (None, None)


def finalize(results) -> None:
    """Add ratio_to_ceiling, ratio_to_seed (and, at N = 100, the ratio to the post's numbers)."""
    recs = results["measurements"]
    seeds = [r for r in recs if r["method"] == "seed_jacfwd" and r.get("pairs_per_s")]
    for rec in recs:
        pps = rec.get("pairs_per_s")
        ceiling, kind = _ceiling(results, rec)
        rec["ceiling_pairs_per_s"] = ceiling
        rec["ceiling_kind"] = kind
        rec["ratio_to_ceiling"] = pps / ceiling if pps and ceiling else None
        same = [s for s in seeds if (s["kernel"], s["dtype"], s["D"]) == (rec["kernel"], rec["dtype"], rec["D"])
                and (s["section"] == "n100") == (rec["section"] == "n100")]
        at_n = [s for s in same if s["N"] == rec["N"]]
        ref = at_n[0] if at_n else (max(same, key=lambda s: s["pairs_per_s"]) if same else None)
        rec["ratio_to_seed"] = pps / ref["pairs_per_s"] if pps and ref else None
        rec["seed_reference_N"] = ref["N"] if ref else None
        if rec["section"] == "gpu" and rec["N"] == results["keops_published"]["n"]:
            seconds = rec.get("warm_median_s") or rec.get("first_call_s")
            rec["speedup_vs_keops_published"] = results["keops_published"]["seconds"] / seconds if seconds else None
        if rec["section"] == "n100":
            post = results["seed_published"]["jax_jacfwd"]
            warm = rec.get("warm_median_s")
            rec["speedup_vs_post_jax_jacfwd_warm"] = post["warm_s"] / warm if warm else None
            rec["speedup_vs_post_jax_jacfwd_first"] = (post["first_s"] / rec["first_call_s"]
                                                       if rec.get("first_call_s") else None)


def _fit(points):
    """Least-squares slope and prefactor of log t = log a + b log N."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, math.exp(my - b * mx)


def scale_fit(measurements, fit_min: int) -> dict:
    """Exponent of time in N (M = N, so N*M work means 2) for end-to-end and in-process kgrad."""
    series = {
        "kgrad_e2e wall (start-up included)": [(r["N"], r["warm_median_s"] or r["first_call_s"])
                                               for r in measurements if r["section"] == "e2e"],
        "kgrad_e2e execute (tasks only)": [(r["N"], r["execute_s"]) for r in measurements
                                           if r["section"] == "e2e" and r.get("execute_s")],
        "kgrad in-process": [(r["N"], r["warm_median_s"] or r["first_call_s"]) for r in measurements
                             if r["section"] == "main" and r["method"] == "kgrad"],
    }
    fits = {}
    for name, pts in series.items():
        pts = sorted((n, t) for n, t in pts if n >= fit_min and t)
        if len(pts) < 2:
            continue
        b, a = _fit(pts)
        fits[name] = {"sizes": [n for n, _ in pts], "seconds": [t for _, t in pts], "exponent_N": b,
                      "exponent_pairs": b / 2, "ns_per_pair": [1e9 * t / (n * n) for n, t in pts],
                      "prefactor_s": a}
    return fits


# ----------------------------------------------------------------------------- the plot


def plot(results, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in results["measurements"] if r["section"] in ("main", "e2e", "gpu", "scale_1e6")
            and r.get("pairs_per_s")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.2))
    methods = [m for m in ORDER if any(r["method"] == m for r in recs)]
    methods += sorted({r["method"] for r in recs} - set(methods))
    for method in methods:
        pts = sorted((r["N"], r["pairs_per_s"], r["warm_median_s"] or r["first_call_s"])
                     for r in recs if r["method"] == method)
        ns = [p[0] for p in pts]
        style = "--" if method.endswith("e2e") else (":" if method.startswith("seed") else "-")
        left.plot(ns, [p[1] for p in pts], style, marker="o", label=LABELS.get(method, method))
        right.plot(ns, [p[2] for p in pts], style, marker="o", label=LABELS.get(method, method))
    c = results.get("ceilings", {}).get("exp_sum_float32")
    if c:
        left.axhline(c["elements_per_s"], color="k", ls=":", label="ceiling: fused exp+sum (float32)")
    post = results["seed_published"]["jax_jacfwd"]
    right.plot([100], [post["warm_s"]], "k*", ms=11, label="post: JAX vmap(jacfwd), N=100, D=1 (warm)")
    if recs:
        n0 = min(r["N"] for r in recs)
        n1 = max(r["N"] for r in recs)
        t1 = max(r["warm_median_s"] or r["first_call_s"] for r in recs if r["N"] == n1)
        right.plot([n0, n1], [t1 * (n0 / n1) ** 2, t1], color="0.7", lw=1, label="slope 2 (time ~ N*M)")
    for ax, ylabel in ((left, "pairs / s  (N*M / warm median time)"), (right, "seconds per call (warm median)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N points (= M sources), D = 3")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = left.get_legend_handles_labels()
    extra_h, extra_l = right.get_legend_handles_labels()
    for h, label in zip(extra_h, extra_l):
        if label not in labels:
            handles.append(h)
            labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    machine = results.get("machine", {})
    fig.suptitle(f"kgrad benchmarks ({results['mode']}): RBF, float32, sum_i grad k(x_j, x_i) -- "
                 f"{machine.get('cpu_model', '?')}, {machine.get('cpus_usable', '?')} cores, "
                 f"jax {machine.get('jax', '?')}", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- text


def _s(v) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f} s"
    if v >= 1:
        return f"{v:.2f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.3g} ms"
    return f"{v * 1e6:.3g} us"


def _g(v) -> str:
    return "-" if v is None else f"{v / 1e9:.3g} G"


def _x(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}g}x"


def _frac(v) -> str:
    return "-" if v is None else (f"{100 * v:.3g}%" if v < 10 else f"{v:.3g}x")


def _b(v) -> str:
    if not v:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(v)


def _e(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def _seed_ratio(rec) -> str:
    if rec.get("ratio_to_seed") is None:
        return "-"
    star = "" if rec.get("seed_reference_N") == rec["N"] else "*"
    return _x(rec["ratio_to_seed"]) + star


def _memory(rec) -> str:
    if rec.get("peak_rss_worker_max_bytes"):
        return f"{_b(rec['peak_rss_worker_max_bytes'])} / worker"
    if rec.get("xla_temp_bytes") is not None:
        full = rec.get("jacobian_bytes") or rec.get("matrix_bytes")
        what = "N*N*D" if rec.get("jacobian_bytes") else "N*N"
        return f"XLA temp {_b(rec['xla_temp_bytes']) if rec['xla_temp_bytes'] else '0 B'}" + (
            f" ({what}: {_b(full)})" if full else "")
    if rec.get("jacobian_bytes"):
        return f"Jacobian {_b(rec['jacobian_bytes'])}"
    if rec.get("matrix_bytes"):
        return f"N x N {_b(rec['matrix_bytes'])}"
    if rec.get("peak_rss_delta_bytes"):
        return f"+{_b(rec['peak_rss_delta_bytes'])} RSS"
    return "-"


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _section(results, name):
    return [r for r in results["measurements"] if r["section"] == name]


def _sorted(recs):
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(recs, key=lambda r: (rank.get(r["method"], 99), r["method"], r["N"]))


def _detail_rows(recs):
    return [[r["label"], r["N"], _s(r["first_call_s"]), _s(r["warm_median_s"]), r["repeats"],
             _g(r["pairs_per_s"]), _frac(r.get("ratio_to_ceiling")), _seed_ratio(r), _memory(r),
             _e(r.get("rel_err"))] for r in _sorted(recs)]


DETAIL_HEADER = ["method", "N", "first call", "warm median", "repeats", "pairs/s", "of ceiling", "x seed",
                 "memory", "rel. error"]


def summary_rows(results):
    """Each main method at its largest N: pairs/s, fraction of the ceiling, multiple of the seed."""
    recs = _section(results, "main") + _section(results, "e2e")
    rows = []
    for method in ORDER:
        mine = [r for r in recs if r["method"] == method and r.get("pairs_per_s")]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["N"])
        rows.append([best["label"], best["N"], _g(best["pairs_per_s"]), _frac(best.get("ratio_to_ceiling")),
                     _seed_ratio(best)])
    c = results.get("ceilings", {}).get("exp_sum_float32")
    if c:
        rows.append([f"ceiling: {c['op']}", c["elements"], _g(c["elements_per_s"]), "100%", "-"])
    return rows


def _grid(results):
    recs = _section(results, "main") + _section(results, "e2e")
    sizes = sorted({r["N"] for r in recs})
    rows = []
    for method in ORDER:
        mine = {r["N"]: r for r in recs if r["method"] == method}
        if mine:
            rows.append([LABELS[method]] + [_g(mine[n]["pairs_per_s"]) if n in mine else "-" for n in sizes])
    return ["method"] + [f"N={n}" for n in sizes], rows


def n100_rows(results):
    post = results["seed_published"]
    rows = []
    for r in _sorted(_section(results, "n100")):
        rows.append([f"{r['label']} (this machine)", _s(r["first_call_s"]), _s(r["warm_median_s"]),
                     _x(r.get("speedup_vs_post_jax_jacfwd_warm")), _e(r.get("rel_err"))])
    for p in post.values():
        rows.append([p["label"], _s(p["first_s"]), _s(p["warm_s"]),
                     _x(post["jax_jacfwd"]["warm_s"] / p["warm_s"]), "(post's r2)"])
    return rows


def markdown(results, png_path: str, md_path: str) -> str:
    m = results.get("machine", {})
    png = os.path.relpath(png_path, os.path.dirname(os.path.abspath(md_path)))
    quick = results["mode"] == "quick"
    lines = [
        "# kgrad benchmarks",
        "",
        "Summed input-gradients of a kernel sum, g_j = sum_i grad_q k(x_j, x_i), for N points against "
        "M = N sources (sources = points, unit weights), D = 3, float32, RBF kernel with unit lengthscale, "
        "unless a table says otherwise. All methods ran side by side in one run of one command, on one "
        "machine; every result was checked against a float64 numpy oracle (or, above "
        "its size limit, against kgrad in-process): the rel. error column.",
        "",
        f"Generated by `benchmarks/run.py` ({results['mode']} run, {results['started']}, "
        f"{results.get('elapsed_s', 0):.0f} s). Raw data: `benchmarks/results/results.json`"
        + (" (this quick run: `benchmarks/results/quick/`)" if quick else "") + ".",
        "",
        "```",
        results["command"],
        "```",
        "",
    ]
    if quick:
        lines += ["**Quick run**: small sizes, single end-to-end runs; a smoke test, not the reference "
                  "figures.", ""]
    lines += [
        "## Machine",
        "",
        f"- CPU: {m.get('cpu_model')} ({m.get('hypervisor') or 'bare metal'} guest), "
        f"{m.get('cpus_usable')} cores usable, {m.get('threads_per_core')} thread(s) per core, "
        f"SIMD {', '.join(m.get('simd', [])) or '?'}, L3 {m.get('l3')}, {m.get('memory_gib')} GiB RAM",
        f"- JAX {m.get('jax')}, jaxlib {m.get('jaxlib')} (XLA extension version {m.get('xla_extension_version')}), "
        f"backend {m.get('jax_backend')}; numpy {m.get('numpy')}, dask {m.get('dask')}, distributed "
        f"{m.get('distributed')}, zarr {m.get('zarr')}; Python {m.get('python')}",
        f"- KeOps: {m.get('keops_status') or m.get('pykeops') or 'not installed'}",
        f"- Load average (1, 5, 15 min) at start {_load(m.get('loadavg_start'))}, at end "
        f"{_load(m.get('loadavg_end'))}: other work on the machine makes numbers noisy.",
        "",
        f"![throughput]({png})",
        "",
        "## Summary: each method at its largest N",
        "",
    ]
    lines += _table(["method", "N", "pairs/s", "of ceiling", "x seed"], summary_rows(results))
    lines += ["", "pairs/s by N (end to end: whole process, start-up included):", ""]
    header, rows = _grid(results)
    lines += _table(header, rows)
    lines += ["", "## Main table: RBF, float32, D = 3", ""]
    lines += _table(DETAIL_HEADER, _detail_rows(_section(results, "main")))
    lines += ["", "Memory: `XLA temp` is the compiled program's scratch memory (`memory_analysis()`), beside "
              "the size the seed's (N, N, D) Jacobian or the GEMM form's N x N matrix would have if held whole "
              "(XLA may fuse the sum into it and hold far less); `+... RSS` is the process's peak resident-"
              "memory growth during the measurement (approximate: memory freed by earlier measurements is "
              "reused).", ""]
    n100 = n100_rows(results)
    if _section(results, "n100"):
        lines += ["## N = 100: first call and warm, beside the post's published numbers", "",
                  "The seed's own input: X = linspace(-1, 1, 100), D = 1, float32 here (the post: JAX "
                  "float32, Julia float64, on the post author's machine). First call includes tracing and "
                  "compiling (KeOps: its C++ module is built once and cached on disk, under ~/.cache/keops*, "
                  "so its first call here is a cache load unless the cache was empty). The post's kernel used "
                  "a wrong r2 (not a distance); ours use true distances. Speed-up: the post's JAX jacfwd warm "
                  "time over this row's warm time (same N, different machines).",
                  ""]
        lines += _table(["method", "first call", "warm", "warm speed-up vs post's JAX jacfwd", "rel. error"],
                        n100)
        lines += [""]
    if _section(results, "periodic"):
        lines += ["## The generic path: periodic kernel, float32, D = 3", "",
                  "kgrad's generic path against the seed's formulation of the same kernel: `mode=\"auto\"` "
                  "(vmap over all pairs of JAX's per-pair gradient, structure-of-arrays layout, the kernel's sums "
                  "as dots with ones; the periodic kernel's sin^2 by exact range reduction and a polynomial) and `mode=\"jacfwd\"`/`\"jacrev\"` "
                  "(vmap over rows of jacfwd/jacrev of the row sum). The reference ceiling is XLA's sin+sum "
                  "elements/s / D (one sin per pair and dimension); kgrad's auto mode evaluates no XLA sin, "
                  "so it can exceed it.", ""]
        lines += _table(DETAIL_HEADER, _detail_rows(_section(results, "periodic")))
        lines += [""]
    f64 = _section(results, "float64")
    if f64:
        c = results["ceilings"].get("exp_sum_float64", {})
        lines += ["## float64", "",
                  f"Against float64's own ceiling ({_g(c.get('elements_per_s'))} elements/s exp+sum); "
                  "\"vs float32\" is the float32 rate of the same method and N divided by this one.", ""]
        f32 = {(r["method"], r["N"]): r for r in _section(results, "main") + _section(results, "e2e")}
        rows = []
        for r in _sorted(f64):
            other = f32.get((r["method"], r["N"]))
            slow = other["pairs_per_s"] / r["pairs_per_s"] if other and r.get("pairs_per_s") else None
            rows.append([r["label"], r["N"], _s(r["first_call_s"]), _s(r["warm_median_s"]), _g(r["pairs_per_s"]),
                         _frac(r.get("ratio_to_ceiling")), _x(slow) + (" slower" if slow else ""),
                         _e(r.get("rel_err"))])
        lines += _table(["method", "N", "first call", "warm median", "pairs/s", "of float64 ceiling",
                         "vs float32", "rel. error"], rows)
        lines += [""]
    e2e = _section(results, "e2e") + _section(results, "scale_1e6")
    if e2e:
        lines += ["## End to end and the scale series", "",
                  "`python -m pipeline run --points POINTS.zarr --out OUT.zarr --overwrite` in a fresh process "
                  "(what `kgrad run` does), local dask cluster with the default workers, zarr in and out. "
                  "\"first\" is the first run at that N, \"warm\" the median of later runs (persistent "
                  "compilation cache warm); wall = the whole process; execute = the tasks only (from the "
                  "output's recorded timings).", ""]
        rows = [[r["N"], _s(r["first_call_s"]), _s(r["warm_median_s"]), _s(r.get("kgrad_total_s")),
                 _s(r.get("cluster_start_s")), _s(r.get("execute_s")), _g(r["pairs_per_s"]),
                 _g(r.get("pairs_per_s_execute")), _frac(r.get("ratio_to_ceiling")), _seed_ratio(r),
                 r.get("workers"), r.get("tasks"), _b(r.get("peak_rss_worker_max_bytes")),
                 _b((r.get("plan") or {}).get("task_memory_bytes")), _e(r.get("rel_err"))]
                for r in sorted(e2e, key=lambda r: r["N"])]
        lines += _table(["N", "first (wall)", "warm (wall)", "kgrad total", "cluster start", "execute",
                         "pairs/s (wall)", "pairs/s (execute)", "of ceiling", "x seed", "workers", "tasks",
                         "peak RSS / worker", "planned task memory", "rel. error"], rows)
        lines += ["", "Peak RSS / worker: the largest resident memory of any worker process (psutil, sampled "
                  "every 50 ms), JAX and its baseline included; planned task memory: kgrad's own projection of "
                  "one task's bytes above the worker's baseline (`kgrad plan`). rel. error: against kgrad "
                  "in-process (0 means bit-identical)."]
        fits = results.get("scale_fit", {})
        if fits:
            lines += ["", "Fit of log t = log a + b log N (M = N, so time ~ N*M means b = 2):", ""]
            lines += _table(["series", "sizes", "seconds", "b (in N)", "b / 2 (in N*M)", "ns per pair"],
                            [[name, ", ".join(map(str, f["sizes"])), ", ".join(f"{t:.3g}" for t in f["seconds"]),
                              f"{f['exponent_N']:.2f}", f"{f['exponent_pairs']:.2f}",
                              ", ".join(f"{v:.3g}" for v in f["ns_per_pair"])] for name, f in fits.items()])
            lines += ["", "Below a few seconds of work, start-up (Python, imports, cluster, compiles) "
                      "dominates the wall time and pulls b below 2; the execute series shows the work itself."]
        lines += [""]
    cache = results.get("cache") or {}
    if cache.get("e2e"):
        lines += ["## Persistent compilation cache", "",
                  f"The same `kgrad run` (N = {cache['N']}, D = 3, float32, RBF) twice in fresh processes with "
                  "one fresh `KGRAD_CACHE_DIR`; the second loads the compiled programs instead of compiling.", ""]
        lines += _table(["run", "wall", "kgrad total", "cluster start", "execute", "task compute (sum)",
                         "cache files"],
                        [[r["run"], _s(r["wall_s"]), _s(r["kgrad_total_s"]), _s(r["cluster_start_s"]),
                          _s(r["execute_s"]), _s(r["compute_s_total"]), r["cache_files"]] for r in cache["e2e"]])
        first, second = cache["e2e"][0], cache["e2e"][1] if len(cache["e2e"]) > 1 else None
        if second:
            lines += ["", f"The second process saved {_s(first['wall_s'] - second['wall_s'])} of wall time "
                      f"({_s(first['compute_s_total'] - second['compute_s_total'])} of summed task compute: the "
                      "workers' compiles). What is left is start-up: Python and imports, the cluster, the "
                      "workers' own JAX import and cache load."]
        if cache.get("in_process"):
            lines += ["", "In-process (`kernel_gradients` with `pipeline.cache.enable_compilation_cache`, "
                      "`benchmarks/cache_probe.py`), two fresh processes, one cache:", ""]
            lines += _table(["process", "import", "first call", "warm median", "cache files after"],
                            [[p["run"], _s(p["import_s"]), _s(p["first_call_s"]), _s(p["warm_median_s"]),
                              p["cache_files_after"]] for p in cache["in_process"]])
        lines += [""]
    gpu = _section(results, "gpu")
    if gpu:
        kp = results["keops_published"]
        lines += ["## GPU", "", f"Devices: {', '.join(results.get('gpu_devices', []))}", ""]
        lines += _table(DETAIL_HEADER, _detail_rows(gpu))
        lines += ["", f"{kp['label']}: {kp['seconds']} s (kernel sum only; kgrad computes the sum and "
                  "the gradient)."]
        versus = [[r["label"], r["N"], _s(r.get("warm_median_s") or r.get("first_call_s")),
                   _x(r.get("speedup_vs_keops_published"))] for r in gpu if r.get("speedup_vs_keops_published")]
        if versus:
            lines += ["Against it (published seconds / ours; above 1x is faster than that figure):", ""]
            lines += _table(["method", "N", "seconds", "vs KeOps published"], versus)
        lines += [""]
    samples = [(key, r) for key, c in sorted(results.get("ceilings", {}).items()) for r in c.get("samples", [])]
    if samples:
        main_log2 = max(r["log2"] for _, r in samples)
        lines += ["## Ceiling samples", "",
                  "Every exp+sum (and sin+sum) measurement of the run, G elements/s; the ceiling used above is "
                  f"the better of the 2^{main_log2} samples.", ""]
        lines += _table(["op", "elements", "when", "elements/s"],
                        [[key.replace("_", "+", 1).replace("_", " "), f"2^{r['log2']}", r["when"],
                          _g(r["elements_per_s"])] for key, r in samples])
        lines += [""]
    if results["skipped"] or results["errors"]:
        lines += ["## Skipped and errors", ""]
        for s in results["skipped"]:
            lines.append(f"- skipped {LABELS.get(s['method'], s['method'])} ({s['section']})"
                         + (f" at N = {s['N']}" if s["N"] else "") + f": {s['reason']}")
        for e in results["errors"]:
            lines.append(f"- **error** {e['method']} N = {e['N']} ({e['section']}): `{e['error'][-300:]}`")
        lines += [""]
    lines += ["## Definitions", "",
              "- pairs = N * M; pairs/s = pairs / warm median seconds (first call when there is no repeat).",
              "- first call: the first call in this process for that shape (tracing and compiling "
              "included; kgrad reuses its tile shapes across N, so its later first calls compile nothing); "
              "warm: median of repeats, each ended by `block_until_ready`, timed with `time.perf_counter`.",
              "- of ceiling: pairs/s over the fused `jit(sum(exp(a)))` rate on the largest array measured "
              "(see `Ceiling samples`) of the same dtype (a pair needs at least one exp), measured at the start "
              "and, on the CPU, at the end of the run; the better of the two counts, so that load from other "
              "work at one moment does not lower the bar. Smaller arrays were measured too, as context.",
              "- x seed: pairs/s over the seed approach's (whole-matrix `vmap(jacfwd)`) pairs/s at the same N; "
              "`*`: the seed was not run at that N (size limit), its best measured rate stands in.",
              "- kgrad also returns the kernel sums v_j with the gradient at no extra pass; the other methods "
              "compute the gradient only.",
              ""]
    text = "\n".join(lines)
    if os.path.exists(md_path):  # the other scripts' sections of the file this text replaces
        with open(md_path) as f:
            old = f.read()
        for begin, end in KEPT_SECTIONS:
            kept = marked_block(old, begin, end)
            if kept:
                text = with_marked_block(text, kept, begin, end)
    return text


def marked_block(text: str, begin: str = PRUNING_BEGIN, end: str = PRUNING_END) -> str | None:
    """The section of a Markdown text from ``begin`` to ``end`` (both included; default: the pruning
    section), or None."""
    start = text.find(begin)
    stop = text.find(end, start) if start >= 0 else -1
    return text[start:stop + len(end)] if stop >= 0 else None


def with_marked_block(text: str, block: str, begin: str = PRUNING_BEGIN, end: str = PRUNING_END) -> str:
    """``text`` with its section (``begin`` to ``end``) replaced by ``block``; ``block`` appended when it has
    none."""
    old = marked_block(text, begin, end)
    if old is not None:
        return text.replace(old, block, 1)
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"


def _load(values) -> str:
    return "?" if not values else ", ".join(f"{v:.2f}" for v in values)


def console_table(results) -> str:
    lines = ["", "summary (each method at its largest N):"]
    for row in summary_rows(results):
        lines.append(f"  {row[0]:<50} N={row[1]:<8} {row[2]:>9} pairs/s  {row[3]:>8} of ceiling  "
                     f"{row[4]:>9} x seed")
    if _section(results, "n100"):
        lines.append("N = 100, D = 1 (first call / warm):")
        for row in n100_rows(results):
            lines.append(f"  {row[0]:<62} {row[1]:>10} {row[2]:>10}  warm vs post jacfwd {row[3]}")
    for name, f in (results.get("scale_fit") or {}).items():
        lines.append(f"scale fit {name}: time ~ N^{f['exponent_N']:.2f} over N = {f['sizes']}")
    for run in (results.get("cache") or {}).get("e2e", []):
        lines.append(f"cache: {run['run']:<30} wall {run['wall_s']:.2f} s, execute {run['execute_s']:.2f} s")
    for p in (results.get("cache") or {}).get("in_process", []):
        lines.append(f"cache in-process: {p['run']:<26} first call {p['first_call_s']:.3f} s")
    for s in results["skipped"]:
        lines.append(f"skipped {s['method']} ({s['section']})" + (f" N={s['N']}" if s["N"] else "")
                     + f": {s['reason']}")
    for e in results["errors"]:
        lines.append(f"ERROR {e['method']} N={e['N']}: {e['error'][-200:]}")
    return "\n".join(lines)
