"""Validation of in-memory inputs: shapes, dtypes, finiteness.  Every check raises before any work.

Points are (N, D) or (N,) (meaning D = 1); sources (M, D) share D with the points; weights are (M,).
Messages name the array, the offending value or row, and what is allowed.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError, user_fixable


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
    scaled = np.abs((data - np.asarray(center)) / scale)
    limit = float(np.sqrt(np.finfo(dtype).max / (4 * max(1, scaled.shape[-1]))))
    if not scaled.size or scaled.max() <= limit:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        spread = np.nan_to_num(np.abs((data - np.median(data, axis=0)) / scale).max(axis=1), nan=np.inf)
    row = int(np.argmax(spread))
    fix = ("use --dtype float64 (dtype='float64'), or rescale the data" if dtype == "float32"
           else "rescale the data, or drop that row if it is an error")
    raise InputError(f"{name} row {row} ({array[row].tolist()}) is too far out for {dtype}: more than "
                     f"{limit:g} lengthscales from the rest of the data, and its squared distances would "
                     f"overflow; {fix}")
