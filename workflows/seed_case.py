"""The seed post's case, reproduced: 100 points on [-1, 1], RBF kernel, lengthscale 1.

    python workflows/seed_case.py                         # in process: the post's JAX way and kgrad
    python workflows/seed_case.py --scheduler local       # also end to end on a local dask cluster
    python workflows/seed_case.py --scheduler tcp://host:8786 --work-dir /shared/kgrad-seed

It computes ``grad_kernel_map`` (for each x_j, the derivative of sum_i k(x_j, x_i) in x_j) two ways:

* the post's way: one jitted ``vmap(jacfwd(k))`` over the whole N x N matrix, summed afterwards (and the
  same with ``jacrev``), but with a TRUE squared distance (x_j - x_i)^2: the post's
  ``r2 = -2 X X2' + (X .+ X2')`` is not a distance (its diagonal is not zero; see docs/design.md);
* kgrad's :func:`pipeline.kernel_gradients` (g with unit weights);

checks that both agree with the closed form sum_i -(x_j - x_i) exp(-(x_j - x_i)^2 / 2) (float64), and
prints first-call ("1", compile included) and warm ("2", the second call) times beside the post's
published numbers.  Times are wall-clock seconds on this machine; the post's were on the author's.

With ``--scheduler`` the same case also runs through :func:`pipeline.workflow.run_workflow` (points
written to a zarr store, output group read back): that time includes starting or reaching the cluster,
worker start-up and compiling in the workers, so it is about the machinery, not the arithmetic.  The
work directory must be visible to the workers (a shared filesystem for a remote cluster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial

import numpy as np

# The post's published timings (seconds): first call "1", second call "2".
PUBLISHED = {
    "post: JAX vmap(jacfwd), kernel grad map": (0.077634, 0.000091),
    "post: JAX vmap(jacrev), kernel grad map": (0.192222, 0.000453),
    "post: Julia ForwardDiff, kernel grad map": (0.616478, 0.000298),
}
N_POINTS = 100
LENGTHSCALE = 1.0
WARM_REPEATS = 50


def seed_functions():
    """The post's JAX functions, with a true squared distance in the kernel."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def rbf_kernel(X, X2):
        X = X.reshape(-1, 1)
        X2 = X2.reshape(-1, 1)
        r2 = (X - X2.T) ** 2  # the post had (-2 X X2') + (X + X2'): not a squared distance
        return jnp.exp(-0.5 * jnp.squeeze(r2))

    @partial(jax.jit, static_argnums=1)
    def grad_kernel_map(x, kernel):
        J = jax.vmap(jax.jacfwd(kernel), in_axes=(0, None))(x, x)  # J[j, i] = d k(x_j, x_i) / d x_j
        return jnp.sum(J, axis=1)

    @partial(jax.jit, static_argnums=1)
    def grad_kernel_map_rev(x, kernel):
        J = jax.vmap(jax.jacrev(kernel), in_axes=(0, None))(x, x)
        return jnp.sum(J, axis=1)

    return rbf_kernel, grad_kernel_map, grad_kernel_map_rev


def closed_form(x: np.ndarray, lengthscale: float = LENGTHSCALE) -> np.ndarray:
    """g_j = sum_i d/dx_j exp(-(x_j - x_i)^2 / (2 l^2)) in float64: the oracle."""
    d = x[:, None] - x[None, :]
    return np.sum(-d / lengthscale ** 2 * np.exp(-0.5 * d ** 2 / lengthscale ** 2), axis=1)


def time_calls(fn, repeats: int = WARM_REPEATS):
    """(first call, second call, median of ``repeats`` further warm calls, result) in seconds."""
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    fn()
    second = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return first, second, float(np.median(warm)), np.asarray(result, dtype=np.float64)


def run_in_process(x: np.ndarray) -> dict:
    import jax.numpy as jnp

    from pipeline import kernel_gradients

    rbf_kernel, grad_kernel_map, grad_kernel_map_rev = seed_functions()
    xj = jnp.asarray(x, dtype=jnp.float32)
    rows = {
        "here: JAX vmap(jacfwd), the post's code": time_calls(
            lambda: grad_kernel_map(xj, rbf_kernel).block_until_ready()),
        "here: JAX vmap(jacrev), the post's code": time_calls(
            lambda: grad_kernel_map_rev(xj, rbf_kernel).block_until_ready()),
        "here: kgrad kernel_gradients (float32)": time_calls(
            lambda: kernel_gradients(x, kernel="rbf", lengthscale=LENGTHSCALE)),
        "here: kgrad kernel_gradients (float64)": time_calls(
            lambda: kernel_gradients(x, kernel="rbf", lengthscale=LENGTHSCALE, dtype="float64")),
    }
    return rows


def run_on_cluster(x: np.ndarray, scheduler: str, work_dir: str, workers: int | None) -> tuple[float, np.ndarray]:
    import zarr

    from pipeline.workflow import RunConfig, run_workflow

    work_dir = os.path.abspath(work_dir)  # workers may run elsewhere: hand them absolute paths
    os.makedirs(work_dir, exist_ok=True)
    points, out = os.path.join(work_dir, "points.zarr"), os.path.join(work_dir, "out.zarr")
    group = zarr.open_group(points, mode="w")
    group.create_array("points", data=x[:, None], dimension_names=("point", "dim"))
    config = RunConfig(points=points, out=out, kernel="rbf", lengthscale=LENGTHSCALE, dtype="float32",
                       scheduler=scheduler, workers=workers, overwrite=True, progress=False)
    t0 = time.perf_counter()
    run_workflow(config)
    seconds = time.perf_counter() - t0
    g = np.asarray(zarr.open_group(out, mode="r")["gradient"][:, 0], dtype=np.float64)
    return seconds, g


def agreement(name: str, g: np.ndarray, oracle: np.ndarray) -> float:
    err = float(np.max(np.abs(g - oracle)) / np.max(np.abs(oracle)))
    print(f"  {name:<44} max |g - oracle| / max |oracle| = {err:.2e}")
    return err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", help="also run end to end via run_workflow: 'local' or a dask "
                                            "scheduler address / scheduler file")
    parser.add_argument("--workers", type=int, default=1, help="local cluster workers (default 1)")
    parser.add_argument("--work-dir", default="out/seed_case", help="where the zarr input and output go")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest allowed relative difference between the methods (float32)")
    args = parser.parse_args(argv)

    x = np.linspace(-1.0, 1.0, num=N_POINTS)
    oracle = closed_form(x)
    rows = run_in_process(x)

    print(f"seed case: N={N_POINTS} points on [-1, 1], RBF lengthscale {LENGTHSCALE}, "
          f"g_j = sum_i d k(x_j, x_i) / d x_j")
    print("agreement with the float64 closed form:")
    errors = {name: agreement(name.removeprefix("here: "), result, oracle)
              for name, (_, _, _, result) in rows.items()}
    post_r2 = np.sum(-0.5 * (1.0 - 2.0 * x[None, :]) * np.exp(-0.5 * (-2 * x[:, None] * x[None, :]
                                                               + x[:, None] + x[None, :])), axis=1)
    print(f"  (the post's r2 formula, for contrast: max rel. difference "
          f"{np.max(np.abs(post_r2 - oracle)) / np.max(np.abs(oracle)):.2f}: a different function)")

    print(f"\n{'timings (s)':<44} {'1 (first)':>11} {'2 (second)':>11} {'warm median':>12}")
    for name, (first, second) in PUBLISHED.items():
        print(f"{name:<44} {first:>11.6f} {second:>11.6f} {'':>12}")
    for name, (first, second, warm, _) in rows.items():
        print(f"{name:<44} {first:>11.6f} {second:>11.6f} {warm:>12.6f}")

    if args.scheduler:
        seconds, g = run_on_cluster(x, args.scheduler, args.work_dir, args.workers)
        errors["run_workflow"] = agreement("run_workflow (zarr in/out, float32)", g, oracle)
        print(f"{'here: kgrad run_workflow end to end':<44} {seconds:>11.6f} "
              f"(scheduler {args.scheduler}: cluster, workers, compile, zarr I/O)")

    worst = max(errors.values())
    ok = worst <= args.tolerance
    print(f"\nagreement: {'OK' if ok else 'FAILED'} (worst relative difference {worst:.2e}, "
          f"tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
