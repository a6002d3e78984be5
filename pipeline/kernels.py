"""Kernels (covariance functions) as tiny pure functions on single points.

Every kernel is ``k(q, x, p) -> scalar`` for two points ``q, x`` of shape (D,) and a parameter dict ``p``
holding ``lengthscale`` (shape (D,)), ``variance`` (scalar) and the kernel's own parameters.  Gradients are
never written by hand: the tile code in :mod:`pipeline.tiles` derives them with JAX.

Some kernels also declare *structure* that the fast paths use:

* a radial profile ``f(r2, p)`` with ``k(q, x) = f(r2)`` and ``r2 = sum_d ((q_d - x_d) / l_d)^2``;
* a dot-product profile ``f(s, p)`` with ``k(q, x) = f(q . x)``;
* for a radial kernel of the Gaussian family, ``f(r2) = f(0) exp(e(r2))`` with an exponent ``e`` linear in
  ``r2`` (``e(0) = 0``, ``e' < 0``): then ``f' = e' f``, so one exp and one GEMM give both sums.

Formulas (``s2`` = variance, ``r = sqrt(r2)``):

==================  ==========================================================  ======================
name                k(q, x)                                                      parameters (default)
==================  ==========================================================  ======================
rbf                 s2 exp(-r2 / 2)
matern12            s2 exp(-r)
matern32            s2 (1 + sqrt3 r) exp(-sqrt3 r)
matern52            s2 (1 + sqrt5 r + 5 r2 / 3) exp(-sqrt5 r)
rational_quadratic  s2 (1 + r2 / (2 alpha))^(-alpha)                             alpha > 0 (1)
imq                 s2 (c^2 + r2)^(-beta)                                        c > 0 (1), beta > 0 (0.5)
periodic            s2 exp(-2 sum_d sin^2(pi (q_d - x_d) / period) / l_d^2)      period > 0 (1)
linear              s2 q.x                                                       (no lengthscale)
polynomial          s2 (q.x + c)^degree                                          c >= 0 (1), degree >= 1 (2)
==================  ==========================================================  ======================

At ``r = 0`` the Matern kernels use a safe square root (``where`` trick), so that a kernel that is not
differentiable there (matern12) contributes a zero gradient, never NaN.  Matern 3/2 and 5/2 are smooth in
``r2``: below ``r2 = 1e-6`` they use their Taylor series, whose derivative is accurate there and has the
true limit at 0 (the closed forms lose digits to cancellation, and their derivative through the safe
square root would be 0 at ``r2 = 0``).  Powers with a real exponent are
written as ``exp(e * log(b))``, which XLA evaluates several times faster than ``pow`` on CPU.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from .errors import InputError
from .lazy_jax import jnp

SQRT3 = math.sqrt(3.0)
SQRT5 = math.sqrt(5.0)


@dataclass(frozen=True)
class Param:
    """A kernel's own scalar parameter: its default and the domain it must lie in."""

    name: str
    default: float
    lower: float = 0.0
    lower_inclusive: bool = False
    integer: bool = False

    def check(self, kernel: str, value) -> float | int:
        if isinstance(value, bool):
            raise InputError(f"kernel {kernel!r}: parameter {self.name}={value!r} is not a number; "
                             f"it must be {self.describe()}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"kernel {kernel!r}: parameter {self.name}={value!r} is not a number; "
                             f"it must be {self.describe()}") from None
        ok = number >= self.lower if self.lower_inclusive else number > self.lower
        if not math.isfinite(number) or not ok or (self.integer and number != int(number)):
            raise InputError(f"kernel {kernel!r}: parameter {self.name}={value!r} is out of its domain; "
                             f"it must be {self.describe()}")
        return int(number) if self.integer else number

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        op = ">=" if self.lower_inclusive else ">"
        return f"{kind} {op} {self.lower:g} (default {self.default:g})"


@dataclass(frozen=True)
class Kernel:
    """A kernel: its single-point formula, optional structure, and its parameters."""

    name: str
    evaluate: Callable  # k(q, x, p) -> scalar
    params: tuple[Param, ...] = ()
    radial_profile: Callable | None = None  # f(r2, p), k = f(sum(((q - x) / l)^2))
    dot_profile: Callable | None = None  # f(s, p), k = f(q . x)
    # e(r2, p) with f(r2) = f(0) exp(e(r2)), e linear in r2 and decreasing (the Gaussian family): the
    # radial tile then computes one exp and one GEMM per pair, and takes e' from JAX (jacfwd of e).
    exponent: Callable | None = None
    uses_lengthscale: bool = True
    stationary: bool = True  # k(q + c, x + c) = k(q, x): inputs may be re-centred
    user: bool = False  # loaded from 'module:function'; takes any numeric parameters
    # How the radial fast path gets r2 and the sum over (q - x).  "gemm": |u|^2 + |x|^2 - 2 u.x by GEMM
    # (fastest; fine for kernels smooth in r2).  "wide": that GEMM in float64 for float32 runs (Matern
    # 3/2, 5/2 use r = sqrt(r2), whose derivative is infinite at 0, so r2's rounding near 0 matters).
    # "direct": exact per-dimension differences for r2 and for sum_i f'_ji (q_j - x_i) (Matern 1/2,
    # whose f'(r2) ~ 1/r turns the GEMM form's cancellation into large errors for close pairs).
    distances: str = "gemm"

    @property
    def structure(self) -> str:
        if self.radial_profile is not None:
            return "radial"
        if self.dot_profile is not None:
            return "dot"
        return "generic"


def _safe_sqrt(r2):
    """sqrt(r2) whose derivative at r2 = 0 is 0 instead of inf (so gradients there are 0, not NaN)."""
    positive = r2 > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, r2, 1.0)), 0.0)


def _scaled_r2(q, x, p):
    d = (q - x) / p["lengthscale"]
    return jnp.sum(d * d)


def _radial(name, profile, params=(), distances="gemm", exponent=None):
    def evaluate(q, x, p):
        return profile(_scaled_r2(q, x, p), p)

    return Kernel(name=name, evaluate=evaluate, params=params, radial_profile=profile,
                  distances=distances, exponent=exponent)


def _rbf_exponent(r2, p):
    return -0.5 * r2


def _rbf(r2, p):
    return p["variance"] * jnp.exp(_rbf_exponent(r2, p))


def _matern12(r2, p):
    return p["variance"] * jnp.exp(-_safe_sqrt(r2))


# Below this r2 the Matern 3/2 and 5/2 profiles use their Taylor series.  The closed forms lose digits in
# their derivative there (cancellation: 1e-11 to 3e-10 relative in float64 below r2 = 1e-10), and through
# the safe square root their derivative at r2 = 0 is 0 instead of the true limit (-3/2 and -5/6 times the
# variance), so a near-duplicate pair whose r2 rounds to 0 (GEMM distances) lost its gradient.  The series
# to a^8 (a = sqrt(3 r2) or sqrt(5 r2)) is accurate to 1e-15 relative below the threshold, in f and f'.
NEAR_ZERO_R2 = 1e-6
SERIES_ORDER = 8


def _near_zero_series(poly: tuple, scale: float) -> tuple[tuple, tuple]:
    """Coefficients of poly(a) exp(-a), a = sqrt(scale r2), as E(r2) + a O(r2): (E's, O's) coefficients in
    powers of r2, from the constant up.  The a^1 coefficient must vanish (f is smooth in r2 at 0)."""
    c = [sum(p * (-1) ** (k - j) / math.factorial(k - j) for j, p in enumerate(poly) if j <= k)
         for k in range(SERIES_ORDER + 1)]
    assert abs(c[1]) < 1e-15, c
    even = tuple(c[k] * scale ** (k // 2) for k in range(0, SERIES_ORDER + 1, 2))
    odd = tuple(c[k] * scale ** ((k - 1) // 2) for k in range(3, SERIES_ORDER + 1, 2))
    return even, (0.0, *odd)


def _polyval(coefficients: tuple, x):
    """sum_k coefficients[k] x^k by Horner's rule."""
    total = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        total = total * x + c
    return total


_MATERN32_SERIES = _near_zero_series((1.0, 1.0), 3.0)
_MATERN52_SERIES = _near_zero_series((1.0, 1.0, 1.0 / 3.0), 5.0)


def _matern_near_zero(r2, a, series):
    even, odd = series
    return _polyval(even, r2) + a * _polyval(odd, r2)


def _matern32(r2, p):
    a = SQRT3 * _safe_sqrt(r2)
    full = (1.0 + a) * jnp.exp(-a)
    return p["variance"] * jnp.where(r2 < NEAR_ZERO_R2, _matern_near_zero(r2, a, _MATERN32_SERIES), full)


def _matern52(r2, p):
    a = SQRT5 * _safe_sqrt(r2)
    full = (1.0 + a + (5.0 / 3.0) * r2) * jnp.exp(-a)
    return p["variance"] * jnp.where(r2 < NEAR_ZERO_R2, _matern_near_zero(r2, a, _MATERN52_SERIES), full)


def _rational_quadratic(r2, p):
    alpha = p["alpha"]
    return p["variance"] * jnp.exp(-alpha * jnp.log1p(r2 / (2.0 * alpha)))


def _imq(r2, p):
    return p["variance"] * jnp.exp(-p["beta"] * jnp.log(p["c"] ** 2 + r2))


def _sin_pi_coefficients(terms: int) -> tuple[float, ...]:
    """Taylor coefficients of sin(pi r) / r in powers of r^2."""
    c = [math.pi]
    for k in range(1, terms):
        c.append(c[-1] * -(math.pi ** 2) / ((2 * k) * (2 * k + 1)))
    return tuple(c)


# Enough terms that the truncation error on |r| <= 1/2 is below the dtype's rounding:
# (pi/2)^13 / 13! = 6e-8 (float32), (pi/2)^25 / 25! = 2e-20 (float64).
_SIN_PI = {4: _sin_pi_coefficients(7), 8: _sin_pi_coefficients(13)}


def sin_pi_squared(t):
    """sin(pi t)^2, exactly range-reduced (r = t - round(t), |r| <= 1/2; sin^2 has period 1) and then a
    polynomial.  XLA's CPU sin is several times slower than these fused multiply-adds."""
    r = t - jnp.round(t)
    z = r * r
    coefficients = _SIN_PI[8 if t.dtype == jnp.float64 else 4]
    poly = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        poly = poly * z + c
    s = r * poly
    return s * s


def _periodic(q, x, p):
    s2 = sin_pi_squared((q - x) / p["period"]) / (p["lengthscale"] * p["lengthscale"])
    return p["variance"] * jnp.exp(-2.0 * jnp.sum(s2))


def _linear_profile(s, p):
    return p["variance"] * s


def _polynomial_profile(s, p):
    return p["variance"] * (s + p["c"]) ** p["degree"]  # integer degree: lax.integer_pow


def _dot(name, profile, params=()):
    def evaluate(q, x, p):
        return profile(jnp.dot(q, x), p)

    return Kernel(name=name, evaluate=evaluate, params=params, dot_profile=profile,
                  uses_lengthscale=False, stationary=False)


KERNELS: Mapping[str, Kernel] = {
    k.name: k
    for k in (
        _radial("rbf", _rbf, exponent=_rbf_exponent),
        _radial("matern12", _matern12, distances="direct"),
        _radial("matern32", _matern32, distances="wide"),
        _radial("matern52", _matern52,
                distances="wide"),
        _radial("rational_quadratic", _rational_quadratic, (Param("alpha", 1.0),)),
        _radial("imq", _imq, (Param("c", 1.0), Param("beta", 0.5))),
        Kernel("periodic", _periodic, (Param("period", 1.0),)),
        _dot("linear", _linear_profile),
        _dot("polynomial", _polynomial_profile,
             (Param("c", 1.0, lower_inclusive=True), Param("degree", 2, lower=1, lower_inclusive=True,
                                                           integer=True))),
    )
}


@dataclass(frozen=True)
class KernelSpec:
    """A kernel with validated parameters, fixed for one run.  Hashable: it keys the compile cache.

    ``lengthscale`` has one entry per dimension (length D; ones for kernels without a lengthscale);
    ``params`` holds the kernel's own parameters as sorted ``(name, value)`` pairs.
    """

    name: str
    lengthscale: tuple[float, ...]
    variance: float
    params: tuple[tuple[str, float | int], ...] = field(default=())

    @property
    def kernel(self) -> Kernel:
        return get_kernel(self.name)

    def param_dict(self) -> dict:
        """Parameters as passed to ``k(q, x, p)`` (plain Python numbers)."""
        return {"lengthscale": self.lengthscale, "variance": self.variance, **dict(self.params)}

    def describe(self) -> str:
        extra = "".join(f", {k}={v:g}" for k, v in self.params)
        ls = "" if not self.kernel.uses_lengthscale else f", lengthscale={_fmt_ls(self.lengthscale)}"
        return f"{self.name}(variance={self.variance:g}{ls}{extra})"


def _fmt_ls(ls):
    return f"{ls[0]:g}" if len(set(ls)) == 1 else "[" + ", ".join(f"{v:g}" for v in ls) + "]"


def load_user_kernel(ref: str) -> Kernel:
    """Load ``module:function`` (a single-point ``k(q, x, p)``) as a generic, non-stationary kernel."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise InputError(f"kernel {ref!r} is not known; use one of {', '.join(KERNELS)} "
                         f"or an importable 'module:function'")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except Exception as exc:  # ImportError, AttributeError, or the module's own errors on import (user code)
        raise InputError(f"user kernel {ref!r} could not be loaded ({exc}); it must be an importable "
                         f"'module:function' taking (q, x, params)") from exc
    if not callable(fn):
        raise InputError(f"user kernel {ref!r} is not callable; it must be a function k(q, x, params)")
    return Kernel(name=ref, evaluate=fn, stationary=False, user=True)


def user_kernel_code(spec: KernelSpec, dim: int) -> str | None:
    """A digest of what a user kernel computes, or None for kgrad's own kernels (the version covers those).

    Why: a user kernel is named only by 'module:function', so a kernel edited between an interrupted run
    and its ``--resume`` would fill the rest of the output with another function.  The digest covers the
    function's source, its module file's bytes (helpers, constants) and its jaxpr on two points of
    dimension ``dim`` (code it calls in other modules), so the run identity changes when any of them does.
    """
    kernel = spec.kernel
    if not kernel.user:
        return None
    import hashlib
    import inspect

    import jax

    fn = kernel.evaluate
    parts = []
    try:
        parts.append(inspect.getsource(fn))
    except (OSError, TypeError):  # no source to read (a builtin, a C extension, a REPL function)
        parts.append(repr(fn))
    try:
        with open(inspect.getfile(inspect.unwrap(fn)), "rb") as f:
            parts.append(f.read().decode("utf-8", "surrogateescape"))
    except (OSError, TypeError):
        parts.append("")
    point = jax.ShapeDtypeStruct((dim,), jnp.float32)
    params = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in spec.param_dict().items()}
    try:
        parts.append(str(jax.make_jaxpr(fn)(point, point, params)))
    except Exception as exc:  # noqa: BLE001 - _check_user_kernel reports a kernel that fails to trace
        parts.append(type(exc).__name__)
    return hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def get_kernel(name: str) -> Kernel:
    if name in KERNELS:
        return KERNELS[name]
    if ":" in name:
        return load_user_kernel(name)
    from .options import unknown_kernel

    raise unknown_kernel(name)


def make_spec(name: str, dim: int, lengthscale=1.0, variance=1.0, **params) -> KernelSpec:
    """Validate a kernel's parameters for inputs of dimension ``dim`` and freeze them in a spec."""
    if not isinstance(name, str):
        raise InputError(f"kernel={name!r} must be a kernel name (a string), e.g. 'rbf'")
    kernel = get_kernel(name)
    try:
        var = float(variance)
    except (TypeError, ValueError):
        raise InputError(f"variance={variance!r} is not a number; it must be a finite number > 0") from None
    if not (math.isfinite(var) and var > 0):
        raise InputError(f"variance={variance!r} is out of its domain; it must be a finite number > 0")
    if kernel.uses_lengthscale:
        ls = _check_lengthscale(lengthscale, dim)
    elif np.any(np.asarray(lengthscale, dtype=object) != 1.0):
        raise InputError(f"kernel {name!r} has no lengthscale (got lengthscale={lengthscale!r}); leave it out "
                         f"or scale the points instead")
    else:
        ls = (1.0,) * dim
    known = {p.name: p for p in kernel.params}
    if kernel.user:
        checked = {k: _user_param(name, k, v) for k, v in params.items()}
    else:
        unknown = sorted(set(params) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise InputError(f"kernel {name!r} has no parameter {unknown[0]!r}; its parameters: {allowed}")
        checked = {p.name: p.check(name, params.get(p.name, p.default)) for p in kernel.params}
    spec = KernelSpec(name=name, lengthscale=ls, variance=var, params=tuple(sorted(checked.items())))
    if kernel.user:
        _check_user_kernel(kernel, spec, dim)
    return spec


def _check_user_kernel(kernel: Kernel, spec: KernelSpec, dim: int) -> None:
    """Trace a user kernel once on two points (no compile) so that a broken one fails before any work."""
    import jax

    p = {k: jnp.asarray(v, jnp.float32) for k, v in spec.param_dict().items()}
    point = jax.ShapeDtypeStruct((dim,), jnp.float32)
    try:
        out = jax.eval_shape(lambda q, x: kernel.evaluate(q, x, p), point, point)
    except Exception as exc:  # anything the user's kernel raises while traced
        raise InputError(f"user kernel {kernel.name!r} failed on two points of dimension {dim} "
                         f"({type(exc).__name__}: {exc})") from exc
    if getattr(out, "shape", None) != ():
        raise InputError(f"user kernel {kernel.name!r} returned shape {getattr(out, 'shape', out)} for two "
                         f"points; it must return a scalar k(q, x)")


def _user_param(kernel: str, key: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"kernel {kernel!r}: parameter {key}={value!r} is not a number") from None


def _check_lengthscale(lengthscale, dim: int) -> tuple[float, ...]:
    values = list(lengthscale) if isinstance(lengthscale, (list, tuple)) else (
        [float(x) for x in lengthscale.ravel()] if hasattr(lengthscale, "ravel") else [lengthscale])
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"lengthscale={lengthscale!r} is not a number or list of numbers") from None
    if len(values) == 1:
        values = values * dim
    if len(values) != dim:
        raise InputError(f"lengthscale has {len(values)} values but the points have D={dim} dimensions; "
                         f"give one value, or exactly {dim}")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise InputError(f"lengthscale={bad[0]!r} is out of its domain; every lengthscale must be a "
                         f"finite number > 0")
    return tuple(values)
