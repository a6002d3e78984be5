"""The formulations kgrad is compared with, and float64 numpy oracles to check every one of them.

All compute, for queries = sources = X (N, D) with unit weights and unit lengthscale,

    g_j = sum_i grad_q k(q, x_i) at q = x_j         (N, D); (N,) when X is 1-D (D = 1)

* ``seed_map``: the classic post's ``grad_kernel_map`` (shared/seed.txt), ported to current JAX:
  ``jit(lambda x: sum(vmap(jacfwd(row_kernel), in_axes=(0, None))(x, x), axis=1))`` where
  ``row_kernel(x_j, X)`` is the vector ``k(x_j, X_i)`` over i.  It builds the whole (N, N, D) Jacobian
  and sums after.  The post's ``r2 = -2 X X' + (X .+ X')`` is not a squared distance; this port uses
  the true one, ``|x_j - X_i|^2`` (docs/design.md).
* ``gemm_rbf``: the whole-matrix GEMM form in one jit: r2 by GEMM, exp, then ``K @ X`` and ``K @ 1``.
* ``keops_rbf``: KeOps LazyTensors with the closed-form gradient (optional: pykeops).
* ``exp_sum`` / ``sin_sum``: the ceilings, one fused elementwise op + sum over a flat array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PERIOD = 1.0  # the periodic kernel's period (kgrad's default); lengthscale 1


# ----------------------------------------------------------------------------- the seed's approach


def _sum_last(a):
    """Sum over the point dimension of (M, D) differences; identity for 1-D (D = 1) inputs."""
    return a if a.ndim == 1 else jnp.sum(a, axis=-1)


def rbf_row(xj, X):
    """k(x_j, X_i) = exp(-|x_j - X_i|^2 / 2) for all i: a vector of length N (true distances)."""
    d = xj - X
    return jnp.exp(-0.5 * _sum_last(d * d))


def periodic_row(xj, X):
    """k(x_j, X_i) = exp(-2 sum_d sin^2(pi (x_jd - X_id) / period)) for all i."""
    s = jnp.sin(jnp.pi * (xj - X) / PERIOD)
    return jnp.exp(-2.0 * _sum_last(s * s))


ROW_KERNELS = {"rbf": rbf_row, "periodic": periodic_row}


def seed_map(kernel: str, ad: str):
    """The seed's ``grad_kernel_map``: whole (N, N, D) Jacobian by ``vmap(jacfwd|jacrev)``, summed after."""
    row = ROW_KERNELS[kernel]
    transform = {"jacfwd": jax.jacfwd, "jacrev": jax.jacrev}[ad]
    return jax.jit(lambda x: jnp.sum(jax.vmap(transform(row), in_axes=(0, None))(x, x), axis=1))


def xla_temp_bytes(fn, *args) -> int | None:
    """Scratch memory XLA allots to the compiled ``fn(*args)`` (compiles it again, ahead of time)."""
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:
        return None


def seed_bytes(n: int, dim: int, itemsize: int) -> int:
    """The seed's Jacobian alone: N * N * D values (XLA may hold more than one such temporary)."""
    return n * n * dim * itemsize


# ----------------------------------------------------------------------------- whole-matrix GEMM


def gemm_rbf():
    """One jit: r2 = |q|^2 + |x|^2 - 2 Q X' (GEMM), K = exp(-r2/2), g = K @ X - Q * (K @ 1)."""

    @jax.jit
    def gradient(x):
        x2 = x.reshape(x.shape[0], -1)
        sq = jnp.sum(x2 * x2, axis=1)
        r2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x2 @ x2.T), 0.0)
        k = jnp.exp(-0.5 * r2)
        g = k @ x2 - x2 * (k @ jnp.ones((x2.shape[0], 1), x2.dtype))  # sum_i (x_i - q_j) k_ji
        return g.reshape(x.shape)

    return gradient


def gemm_bytes(n: int, itemsize: int) -> int:
    return n * n * itemsize  # one N x N matrix (r2 / K); XLA fuses exp into it or holds two


# ----------------------------------------------------------------------------- KeOps (optional)


def keops_available() -> tuple[bool, str]:
    """(True, version) if pykeops imports and can build a CPU reduction; else (False, why)."""
    try:
        import pykeops
    except Exception as exc:  # ImportError, or a broken install
        return False, f"pykeops not importable ({type(exc).__name__}: {exc}); pip install pykeops"
    try:
        pykeops.set_verbose(False)
    except Exception:
        pass
    try:
        probe = keops_rbf()
        out = probe(np.zeros((4, 3), np.float32))
        if not np.all(np.isfinite(out)):
            return False, "pykeops built, but its probe returned non-finite values"
    except Exception as exc:
        return False, f"pykeops could not compile its CPU module ({type(exc).__name__}: {exc})"
    return True, getattr(pykeops, "__version__", "?")


def keops_on_gpu() -> bool:
    try:
        import pykeops.config

        return bool(pykeops.config.gpu_available)
    except Exception:
        return False


def keops_rbf():
    """KeOps LazyTensor Gaussian kernel with the closed-form gradient: sum_j (x_j - q_i) k_ij."""
    from pykeops.numpy import LazyTensor

    def gradient(x):
        x2 = np.ascontiguousarray(x.reshape(x.shape[0], -1))
        q_i = LazyTensor(x2[:, None, :])
        x_j = LazyTensor(x2[None, :, :])
        d = x_j - q_i
        k = (-0.5 * (d ** 2).sum(-1)).exp()
        return (k * d).sum(axis=1).reshape(x.shape)

    return gradient


# ----------------------------------------------------------------------------- ceilings


def exp_sum():
    """The float ceiling: one fused exp + sum; one element = one pair (a pair needs at least one exp)."""
    return jax.jit(lambda a: jnp.sum(jnp.exp(a)))


def sin_sum():
    """The periodic kernel's floor of work: one sin per pair and dimension (so pairs/s <= sin/s / D)."""
    return jax.jit(lambda a: jnp.sum(jnp.sin(a)))


def ceiling_input(n: int, dtype: str, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-8.0, 0.0, n).astype(dtype)


# ----------------------------------------------------------------------------- float64 oracles


def reference_gradient(kernel: str, x, block: int = 256) -> np.ndarray:
    """g_j = sum_i grad_q k(x_j, x_i) in float64 numpy, row blocks of ``block`` (the test oracle)."""
    x = np.asarray(x, np.float64)
    x2 = x.reshape(x.shape[0], -1)
    g = np.empty_like(x2)
    for start in range(0, x2.shape[0], block):
        d = x2[start:start + block, None, :] - x2[None, :, :]  # q - x, (B, M, D)
        if kernel == "rbf":
            k = np.exp(-0.5 * np.sum(d * d, axis=-1))
            g[start:start + block] = -np.einsum("bm,bmd->bd", k, d)
        elif kernel == "periodic":
            a = np.pi * d / PERIOD
            k = np.exp(-2.0 * np.sum(np.sin(a) ** 2, axis=-1))
            g[start:start + block] = -(2.0 * np.pi / PERIOD) * np.einsum("bm,bmd->bd", k, np.sin(2.0 * a))
        else:
            raise ValueError(kernel)
    return g.reshape(x.shape)


def relative_error(g, reference) -> float:
    """max |g - ref| / max |ref| (one number per result; float32 results land near 1e-6)."""
    g = np.asarray(g, np.float64)
    reference = np.asarray(reference, np.float64)
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(g - reference)) / scale)
