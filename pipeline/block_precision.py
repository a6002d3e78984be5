"""Precision per query block: which :class:`~pipeline.tiles.Variant` each block of query rows is computed in.

Precision is chosen per query block (:func:`block_setup`): each block is computed in coordinates centred
on itself, with float32 tiles where that is accurate enough and float64 GEMMs or exact per-dimension
differences where it is not.

Stationary kernels depend on q - x only, so each query block is computed in its own coordinates, centred
on the block's mid-range c (float64, input units).  Queries and sources are held relative to the run's
centre, as float32 hi/lo pairs in float32 runs (one float64 array in float64 runs;
:mod:`pipeline.sources`), and moved to c inside the jitted call in the same way (a query equal to a
source stays exactly equal), so they keep ~48 bits wherever the block lies.  With the block's radius e (in
lengthscales), the GEMM forms' errors are then ~eps (e + r)^2 in r^2 and ~eps e sum|F'| in the assembly
u S - F' u_x: small for compact blocks, whatever the data's offset or total spread.  Blocks for which that
is too large take a variant with float64 GEMMs, or exact per-dimension differences (:func:`choose_variant`;
thresholds below, measured in NOTES of issue 9 and tested by tests/test_accuracy_layouts.py).  Radii and
spacings are in lengthscales; errors are relative to max|g| and max|v|.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import KernelSpec
from .sources import PreparedSources
from .spatial import block_box
from .tiles import Variant, formulation

# float32 runs: the float32 tiles on block coordinates while the block's radius (lengthscales) is at most
# this.  Measured on dense 1-D grids and 3-D cubes (the worst layouts: many sources per lengthscale, g
# cancelling), the float32 error grows like eps e (assembly) to eps e^2 (r^2): at e = 8 at most 9.5e-6 of
# max|g| (Matern 3/2, 1-D), 1.4e-6 of max|v|; at e = 16 up to 1.8e-5.  Dense benchmark data (standard normal,
# lengthscale 1) has block radii below 6.
FAST_RADIUS_FLOAT32 = 8.0
# Periodic (no decay: every source counts): float32 while the reach (block radius plus the farthest source,
# in periods, times max(1, 1/l^2)) is at most this; float32 phase errors are eps * 2 pi * reach.
FAST_REACH_PERIODIC = 8.0
# Beyond those, float32 runs take the "wide" radial variant: r^2 by a float64 GEMM on float64 block
# coordinates, the kernel's elementwise work in float32, and the sums S = F' @ [w u_x, w] and the assembly
# u S - S_x in float64, so that rounding is relative to each term (eps sum |F' w (u - u_x)|), not to e.
# Up to this radius (r^2 error ~4e-16 (e + r)^2 <= 5e-7 absolute, a relative error of about that in each
# term); exact per-dimension differences beyond.
GEMM_RADIUS_WIDE = 32768.0
# float64 runs: GEMM distances up to this radius (measured on dense 1-D grids: 4.6e-12 at e = 128, 4.2e-11 at
# e = 512; the bound is 1e-10), exact per-dimension differences beyond.
GEMM_RADIUS_FLOAT64 = 128.0
# A GEMM assembly's rounding (~eps e sum|F'|) is small next to max|g| only where points have neighbours:
# at isolated points g ~ d exp(-d^2/2) for spacing d.  The block's spacing (the smallest distance between
# rows that follow each other in Morton order, in lengthscales: some row has a neighbour that close) must
# be at most this for the float32 tiles, and at most the second for float64 assembly (which only fails
# for spacings above ~6); else exact per-dimension differences.
SPACING_FLOAT32 = 2.0
SPACING_FLOAT64 = 4.0


def needs_x64(spec: KernelSpec, mode: str, dtype: str) -> bool:
    """float64 runs, and float32 runs that take their distances in float64 (Matern 3/2, 5/2)."""
    kernel = spec.kernel
    return dtype == "float64" or (formulation(spec, mode) == "radial" and kernel.distances == "wide")


@dataclass(frozen=True)
class BlockSetup:
    center: np.ndarray  # (D,) float64: the block's coordinates are relative to it (stationary kernels)
    radius: float  # the block's half-diagonal in lengthscales (0 for kernels that are not re-centred)
    variant: Variant


def choose_variant(spec: KernelSpec, mode: str, dtype: str, radius: float, may_cancel: bool,
                   reach: float = 0.0, spacing: float = 0.0) -> Variant:
    """The cheapest variant that keeps a block within the accuracy bound (see the thresholds above).

    ``radius``: the block's half-diagonal in lengthscales; ``may_cancel``: the weights have both signs or the
    sums cancel (float32 rounding of w and of each term would then exceed the bound: float32 runs compute
    in float64); ``reach``: periodic kernels, see :data:`FAST_REACH_PERIODIC`; ``spacing``: see
    :data:`SPACING_FLOAT32`.
    """
    kernel = spec.kernel
    radial = formulation(spec, mode) == "radial" and kernel.stationary
    if dtype == "float64":
        exact = radial and (radius > GEMM_RADIUS_FLOAT64 or spacing > SPACING_FLOAT64)
        return Variant("float64", "direct" if exact else "gemm")
    fast = not may_cancel
    if kernel.stationary:
        fast = fast and radius <= FAST_RADIUS_FLOAT32
        if radial and kernel.distances != "direct":
            fast = fast and spacing <= SPACING_FLOAT32
        if kernel.radial_profile is None:  # periodic: no decay
            fast = fast and reach <= FAST_REACH_PERIODIC
    if fast:
        return Variant(dtype, "gemm")
    if not radial:
        return Variant("float64", "gemm")
    if may_cancel or kernel.distances == "direct" or radius > GEMM_RADIUS_WIDE or spacing > SPACING_FLOAT64:
        return Variant("float64", "direct" if radius > GEMM_RADIUS_WIDE or spacing > SPACING_FLOAT64
                       or kernel.distances == "direct" else "gemm")
    return Variant("float32", "wide")


def block_setup(queries, prepared: PreparedSources, spec: KernelSpec, mode: str, dtype: str) -> BlockSetup:
    """Centre, radius and variant of one block of query rows (numpy, float64)."""
    queries = np.asarray(queries)
    kernel = spec.kernel
    if not kernel.stationary or len(queries) == 0:
        return BlockSetup(prepared.center, 0.0, choose_variant(spec, mode, dtype, 0.0, prepared.may_cancel))
    lengthscale = np.asarray(spec.lengthscale, np.float64)
    center, half, radius = block_box(queries, lengthscale)
    if len(queries) > 1:  # rows in the run's spatial order: neighbours in space mostly follow each other
        steps = np.diff(np.asarray(queries, np.float64) / lengthscale, axis=0)
        spacing = float(np.sqrt(np.min(np.sum(steps * steps, axis=1))))
    else:
        spacing = np.inf
    reach = 0.0
    if kernel.radial_profile is None and prepared.count:
        period = float(dict(spec.params).get("period", 1.0))
        far = np.maximum(np.abs(center - prepared.lower), np.abs(prepared.upper - center)) + half * lengthscale
        reach = float(np.max(far / period * np.maximum(1.0, 1.0 / lengthscale ** 2)))
    variant = choose_variant(spec, mode, dtype, radius, prepared.may_cancel, reach, spacing)
    return BlockSetup(center, radius, variant)


def block_setups(queries, rows: int, prepared: PreparedSources, spec: KernelSpec, mode: str,
                 dtype: str) -> list[BlockSetup]:
    """:func:`block_setup` of each block of ``rows`` consecutive query rows, the same values computed for all
    blocks at once (radial and dot kernels; periodic ones block by block)."""
    queries = np.asarray(queries)
    n = len(queries)
    kernel = spec.kernel
    if not kernel.stationary or kernel.radial_profile is None or n == 0:
        return [block_setup(queries[s:s + rows], prepared, spec, mode, dtype) for s in range(0, n, rows)]
    lengthscale = np.asarray(spec.lengthscale, np.float64)
    points = np.asarray(queries, np.float64)
    starts = np.arange(0, n, rows)
    lower, upper = np.minimum.reduceat(points, starts, axis=0), np.maximum.reduceat(points, starts, axis=0)
    centers = 0.5 * (lower + upper)
    half = 0.5 * (upper - lower) / lengthscale
    radii = np.sqrt(np.sum(half * half, axis=1))
    steps = np.diff(points / lengthscale, axis=0)
    step2 = np.sum(steps * steps, axis=1)
    step2[starts[1:] - 1] = np.inf  # the step from one block's last row to the next block's first
    step2 = np.append(step2, np.inf)  # a block of one row has no step
    spacing = np.sqrt(np.minimum.reduceat(step2, starts))
    return [BlockSetup(center, float(radius), choose_variant(spec, mode, dtype, float(radius), prepared.may_cancel,
                                                            0.0, float(gap)))
            for center, radius, gap in zip(centers, radii, spacing)]
