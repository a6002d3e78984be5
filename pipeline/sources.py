"""Sources prepared once per run: cast, re-centred, split into hi/lo parts and padded to whole tile calls.

Stationary kernels depend on q - x only, so sources (and queries) are shifted by the sources' mid-range
(:func:`source_center`, float64, input units) and no float32 precision is lost far from the origin.
float32 runs keep each coordinate and weight ``a`` as a hi/lo pair of float32, ``hi = float32(a)``,
``lo = float32(a - hi)``: about 48 bits, so every query block can be re-centred on itself
(:mod:`pipeline.block_precision`).  Padding rows repeat a real point with weight 0 and contribute exactly 0.

The run-wide facts that each block's precision depends on are kept with the sources: their count, their
bounding box (input units), and whether float32 terms may cancel (``may_cancel``: weights of both signs,
or, for kernels that are not re-centred, a :func:`cancellation_ratio` above ``CANCELLATION_MAX``;
dimensionless).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from .kernels import KernelSpec, get_kernel
from .lazy_jax import jax
from .precision import on_cpu, thread_x64
from .spatial import column_bounds
from .tiles import TileShape, pack_layout, split_params


PREPARE_ROWS = 1 << 16  # sources re-centred in float64 this many rows at a time


# Kernels that are not re-centred (dot-product and user kernels) can take both signs, so their sums may
# cancel even with positive weights.  float32 runs estimate the cancellation ratio max_j sum_i |w_i k_ji| /
# max_j |v_j| (and the same for g) on a sample of the sources as queries (in float64), and compute in
# float64 above this.  Measured: float32 error ~2 eps x ratio (2.4e-5 at ratio 214, the linear kernel on
# centred data).
CANCELLATION_MAX = 32.0
CANCELLATION_SAMPLE = 64


@dataclass(frozen=True)
class PreparedSources:
    """Sources cast, re-centred and padded to whole calls of ``shape``: ready for every query block.

    float32 runs keep each coordinate and weight as a hi/lo pair of float32 (hi = float32(a), lo =
    float32(a - hi)): 48 bits, so blocks can be re-centred anywhere and float64 variants see (nearly) the
    float64 inputs.  float64 runs keep one float64 value.  Each source is one packed row
    (:func:`pipeline.tiles.pack_layout`): ``[x (D), x_lo (D), w, w_lo]`` in float32 runs, ``[x (D), w]`` in
    float64 runs, so a call takes its sources as one array.
    """

    packed: np.ndarray | None  # (calls, tiles_per_call, cols, S), run dtype (or a list of device arrays); w = 0 on padding
    center: np.ndarray  # (D,) float64, subtracted from sources and queries (zeros if not stationary)
    count: int
    lower: np.ndarray | None = None  # (D,) float64: the sources' bounding box, in input coordinates
    upper: np.ndarray | None = None
    may_cancel: bool = False  # float32 terms may cancel: weights of both signs, or (kernels not re-centred) a
    # sampled cancellation ratio above CANCELLATION_MAX; float32 runs then compute in float64

    def calls(self):
        """Per call: its sources' packed rows (tiles_per_call, cols, S)."""
        return iter(self.packed)

    def to_device(self) -> "PreparedSources":
        """The same sources held on an accelerator, one array per call: workers that reuse them for many
        query blocks move them over the bus once.  On the CPU it returns ``self`` (no second copy)."""
        if on_cpu():
            return self
        return dataclasses.replace(self, packed=[jax.device_put(a) for a in self.packed])


def source_center(sources: np.ndarray, spec: KernelSpec) -> np.ndarray:
    """Stationary kernels depend on q - x only: shift by the sources' mid-range (in float64) so that
    coordinates far from the origin lose no float32 precision.  Other kernels are not shifted."""
    dim = sources.shape[1]
    if not spec.kernel.stationary or len(sources) == 0:
        return np.zeros(dim)
    lo, hi = column_bounds(sources)
    return 0.5 * (lo + hi)


def split_hi_lo(values: np.ndarray, hi: np.ndarray, lo: np.ndarray | None) -> None:
    """hi = float32(values), lo = float32(values - hi) (values float64); lo None: hi only."""
    hi[...] = values
    if lo is not None:
        lo[...] = values - hi.astype(np.float64)


def prepare_sources(sources, weights, spec: KernelSpec, dtype: str, shape: TileShape,
                    center: np.ndarray | None = None) -> PreparedSources:
    sources = np.asarray(sources)
    m, dim = sources.shape
    center = source_center(sources, spec) if center is None else np.asarray(center, np.float64)
    per_call = shape.sources_per_call
    calls = max(1, -(-m // per_call))
    padded = calls * per_call
    split = dtype == "float32"
    width, _ = pack_layout(dtype, dim)
    packed = np.zeros((padded, width), dtype=dtype)  # weights 0 on padding
    coords, w = packed[:, :dim], packed[:, width - (2 if split else 1)]
    coords_lo = packed[:, dim:2 * dim] if split else None
    w_lo = packed[:, -1] if split else None
    for start in range(0, m, PREPARE_ROWS):  # centre in float64, a block at a time (bounded memory)
        stop = min(start + PREPARE_ROWS, m)
        split_hi_lo(sources[start:stop].astype(np.float64) - center, coords[start:stop],
                    None if coords_lo is None else coords_lo[start:stop])
    coords[m:] = coords[0] if m else 0.0  # a real point with weight 0: contributes exactly 0
    if split:
        coords_lo[m:] = coords_lo[0] if m else 0.0
    may_cancel = False
    if weights is None:
        w[:m] = 1.0
    else:
        w64 = np.asarray(weights, dtype=np.float64)
        split_hi_lo(w64, w[:m], None if w_lo is None else w_lo[:m])
        may_cancel = bool(m and w64.min() < 0 < w64.max())
    if split and m and not may_cancel and not spec.kernel.stationary:
        may_cancel = cancellation_ratio(spec, sources, weights) > CANCELLATION_MAX
    lower, upper = column_bounds(sources) if m else (np.zeros(dim), np.zeros(dim))
    return PreparedSources(packed.reshape(calls, shape.tiles_per_call, shape.cols, width), center, m,
                           lower, upper, may_cancel)


@functools.lru_cache(maxsize=16)
def _pairs_value_and_grad(name: str):
    """jit of (q (S, D), x (C, D), p) -> (k (S, C), grad_q k (S, C, D)) for one kernel."""
    pair = jax.value_and_grad(get_kernel(name).evaluate)
    return jax.jit(jax.vmap(jax.vmap(pair, (None, 0, None)), (0, None, None)))


def cancellation_ratio(spec: KernelSpec, sources, weights=None, sample: int = CANCELLATION_SAMPLE) -> float:
    """max(max_j sum_i |w_i k_ji| / max_j |v_j|, the same for g), in float64, for up to ``sample`` of the
    sources (evenly spaced rows, deterministic) taken as queries: how much a float32 sum's rounding is
    amplified by cancellation.  inf where the sums vanish but their terms do not."""
    x = np.asarray(sources, np.float64)
    m = len(x)
    if m == 0:
        return 1.0
    w = np.ones(m) if weights is None else np.asarray(weights, np.float64)
    q = x[np.unique(np.linspace(0, m - 1, min(m, sample)).astype(np.int64))]
    v, v_abs = np.zeros(len(q)), np.zeros(len(q))
    g, g_abs = np.zeros(q.shape), np.zeros(q.shape)
    with thread_x64(True):
        dynamic, static = split_params(spec, "float64")
        p = {**dynamic, **dict(static)}
        pair = _pairs_value_and_grad(spec.name)
        for start in range(0, m, PREPARE_ROWS // 4):
            xs, ws = x[start:start + PREPARE_ROWS // 4], w[start:start + PREPARE_ROWS // 4]
            k, dk = (np.asarray(a, np.float64) for a in pair(q, xs, p))
            v += k @ ws
            v_abs += np.abs(k) @ np.abs(ws)
            g += np.einsum("smd,m->sd", dk, ws)
            g_abs += np.einsum("smd,m->sd", np.abs(dk), np.abs(ws))

    def ratio(total, absolute):
        top, scale = float(np.max(absolute)), float(np.max(np.abs(total)))
        return 1.0 if top == 0.0 else (top / scale if scale > 0.0 else np.inf)

    return max(ratio(v, v_abs), ratio(g, g_abs))
