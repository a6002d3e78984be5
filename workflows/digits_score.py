"""The score field of a real data set: scikit-learn's bundled handwritten digits (1797 x 64, no download).

    python workflows/digits_score.py                              # a local dask cluster (1 worker)
    python workflows/digits_score.py --workers 2 --out out/digits.zarr
    python workflows/digits_score.py --scheduler tcp://host:8786 --work-dir /shared/digits

Needs scikit-learn (``pip install scikit-learn``) for ``sklearn.datasets.load_digits``.

The 8 x 8 images are standardised per pixel (the 3 pixels that are blank in every image are dropped:
D = 61).  With an RBF kernel, kgrad's kernel sum v(x) = sum_i k(x, x_i) is, up to a constant, the kernel
density estimate (KDE) of the data, and g(x) = grad v(x), so

    s(x) = g(x) / v(x) = grad log KDE(x)          (the score estimate)

The lengthscale is the median heuristic l = median pairwise distance / sqrt(2 log(n + 1)) (as in SVGD;
``--lengthscale`` overrides).  Every kernel sum runs through :func:`pipeline.workflow.run_workflow`: the
data go to a zarr group first, the output group is ``--out``.  Reported:

* per digit class: the mean score norm |s| and the mean cosine between s and (class mean - x): how well
  the score points into the point's own class, against the nearest other class's mean for contrast;
* a few score steps x <- x + l^2 s(x) (for the RBF kernel that is exactly a mean-shift step, which never
  lowers the KDE), each a run with the moved points as queries and the data as sources: the mean
  log-KDE rises step by step, and the share of points whose density went up;
* a picture of the output via :func:`pipeline.plot.plot_output` (first two principal components of the
  points coloured by v, projected score-field arrows, histogram of |g|).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROUNDING = 1e-3  # changes of log v smaller than this are float32 rounding (sums of ~1800 terms)


def load_standardised():
    """(points (1797, 61), labels (1797,)): digits standardised per pixel, blank pixels dropped."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("digits_score.py needs scikit-learn: pip install scikit-learn")
    digits = load_digits()
    x, labels = digits.data.astype(np.float64), digits.target
    std = x.std(axis=0)
    keep = std > 0
    return (x[:, keep] - x[:, keep].mean(axis=0)) / std[keep], labels


def median_lengthscale(x: np.ndarray) -> float:
    """median pairwise distance / sqrt(2 log(n + 1))."""
    sq = (x ** 2).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    median = float(np.sqrt(np.median(d2[np.triu_indices(len(x), k=1)])))
    return median / np.sqrt(2.0 * np.log(len(x) + 1.0))


def write_points(path: str, points: np.ndarray, labels: np.ndarray | None = None) -> str:
    import zarr

    group = zarr.open_group(path, mode="w")
    group.create_array("points", data=points.astype(np.float32), chunks=(1024, points.shape[1]),
                       dimension_names=("point", "dim"))
    if labels is not None:
        group.create_array("labels", data=labels.astype(np.int16), dimension_names=("point",))
    return path


def read_output(path: str) -> tuple[np.ndarray, np.ndarray]:
    import zarr

    group = zarr.open_group(path, mode="r")
    return np.asarray(group["gradient"][:], np.float64), np.asarray(group["value"][:], np.float64)


def class_table(x: np.ndarray, labels: np.ndarray, s: np.ndarray) -> list[tuple]:
    """Per class: count, mean |s|, mean cos(s, own class mean - x), mean cos(s, nearest other mean - x)."""
    means = np.stack([x[labels == c].mean(axis=0) for c in range(10)])

    def cosine(a, b):
        return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-300)

    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    d2[np.arange(len(x)), labels] = np.inf
    nearest_other = d2.argmin(axis=1)
    own = cosine(s, means[labels] - x)
    other = cosine(s, means[nearest_other] - x)
    norms = np.linalg.norm(s, axis=1)
    return [(c, int((labels == c).sum()), float(norms[labels == c].mean()), float(own[labels == c].mean()),
             float(other[labels == c].mean())) for c in range(10)]


class Runner:
    """run_workflow on one cluster for every run: a local one started here, or the given scheduler."""

    def __init__(self, scheduler: str, workers: int):
        self.cluster = None
        if scheduler == "local":
            from pipeline.cluster import local_cluster

            self.cluster = local_cluster(workers)
            scheduler = self.cluster.scheduler_address  # tls://: it admits only its own credentials
        self.scheduler = scheduler
        self.security = self.cluster.security if self.cluster is not None else {}
        self.seconds = []

    def __call__(self, points: str, out: str, lengthscale: float, sources: str | None = None):
        from pipeline.workflow import RunConfig, run_workflow

        config = RunConfig(points=points, sources=sources, out=out, kernel="rbf", lengthscale=lengthscale,
                           dtype="float32", scheduler=self.scheduler, security=self.security, overwrite=True, progress=False)
        t0 = time.perf_counter()
        run_workflow(config)
        self.seconds.append(time.perf_counter() - t0)
        return read_output(out)

    def close(self):
        if self.cluster is not None:
            self.cluster.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/digits_score/score.zarr", help="the output group")
    parser.add_argument("--work-dir", default="out/digits_score", help="the data's zarr store and the "
                                                                       "score steps' outputs")
    parser.add_argument("--plot", default=None, help="the picture (default: WORK_DIR/score.png; '' for none)")
    parser.add_argument("--scheduler", default="local", help="'local' (default) or a dask scheduler "
                                                             "address / scheduler file")
    parser.add_argument("--workers", type=int, default=1, help="local cluster workers (default 1)")
    parser.add_argument("--lengthscale", type=float, help="override the median heuristic")
    parser.add_argument("--steps", type=int, default=3, help="score (mean-shift) steps (default 3)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    x, labels = load_standardised()
    n, dim = x.shape
    lengthscale = args.lengthscale or median_lengthscale(x)
    work = os.path.abspath(args.work_dir)  # workers may run elsewhere: absolute paths only
    out = os.path.abspath(args.out)
    os.makedirs(work, exist_ok=True)
    data = write_points(os.path.join(work, "digits.zarr"), x, labels)
    print(f"digits: {n} images, D={dim} standardised pixels (3 blank ones dropped), RBF lengthscale "
          f"{lengthscale:.3f} (median heuristic); data in {data}")

    runner = Runner(args.scheduler, args.workers)
    try:
        g, v = runner(data, out, lengthscale)
        s = g / v[:, None]
        print(f"output {out}: g and v for {n} x {n} pairs in {runner.seconds[-1]:.2f} s (run_workflow, "
              f"scheduler {args.scheduler})")
        from pipeline import kernel_gradients

        g_ref = kernel_gradients(x, kernel="rbf", lengthscale=lengthscale, dtype="float64")
        rel = float(np.max(np.abs(g - g_ref)) / np.max(np.abs(g_ref)))
        print(f"check: run_workflow (float32) vs kernel_gradients (float64): max relative difference "
              f"{rel:.1e}")

        print("\nscore s = g / v = grad log KDE at each image, by digit class:")
        print(f"{'class':>5} {'images':>6} {'mean |s|':>9} {'cos(s, own mean - x)':>21} "
              f"{'cos(s, nearest other mean - x)':>31}")
        for c, count, norm, own, other in class_table(x, labels, s):
            print(f"{c:>5} {count:>6} {norm:>9.3f} {own:>21.2f} {other:>31.2f}")

        print(f"\nscore steps x <- x + l^2 s(x) (mean shift), queries moved, sources the {n} images:")
        log_v0 = np.log(v)
        queries, log_v = x.copy(), log_v0
        print(f"  step 0: mean log KDE {log_v.mean():.3f} (log of v, up to a constant)")
        for step in range(1, args.steps + 1):
            queries = queries + lengthscale ** 2 * s
            moved = write_points(os.path.join(work, f"moved_{step}.zarr"), queries)
            g_q, v_q = runner(moved, os.path.join(work, f"moved_{step}_out.zarr"), lengthscale, sources=data)
            s, new = g_q / v_q[:, None], np.log(v_q)
            change, moved_by = new - log_v, np.linalg.norm(queries - x, axis=1).mean()
            higher, lower = float(np.mean(change > ROUNDING)), float(np.mean(change < -ROUNDING))
            print(f"  step {step}: mean log KDE {new.mean():.3f} ({new.mean() - log_v0.mean():+.3f} from the "
                  f"data); from the step before {100 * higher:.1f}% higher, {100 * lower:.1f}% lower, the "
                  f"rest within float32 rounding ({ROUNDING:g}); mean move {moved_by:.2f}")
            log_v = new
    finally:
        runner.close()

    picture = os.path.join(work, "score.png") if args.plot is None else args.plot
    if picture:
        from pipeline.plot import plot_output

        plot_output(out, picture)
        print(f"\npicture: {picture}")
    print(f"run_workflow calls: {len(runner.seconds)}, {sum(runner.seconds):.1f} s; "
          f"all done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
