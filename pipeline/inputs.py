"""Validation of in-memory inputs: shapes, dtypes, finiteness.  Every check raises before any work.

Points are (N, D) or (N,) (meaning D = 1); sources (M, D) share D with the points; weights are (M,).
Messages name the array, the offending value or row, and what is allowed.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, user_fixable
from .spatial import column_bounds


def as_point_array(values, name: str) -> np.ndarray:
    """Return ``values`` as a 2-D real array (N, D); a 1-D array is taken as N points in D = 1."""
    try:
        array = np.asarray(values)
    except Exception as exc:  # ragged lists and the like (numpy raises ValueError)
        if not user_fixable(exc):
            raise
        raise InputError(f"{name} could not be read as an array ({exc})") from exc
    if array.dtype.kind not in "fiu":
        raise InputError(f"{name} has dtype {array.dtype}; it must hold real numbers (float or int)")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise InputError(f"{name} has shape {array.shape} ({array.ndim} dimensions); "
                         f"it must be (N, D), or (N,) for D = 1")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {array.shape}); it needs at least one point "
                         f"of at least one dimension")
    check_finite(array, name)
    return array


def as_weights(values, n_sources: int, name: str = "weights") -> np.ndarray:
    try:
        weights = np.asarray(values)
    except Exception as exc:
        if not user_fixable(exc):
            raise
        raise InputError(f"{name} could not be read as an array ({exc})") from exc
    if weights.dtype.kind not in "fiu":
        raise InputError(f"{name} has dtype {weights.dtype}; it must hold real numbers")
    if weights.ndim == 2 and weights.shape[1] == 1:
        weights = weights[:, 0]
    if weights.ndim != 1 or weights.shape[0] != n_sources:
        raise InputError(f"{name} has shape {weights.shape}; it must be ({n_sources},), "
                         f"one weight per source")
    check_finite(weights, name)
    return weights


def check_finite(array: np.ndarray, name: str, offset: int = 0) -> None:
    """Raise on the first NaN or inf, naming its row (``offset`` is added for arrays read in blocks)."""
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        row = int(bad[0]) + offset
        value = array[tuple(bad)]
        raise InputError(f"{name} holds {value} at row {row}; every value must be finite "
                         f"(drop or fix that row)")


def check_same_dim(points: np.ndarray, sources: np.ndarray) -> None:
    if points.shape[1] != sources.shape[1]:
        raise InputError(f"points have D={points.shape[1]} dimensions but sources have "
                         f"D={sources.shape[1]}; they must match")


def check_range(array: np.ndarray, name: str, center, lengthscale, dtype: str) -> None:
    """Raise if a re-centred, scaled coordinate would overflow in the compute dtype: |u|^2 + |x|^2 (and
    q.x) must stay finite, so each coordinate must be below sqrt(max / (4 D)).

    The message names the row that lies farthest from the data's median (an outlier also drags the
    mid-range centre, so distances from the centre would point at an innocent row)."""
    data = np.asarray(array, np.float64)
    scale = np.asarray(lengthscale, np.float64)
    limit = float(np.sqrt(np.finfo(dtype).max / (4 * max(1, data.shape[-1]))))
    if not data.size:
        return
    # |(x - c) / l| is monotone in x on each side of c: its largest value is at a column's smallest or
    # largest x, so the bounds decide (the same numbers as scaling every row, without its N x D passes)
    lower, upper = column_bounds(data.reshape(-1, data.shape[-1]))
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.abs((np.stack([lower, upper]) - np.asarray(center)) / scale)
    if not np.isnan(scaled).any() and scaled.max() <= limit:
        return
    with np.errstate(over="ignore", invalid="ignore"):  # inf is above the limit: the message names the row
        scaled = np.abs((data - np.asarray(center)) / scale)
    if scaled.max() <= limit:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.nan_to_num(np.abs((data - np.median(data, axis=0)) / scale).max(axis=1), nan=np.inf)
    row = int(np.argmax(spread))
    fits_float64 = scaled.max() <= np.sqrt(np.finfo(np.float64).max / (4 * max(1, scaled.shape[-1])))
    fix = ("use --dtype float64 (dtype='float64'), or rescale the data" if dtype == "float32" and fits_float64
           else "rescale the data, or drop that row if it is an error")
    raise InputError(f"{name} row {row} ({array[row].tolist()}) is too far out for {dtype}: more than "
                     f"{limit:g} lengthscales from the rest of the data, and its squared distances would "
                     f"overflow; {fix}")


def _lengthscale_range(bulk: float, extent: float, dim: int, dtype: str) -> tuple[float, float]:
    """The lengthscales (one dimension) whose squared distances neither overflow nor underflow ``dtype``
    for data whose bulk spans ``bulk`` and whole extent ``extent`` there."""
    info = np.finfo(dtype)
    with np.errstate(all="ignore"):
        low = bulk / np.sqrt(info.max / (4 * max(1, dim)))
        high = extent / np.sqrt(info.tiny) if extent > 0 else float(info.max)
    return max(float(low), float(info.tiny)), min(float(high), float(info.max))


def check_lengthscale_range(points: np.ndarray, sources: np.ndarray, lengthscale, dtype: str) -> None:
    """Raise if the lengthscale makes the data's extent, in lengthscales, overflow or underflow ``dtype``.

    Why: a tiny lengthscale puts every squared distance above the dtype's largest number (numpy overflow
    warnings, then a row blamed for it); a huge one makes every squared distance (and so every gradient)
    underflow to 0, silently.  Overflow is judged on the data's bulk (the 10-90 % range per dimension; an
    outlier is named by :func:`check_range`), underflow on their whole extent."""
    data = (np.asarray(points, np.float64) if sources is points  # the points are the sources: no copy
            else np.concatenate([np.asarray(points, np.float64), np.asarray(sources, np.float64)]))
    dim = data.shape[1]
    scale = np.broadcast_to(np.asarray(lengthscale, np.float64), (dim,))
    with np.errstate(all="ignore"):
        lower, upper = column_bounds(data)
        extent = upper - lower
        # the bulk is within the extent, so a lengthscale that fits the whole extent fits the bulk too:
        # the percentiles (a second pass over the data) only where that does not settle it
        settled = all(_lengthscale_range(float(extent[d]), float(extent[d]), dim, dtype)[0] <= float(scale[d])
                      <= _lengthscale_range(float(extent[d]), float(extent[d]), dim, dtype)[1] for d in range(dim))
        if settled:
            return
        low, high = np.percentile(data, [10.0, 90.0], axis=0, method="nearest")  # one outlier in 11 rows is out
        bulk = np.where(high > low, high - low, extent)
    for d in range(dim):
        lo, hi = _lengthscale_range(float(bulk[d]), float(extent[d]), dim, dtype)
        value = float(scale[d])
        if lo <= value <= hi:
            continue
        which = "" if len(set(scale.tolist())) == 1 else f" (dimension {d})"
        where = f" in dimension {d}" if dim > 1 else ""
        trouble = ("overflow" if value < lo else "underflow to 0 (every gradient would be 0)")
        lo64, hi64 = _lengthscale_range(float(bulk[d]), float(extent[d]), dim, "float64")
        fix = ("use --dtype float64 (dtype='float64'), or " if dtype == "float32" and lo64 <= value <= hi64
               else "")
        raise InputError(f"lengthscale={value:g}{which} does not fit these data in {dtype}: they span "
                         f"{extent[d]:.3g}{where}, and squared distances in lengthscales would {trouble}; "
                         f"give a lengthscale between {lo:.3g} and {hi:.3g}, {fix or 'or '}rescale the data")
