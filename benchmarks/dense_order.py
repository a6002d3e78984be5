"""The dense method's rate against the lengthscale and the input's row order, side by side in one run.

    python benchmarks/dense_order.py           # ~8 min on 2 cores -> results/dense_order.{json,png} + BENCHMARKS.md
    python benchmarks/dense_order.py --quick   # a smoke test (~1 min) -> results/quick/

In process, N standard normal points (D = 3, float32, rbf, g and v), rows in random order, at lengthscales
1, 0.5 and 0.25, computed three ways:

* ``global order``: ``kernel_gradients`` as it is: blocks of consecutive rows in the run's spatial order;
* ``global order, rows pre-sorted``: the same, on the rows already in spatial order (the rate must not
  depend on the row order);
* ``per-task order``: the rows of each task (output chunk) in their input order, cut into blocks in spatial
  order within the task only (:func:`pipeline.blocks.compute_rows` on the rows as given: what the dense
  method did before it used the run's spatial order).

Then end to end (``kgrad run``, a fresh process, 2 workers on a local cluster, N_e2e points, lengthscale 0.5),
and the machine's ceiling: XLA's fused exp + sum over 2^25 float32 elements (one element = one pair). Each
figure is the median of 5 warm calls, taken in rounds over all cells (the first call compiles); the ceiling is
the better of its measurements at the start and at the end. Writes ``results/dense_order.json``,
``results/dense_order.png`` and the section of ``BENCHMARKS.md`` between the markers below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import formulations as F  # noqa: E402
import measure as M  # noqa: E402
import report  # noqa: E402

BEGIN = report.DENSE_ORDER_BEGIN
END = report.DENSE_ORDER_END
LENGTHSCALES = (1.0, 0.5, 0.25)
SIZES = {"full": dict(n=131072, e2e=262144, repeats=5, ceiling=1 << 25),
         "quick": dict(n=16384, e2e=32768, repeats=2, ceiling=1 << 22)}


HOWS = ("global order", "global order, rows pre-sorted", "per-task order")


def in_process_call(x: np.ndarray, lengthscale: float, how: str):
    """A call that computes g and v of ``x`` at ``lengthscale`` the way ``how`` says."""
    from pipeline import kernel_gradients
    from pipeline.blocks import compute_rows
    from pipeline.plan import usable_cores
    from pipeline.problem import make_problem
    from pipeline.sources import prepare_sources
    from pipeline.spatial import spatial_order

    if how == "per-task order":
        problem = make_problem(x, x, lengthscale=lengthscale, sources_are_points=True)
        prepared = prepare_sources(x, None, problem.spec, "float32", problem.shape, center=np.asarray(problem.center))
        return lambda: compute_rows(x, prepared, problem.spec, "auto", "float32", problem.shape,
                                    chunk=problem.plan.rows_per_task, threads=usable_cores())
    rows = x[spatial_order(x, (lengthscale,) * x.shape[1])] if how.endswith("pre-sorted") else x
    return lambda: kernel_gradients(rows, lengthscale=lengthscale, return_value=True)


def in_process(x: np.ndarray, repeats: int) -> list[dict]:
    """Every (lengthscale, how) of the table: a first call each (compiles), then ``repeats`` rounds that time
    each once, interleaved, so that a change of the machine's load in the meantime touches every cell alike."""
    cases = [(ls, how) for ls in LENGTHSCALES for how in HOWS]
    calls, first = {}, {}
    for case in cases:
        calls[case] = in_process_call(x, *case)
        first[case], _, _ = M.time_calls(calls[case], max_repeats=0, budget_s=0.0)  # the compile
    warm = {case: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            started = time.perf_counter()
            M.block(calls[case]())
            warm[case].append(time.perf_counter() - started)
    results = []
    for ls, how in cases:
        seconds = M.median(warm[ls, how])
        results.append({"how": how, "lengthscale": ls, "N": len(x), "first_s": first[ls, how],
                        "warm_s": warm[ls, how], "seconds": seconds, "pairs_per_s": len(x) ** 2 / seconds})
        print(f"lengthscale {ls:g}, {how}: {results[-1]['pairs_per_s'] / 1e9:.2f} G pairs/s", flush=True)
    return results


def ceiling(elements: int, repeats: int) -> dict:
    """XLA's fused exp + sum over ``elements`` float32 values already on the device: elements per second."""
    import jax

    fn, a = F.exp_sum(), jax.device_put(F.ceiling_input(elements, "float32"))
    _, warm, _ = M.time_calls(lambda: fn(a), max_repeats=max(repeats, 7), min_repeats=7, budget_s=0.0)
    return {"elements": elements, "elements_per_s": elements / M.median(warm)}


def end_to_end(n: int, work: str) -> dict:
    x = M.points(n, 3, "float32", seed=3)
    path = os.path.join(work, f"normal_{n}.npy")
    np.save(path, x)
    info = M.run_kgrad(path, os.path.join(work, f"dense_{n}.zarr"), cache_dir=os.path.join(work, "jax-cache"),
                       workers=2, extra_args=("--lengthscale", "0.5"))
    if info["returncode"] != 0:
        return {"N": n, "error": info.get("error")}
    t = info["timings"]
    return {"N": n, "lengthscale": 0.5, "workers": 2, "wall_s": info["wall_s"],
            "execute_s": t["execute_seconds"], "order_s": t.get("order_seconds"), "unsort_s": t.get("unsort_seconds"),
            "pairs_per_s_wall": n * n / info["wall_s"], "pairs_per_s_execute": n * n / t["execute_seconds"],
            "command": info["command"]}


def markdown(results: dict) -> str:
    ceil = results["ceiling"]["elements_per_s"]
    rows = {(r["how"], r["lengthscale"]): r for r in results["in_process"]}
    hows = HOWS
    lines = [BEGIN, "", "## Dense: rate against lengthscale and row order", "",
             f"`python benchmarks/dense_order.py`, {results['machine']}, load {results['load']}. In process, "
             f"N = {results['N']} standard normal points in random row order, D = 3, float32, rbf, g and v; G pairs/s "
             f"(median of warm calls), and in brackets the share of the fused exp+sum ceiling "
             f"({ceil / 1e9:.2f} G elements/s, same run).", "",
             "| lengthscale | " + " | ".join(hows) + " |", "|---|" + "---|" * len(hows)]
    for ls in LENGTHSCALES:
        cells = [f"{rows[h, ls]['pairs_per_s'] / 1e9:.2f} ({rows[h, ls]['pairs_per_s'] / ceil:.2f})"
                 for h in hows]
        lines.append(f"| {ls:g} | " + " | ".join(cells) + " |")
    def slowest(how: str) -> float:
        """The slowest lengthscale's rate over the lengthscale-1 rate, rows as ``how`` says."""
        return min(rows[how, ls]["pairs_per_s"] for ls in LENGTHSCALES) / rows[how, 1.0]["pairs_per_s"]

    lines += ["", f"The slowest lengthscale runs at {slowest(hows[0]):.2f} of the lengthscale-1 rate in global order "
              f"({slowest(hows[1]):.2f} on pre-sorted rows; per-task order: {slowest(hows[2]):.2f})."]
    e2e = results["end_to_end"]
    if "error" in e2e:
        lines += ["", f"End to end failed: {e2e['error'][-300:]}"]
    else:
        lines += ["", f"End to end (`kgrad run`, N = {e2e['N']}, lengthscale 0.5, 2 workers, a fresh process): "
                  f"{e2e['wall_s']:.1f} s wall, {e2e['pairs_per_s_wall'] / 1e9:.2f} G pairs/s "
                  f"({e2e['pairs_per_s_wall'] / ceil:.2f} of the ceiling); tasks alone {e2e['execute_s']:.1f} s, "
                  f"{e2e['pairs_per_s_execute'] / 1e9:.2f} G pairs/s ({e2e['pairs_per_s_execute'] / ceil:.2f}); "
                  f"the sorted copy {e2e['order_s']:.2f} s, back in input order {e2e['unsort_s']:.2f} s."]
    lines += ["", END]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    hows = HOWS
    width = 0.26
    for k, how in enumerate(hows):
        rates = [next(r["pairs_per_s"] for r in results["in_process"] if r["how"] == how and r["lengthscale"] == ls)
                 for ls in LENGTHSCALES]
        ax.bar(np.arange(len(LENGTHSCALES)) + (k - 1) * width, np.array(rates) / 1e9, width, label=how)
    ax.axhline(results["ceiling"]["elements_per_s"] / 1e9, color="k", ls=":", label="fused exp+sum")
    ax.set_xticks(range(len(LENGTHSCALES)), [f"{ls:g}" for ls in LENGTHSCALES])
    ax.set_xlabel("lengthscale")
    ax.set_ylabel("G pairs/s")
    ax.set_title(f"dense, N = {results['N']}, rows in random order")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    args = p.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    out = os.path.join(M.REPO, "benchmarks", "results", *(["quick"] if args.quick else []))
    work = os.path.join(M.REPO, "benchmarks", "_work")
    os.makedirs(out, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    load = [round(os.getloadavg()[0], 2)]
    x = M.points(sizes["n"], 3, "float32", seed=1)  # standard normal, random row order
    info = M.machine_info()
    results = {"N": sizes["n"], "machine": f"{info['cpu_model']}, {info['cpus_usable']} usable cores",
               "machine_info": info, "in_process": []}
    start = ceiling(sizes["ceiling"], sizes["repeats"])
    results["in_process"] = in_process(x, sizes["repeats"])
    results["end_to_end"] = end_to_end(sizes["e2e"], work)
    print(f"end to end: {results['end_to_end']}", flush=True)
    end = ceiling(sizes["ceiling"], sizes["repeats"])  # the better of the start and the end: a moment of load
    results["ceiling"] = {**max(start, end, key=lambda c: c["elements_per_s"]),  # does not lower the bar
                          "samples": [start["elements_per_s"], end["elements_per_s"]]}
    load.append(round(os.getloadavg()[0], 2))
    results["load"] = " -> ".join(map(str, load))
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(os.path.join(out, "dense_order.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out, "dense_order.png"))
    text = markdown(results)
    md = os.path.join(M.REPO, "BENCHMARKS.md") if not args.quick else os.path.join(out, "dense_order.md")
    old = open(md).read() if os.path.exists(md) else ""
    with open(md, "w") as f:
        f.write(report.with_marked_block(old, text, BEGIN, END))
    print(text)
    return 1 if "error" in results["end_to_end"] else 0


if __name__ == "__main__":
    sys.exit(main())
