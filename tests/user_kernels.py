"""User kernels for the tests, loaded by kgrad as 'user_kernels:NAME' (single-point k(q, x, p)).

Each has a hand-written numpy twin (value and gradient w.r.t. q, summed with weights) for the oracle.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def logcosh(q, x, p):
    """k(q, x) = s2 exp(-gamma sum_d log cosh((q_d - x_d) / l_d)): smooth, heavier tails than rbf.

    log cosh(t) is written as |t| + log1p(exp(-2|t|)) - log 2, which is exact and overflow-free.
    """
    t = jnp.abs((q - x) / p["lengthscale"])
    log_cosh = t + jnp.log1p(jnp.exp(-2.0 * t)) - jnp.log(2.0)
    return p["variance"] * jnp.exp(-p["gamma"] * jnp.sum(log_cosh))


def logcosh_reference(q, x, w, lengthscale, variance, gamma):
    """numpy float64 (g, v) for :func:`logcosh`: grad_q k = -gamma k tanh((q - x) / l) / l."""
    q, x, w = np.asarray(q, float), np.asarray(x, float), np.asarray(w, float)
    ls = np.broadcast_to(np.asarray(lengthscale, float), (q.shape[1],))
    t = (q[:, None, :] - x[None, :, :]) / ls
    k = variance * np.exp(-gamma * np.sum(np.log(np.cosh(t)), axis=2))
    grad = -gamma * k[:, :, None] * np.tanh(t) / ls
    return np.einsum("nmd,m->nd", grad, w), k @ w


def cubic_dot(q, x, p):
    """A non-stationary user kernel: k(q, x) = s2 (q . x / 4 + 1)^3 (no lengthscale)."""
    return p["variance"] * (jnp.dot(q, x) / 4.0 + 1.0) ** 3


def cubic_dot_reference(q, x, w, variance):
    q, x, w = np.asarray(q, float), np.asarray(x, float), np.asarray(w, float)
    base = q @ x.T / 4.0 + 1.0
    return (variance * 3.0 * base**2 / 4.0 * w) @ x, (variance * base**3) @ w
