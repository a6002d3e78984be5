"""The far field's kernels as Gaussian scale mixtures: what its error bound needs to know of a kernel.

rbf, rational_quadratic and imq are all mixtures of Gaussians over a precision ``tau`` (r in lengthscales):

    rbf                 f(r) = s2 exp(-r^2 / 2)                                    tau = 1
    rational_quadratic  f(r) = s2 (1 + r^2 / (2 alpha))^(-alpha)                   tau ~ Gamma(alpha, rate alpha)
    imq                 f(r) = s2 (c^2 + r^2)^(-beta)
                             = s2 c^(-2 beta) (1 + r^2 / c^2)^(-beta)              tau ~ Gamma(beta, rate c^2 / 2)

since ``(1 + r^2 / (2 b))^(-a) = E[exp(-tau r^2 / 2)]`` for ``tau ~ Gamma(shape a, rate b)``.  Every bound
of the far field (:mod:`pipeline.proxies`, :mod:`pipeline.grid_sums`) is a sum of terms (constant) x (a
bound on a derivative of the kernel), and the n-th derivative of ``exp(-tau r^2 / 2)`` along a line is at
most ``CRAMER sqrt(n!) tau^(n/2)``; integrated over the mixture, the Gaussian's bound is multiplied by the
moment ``E[tau^(n/2)] = Gamma(a + n/2) / (Gamma(a) b^(n/2))`` (1 for rbf).  So the same rigorous bound holds
for the three kernels, with the moments in it, in units of ``kmax = f(0)`` and ``gmax = slope / l_min``
(``slope = sup |f'| / f(0)``).

rbf is a product over dimensions (its node sums are matrix products, :func:`pipeline.grid_sums.node_sums`);
the two others are not, and their node sums are a convolution on the grid done with FFTs
(:func:`pipeline.grid_sums.fft_node_sums`), whose rounding is bounded with the kernel's sum over the grid's
offsets (:meth:`GaussianMixture.offset_sum_bound`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianMixture:
    """A radial kernel ``f(r) = kmax (1 + r^2 / (2 rate))^(-shape)`` (``rate=None``: ``kmax exp(-r^2 / 2)``,
    rbf), r in lengthscales."""

    name: str
    kmax: float  # f(0), variance included
    shape: float | None = None  # Gamma shape of the precision (None: rbf, tau = 1)
    rate: float | None = None

    @property
    def separable(self) -> bool:
        """A product over dimensions (node sums by matrix products), else by FFT convolution."""
        return self.shape is None

    def moment(self, n: float) -> float:
        """``E[tau^n]`` (n >= 0): the factor on a Gaussian's bound for a derivative of order ``2 n``."""
        if self.shape is None:
            return 1.0
        return math.exp(math.lgamma(self.shape + n) - math.lgamma(self.shape) - n * math.log(self.rate))

    @property
    def slope(self) -> float:
        """``sup_r |f'(r)| / f(0)``: at ``r*^2 = 2 rate / (2 shape + 1)`` (rbf: r* = 1, exp(-1/2))."""
        if self.shape is None:
            return math.exp(-0.5)
        a, b = self.shape, self.rate
        r2 = 2.0 * b / (2.0 * a + 1.0)
        return a * math.sqrt(r2) / b * (1.0 + r2 / (2.0 * b)) ** (-a - 1.0)

    def profile(self, r2: np.ndarray) -> np.ndarray:
        """``f / f(0)`` at squared distances ``r2`` (lengthscales^2), float64."""
        r2 = np.asarray(r2, np.float64)
        if self.shape is None:
            return np.exp(-0.5 * r2)
        return np.exp(-self.shape * np.log1p(r2 / (2.0 * self.rate)))

    def offset_sum_bound(self, shape: tuple, spacing: float) -> float:
        """An upper bound on ``sum_m f(|m| h) / f(0)`` over the grid offsets ``|m_d| < shape[d]`` (``h`` =
        ``spacing`` lengthscales): by AM-GM, ``1 + sum_d y_d >= prod_d (1 + y_d)^(1/D)``, so ``f / f(0) <=
        prod_d (1 + (m_d h)^2 / (2 rate))^(-shape / D)``, whose sum is a product of 1-D sums."""
        dim = len(shape)
        total = 1.0
        for n in shape:
            m = np.arange(-(n - 1), n, dtype=np.float64) * spacing
            if self.shape is None:
                total *= float(np.exp(-0.5 * m * m).sum())
            else:
                total *= float(np.exp(-(self.shape / dim) * np.log1p(m * m / (2.0 * self.rate))).sum())
        return total


def mixture_for(spec) -> GaussianMixture | str:
    """The kernel of ``spec`` (a :class:`pipeline.kernels.KernelSpec`) as a Gaussian scale mixture, or why
    it is not one the far field knows."""
    params = dict(spec.params)
    if spec.kernel.user:
        return f"no far field for the user kernel {spec.name}: its bound needs a known radial profile"
    if spec.name == "rbf":
        return GaussianMixture("rbf", float(spec.variance))
    if spec.name == "rational_quadratic":
        alpha = float(params["alpha"])
        return GaussianMixture("rational_quadratic", float(spec.variance), alpha, alpha)
    if spec.name == "imq":
        c, beta = float(params["c"]), float(params["beta"])
        return GaussianMixture("imq", float(spec.variance) * c ** (-2.0 * beta), beta, c * c / 2.0)
    return (f"no far field for kernel {spec.describe()}: a rigorous interpolation bound is derived for the "
            f"Gaussian scale mixtures rbf, rational_quadratic, imq and (split, pipeline.matern_split) the Matern "
            f"kernels only")


RBF = GaussianMixture("rbf", 1.0)
