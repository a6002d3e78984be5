"""Peer libraries for Gaussian kernel sums, as optional adapters for the benchmarks.

Each adapter computes, for queries q_j, sources x_i and weights w_i,

    v_j = sum_i w_i exp(-|q_j - x_i|^2 / (2 lengthscale^2))

in float64 and returns ``(values, seconds_build, seconds_eval)``: ``values`` in query order; the build
covers what depends on the points only, the evaluation what depends on the weights (and the queries).
Each imports its library when called and raises ImportError, with the pip command, when it is missing.

- ``ferreus_gaussian_values``: ferreus-bbfmm (Rust, rayon-parallel black-box FMM, D = 1..3). Its
  ``GaussianRbf`` kernel is exp(-3 r^2), so points are multiplied by 1 / (lengthscale sqrt 6). Sources and
  queries may differ; the queries are passed to the tree build so that its extents cover them (the library
  refuses queries outside the tree, and a sparse tree may lack the leaf a query falls in, so the tree is
  dense). Rayon fixes its thread count at the first use in a process (see ``threads``).
- ``nfft_gaussian_values``: pyNFFT3's ``FASTSUM`` (NFFT-based fast summation, Fenn and Steidl; bundled
  OpenMP binaries). Its ``"gaussian"`` kernel is exp(-r^2 / c^2) and every point must lie in the ball of
  radius (1/2 - eps_B) / 2, so points are centred and multiplied by a, and c = sqrt(2) lengthscale a. The
  Gaussian is smooth, so there is no near-field part (eps_I = 0): the error is that of truncating its
  Fourier series at bandwidth n and of the NFFT window (cut-off m), both chosen from ``eps``. The bandwidth
  grows as (extent of the points) / lengthscale, and the FFT grid holds (2n)^D complex numbers.

``python benchmarks/peers.py`` checks both against numpy float64 direct sums and prints one JSON line.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

_RAYON_THREADS: list = []  # the thread count of ferreus's first call in this process (None: rayon's default)


def _points(a) -> np.ndarray:
    """(N, D) C-contiguous float64 array from (N, D) or (N,) input."""
    a = np.asarray(a, dtype=np.float64)
    return np.ascontiguousarray(a.reshape(len(a), -1))


def ferreus_gaussian_values(sources, weights, queries, lengthscale, order, eps=1e-8, threads=None):
    """The Gaussian sum by ferreus-bbfmm at Chebyshev order ``order`` with SVD-compressed M2L (``eps``).

    Build: ``FmmTree`` (tree and M2M/M2L operators); evaluation: ``set_weights`` (upward pass) and
    ``evaluate`` (downward pass, leaves, near field). ``threads`` sets RAYON_NUM_THREADS before rayon's
    global pool starts, which is at the first call in a process; a later call asking for another count
    raises RuntimeError (run it in a fresh process).
    """
    try:
        import ferreus_bbfmm as fb
    except ImportError as e:
        raise ImportError("ferreus_gaussian_values needs ferreus-bbfmm: pip install ferreus-bbfmm") from e
    if not _RAYON_THREADS:
        if threads is not None:
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        _RAYON_THREADS.append(threads)
    elif threads is not None and threads != _RAYON_THREADS[0]:
        raise RuntimeError(f"rayon's pool was started with threads={_RAYON_THREADS[0]} in this process; "
                           f"threads={threads} needs a fresh process")
    scale = 1.0 / (lengthscale * math.sqrt(6.0))  # exp(-3 (s r)^2) = exp(-r^2 / (2 l^2))
    x = _points(sources) * scale
    q = _points(queries) * scale
    w = np.asarray(weights, dtype=np.float64).reshape(-1, 1)
    t0 = time.perf_counter()
    tree = fb.FmmTree(x, order, fb.KernelParams(fb.FmmKernelType.GaussianRbf), False,
                      params=fb.FmmParams(256, fb.M2LCompressionType.SVD, eps, 1024), target_points=q)
    t1 = time.perf_counter()
    tree.set_weights(w)
    values = tree.evaluate(w, q)
    t2 = time.perf_counter()
    return np.asarray(values, dtype=np.float64).reshape(-1), t1 - t0, t2 - t1


def nfft_gaussian_values(sources, weights, queries, lengthscale, eps=1e-8, n=None, m=None, p=8,
                         eps_B=1 / 16, threads=None):
    """The Gaussian sum by pyNFFT3's ``FASTSUM`` with kernel ``"gaussian"``.

    ``n`` (expansion bandwidth, even) defaults to the smallest with sqrt(pi) c exp(-(pi c n / 2)^2) <= eps
    and ``m`` (NFFT cut-off) to ceil(ln(1/eps) / (pi sqrt 2)), at oversampling 2 (nn = 2n); ``p`` (smoothness
    of the regularisation near the boundary) and ``eps_B`` (boundary width) are the library's. ``threads``
    sets the OpenMP thread count of the fastsum library (default: all cores). Build: the plan and the
    nodes (``FASTSUM``, ``x``, ``y``); evaluation: ``alpha`` and ``fastsum_trafo``.
    """
    try:
        import pyNFFT3
    except ImportError as e:
        raise ImportError("nfft_gaussian_values needs pyNFFT3: pip install pynfft3") from e
    if threads is not None:
        pyNFFT3._fastsumlib.omp_set_num_threads(int(threads))
    x, q = _points(sources), _points(queries)
    d = x.shape[1]
    both = np.concatenate([x, q])
    centre = (both.max(0) + both.min(0)) / 2
    radius = max(float(np.linalg.norm(both - centre, axis=1).max()), lengthscale)
    a = (0.5 - eps_B) / 2 / radius * (1 - 1e-9)  # the library checks |point| <= (1/2 - eps_B) / 2
    c = math.sqrt(2.0) * lengthscale * a
    if n is None:
        n = 2 * math.ceil(math.sqrt(max(math.log(math.sqrt(math.pi) * c / eps), 1.0)) / (math.pi * c))
    if m is None:
        m = max(2, math.ceil(math.log(1 / eps) / (math.pi * math.sqrt(2.0))))
    shape = (-1,) if d == 1 else (-1, d)  # the library takes 1-D nodes as a vector
    t0 = time.perf_counter()
    plan = pyNFFT3.FASTSUM(d, len(x), len(q), "gaussian", c, n=n, p=p, eps_I=0.0, eps_B=eps_B, nn=2 * n, m=m)
    plan.x = np.ascontiguousarray(((x - centre) * a).reshape(shape))
    plan.y = np.ascontiguousarray(((q - centre) * a).reshape(shape))
    t1 = time.perf_counter()
    plan.alpha = np.asarray(weights, dtype=np.float64).reshape(-1).astype(np.complex128)
    plan.fastsum_trafo()
    values = plan.f.real.copy()  # plan.f is a view of the plan's memory
    t2 = time.perf_counter()
    return values, t1 - t0, t2 - t1


def _direct(sources, weights, queries, lengthscale, chunk=20) -> np.ndarray:
    """numpy float64 direct sum, a few queries at a time."""
    x, q = _points(sources), _points(queries)
    out = np.empty(len(q))
    for s in range(0, len(q), chunk):
        d2 = ((q[s:s + chunk, None, :] - x[None, :, :]) ** 2).sum(-1)
        out[s:s + chunk] = np.exp(-d2 / (2 * lengthscale**2)) @ weights
    return out


def _check(name, fn, x, w, q, ref, idx, **kw) -> dict:
    """Run one adapter; its times, process CPU seconds and errors at the queries ``idx`` against ``ref``."""
    cpu0 = time.process_time()
    try:
        v, build, ev = fn(x, w, q, **kw)
    except Exception as e:  # an optional peer: record why it failed
        return {"peer": name, **kw, "error": f"{type(e).__name__}: {e}"}
    cpu = time.process_time() - cpu0
    err = float(np.abs(v[idx] - ref).max())
    return {"peer": name, **kw, "seconds_build": round(build, 3), "seconds_eval": round(ev, 3),
            "cpu_over_wall": round(cpu / (build + ev), 2), "max_abs_err": err,
            "max_err_over_sum_abs_w": err / float(np.abs(w).sum()), "max_rel_err": err / float(np.abs(ref).max())}


def main() -> None:
    """N = 2000 accuracy checks (all queries), then N = 1e5 points as sources and queries, 200 checked."""
    import json

    rng = np.random.default_rng(0)
    runs = {"small": [], "large": []}
    x, q = rng.standard_normal((2000, 3)), rng.standard_normal((2000, 3))
    w = rng.standard_normal(2000)
    ref = _direct(x, w, q, 0.42)
    idx = np.arange(len(q))
    runs["small"].append(_check("ferreus_bbfmm", ferreus_gaussian_values, x, w, q, ref, idx, lengthscale=0.42, order=8))
    runs["small"].append(_check("pynfft3", nfft_gaussian_values, x, w, q, ref, idx, lengthscale=0.42))
    x = rng.standard_normal((100_000, 3))
    w = rng.standard_normal(len(x))
    idx = rng.choice(len(x), 200, replace=False)
    ref = _direct(x, w, x[idx], 0.42)
    for order in (6, 8):
        runs["large"].append(_check("ferreus_bbfmm", ferreus_gaussian_values, x, w, x, ref, idx, lengthscale=0.42, order=order))
    for eps in (1e-6, 1e-8):
        runs["large"].append(_check("pynfft3", nfft_gaussian_values, x, w, x, ref, idx, lengthscale=0.42, eps=eps))
    ok = all(r.get("max_err_over_sum_abs_w", 1.0) < 1e-5 for r in runs["small"])
    print(json.dumps({"check": "peers", "small_ok": ok, "load_average": os.getloadavg(), **runs}))


if __name__ == "__main__":
    main()
