"""In-process Python API: numpy in, numpy out, no cluster.  See :func:`kernel_gradients`."""

from __future__ import annotations

import numpy as np

from .finite import check_finite_result
from .inputs import as_point_array, as_weights, check_same_dim
from .plan import usable_cores
from .precision import on_cpu
from .problem import make_problem


def kernel_gradients(points, sources=None, weights=None, *, kernel="rbf", lengthscale=1.0, variance=1.0,
                     dtype="float32", mode="auto", return_value=False, tolerance=0.0, method="auto", **params):
    """Summed input-gradients of a kernel sum, in this process.

    For queries ``q_j`` (rows of ``points``) and sources ``x_i`` with weights ``w_i``:

        g_j = sum_i w_i grad_q k(q_j, x_i)     (the derivative in the first argument only)
        v_j = sum_i w_i k(q_j, x_i)

    Parameters
    ----------
    points : array (N, D), or (N,) meaning D = 1 (the gradient then has shape (N,)).
    sources : array (M, D), default ``points``.
    weights : array (M,), default ones.
    kernel : a name from :data:`pipeline.kernels.KERNELS` or a user kernel ``"module:function"``.
    lengthscale : scalar or one per dimension (same units as the points).
    variance : the kernel's scale s2 (units of k).
    dtype : ``"float32"`` or ``"float64"``: the compute precision (sums are accumulated in float64).
    mode : ``"auto"`` (structured fast path where the kernel has one), ``"jacfwd"`` or ``"jacrev"``
        (generic ``vmap`` over rows of that JAX transform).
    return_value : also return the kernel sums ``v``.
    tolerance : 0 (default) computes every pair.  ``EPS > 0`` lets kernels whose profile decays to 0 (rbf,
        matern12/32/52, rational_quadratic, imq) skip far sources, with, per query j,
        ``|g^_j - g_j| <= EPS * sum|w| * gmax`` and ``|v^_j - v_j| <= EPS * sum|w| * kmax`` (``kmax = max k``,
        ``gmax = max |grad_q k|``; see :mod:`pipeline.pruning`), on top of the dtype's own rounding.  For
        rbf, rational_quadratic, imq and the Matern kernels in D <= 3 the far field
        (:mod:`pipeline.methods.far_field`) keeps the same bound at every lengthscale, where it is faster.
    method : ``"auto"`` (the first of ``far_field``, ``pruned``, ``dense`` that can run the problem and is
        expected to be faster than the next), or one of those names (an error saying why if it cannot).
    **params : the kernel's own parameters (``alpha``, ``c``, ``beta``, ``period``, ``degree``).

    Returns
    -------
    g, or (g, v) with ``return_value=True``; numpy arrays of ``dtype``.
    """
    queries = as_point_array(points, "points")
    one_d = np.ndim(points) == 1
    srcs = queries if sources is None else as_point_array(sources, "sources")
    check_same_dim(queries, srcs)
    w = None if weights is None else as_weights(weights, srcs.shape[0])
    problem = make_problem(queries, srcs, kernel=kernel, lengthscale=lengthscale, variance=variance,
                           params=params, dtype=dtype, mode=mode, tolerance=tolerance, weights=w,
                           sources_are_points=sources is None, method=method)
    g, v, _ = problem.compute(threads=usable_cores() if on_cpu() else 1)
    check_finite_result(g, v, dtype, problem.spec.describe(), dtype_option='dtype="float64"')
    if one_d:
        g = g[:, 0]
    return (g, v) if return_value else g
