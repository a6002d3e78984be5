"""Results must be finite when the inputs are: a float32 overflow (e.g. the polynomial kernel's (q.x + c)^d
beyond 3.4e38) must stop the run with a clear message, never be written as inf without a word."""

from __future__ import annotations

import numpy as np

from .errors import NonFiniteResultError


def check_finite_result(gradient: np.ndarray, value: np.ndarray, dtype: str, kernel: str,
                        rows: tuple[int, int] | None = None, dtype_option: str = "--dtype float64") -> None:
    """Raise :class:`NonFiniteResultError` if ``gradient`` or ``value`` holds inf or NaN.

    ``kernel`` describes the kernel; ``rows`` (start, stop) the query rows these results are for;
    ``dtype_option`` how the caller asks for float64 (``--dtype float64`` or ``dtype="float64"``)."""
    gradient, value = np.asarray(gradient), np.asarray(value)
    if np.isfinite(gradient).all() and np.isfinite(value).all():
        return
    parts = []
    for name, array in (("kernel sum", value), ("gradient", gradient)):
        inf, nan = int(np.isinf(array).sum()), int(np.isnan(array).sum())
        if inf or nan:
            what = " and ".join(f"{n} {kind}" for n, kind in ((inf, "inf"), (nan, "NaN")) if n)
            parts.append(f"{what} in the {name}")
    bad_rows = ~(np.isfinite(value) & np.isfinite(gradient.reshape(len(value), -1)).all(axis=1))
    first = int(np.argmax(bad_rows)) + (rows[0] if rows else 0)
    limit = float(np.finfo(dtype).max)
    overflow = any("inf" in p for p in parts)
    cause = (f"its values overflow {dtype} (largest {limit:.3g})" if overflow
             else f"NaN appeared in {dtype} (e.g. an intermediate overflowed to inf, then inf - inf or 0 * inf)")
    fix = (f"use {dtype_option}, or scale the inputs or the kernel's parameters" if dtype != "float64"
           else "scale the inputs or the kernel's parameters")
    raise NonFiniteResultError(
        f"{kernel} gave non-finite results for finite inputs: {'; '.join(parts)} (first at point {first}"
        + (f", rows {rows[0]}:{rows[1]}" if rows else "") + f"): {cause}; {fix}")
