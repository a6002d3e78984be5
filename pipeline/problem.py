"""The problem a run solves, built once for the in-process API and for a cluster run alike.

A :class:`Problem` fixes, for points (N, D) and sources (M, D): the kernel with validated parameters
(:class:`~pipeline.kernels.KernelSpec`), the compute dtype and mode, the tile formulation, the plan (tile
shape and tasks, :mod:`pipeline.plan`) and the centre that coordinates are taken relative to (float64, in
the points' units).  :func:`make_problem` is where dtype, mode and tolerance are validated, and where the
data's range is checked against the dtype.  With a tolerance on a kernel that prunes, the problem also holds
the run's spatial layout (:class:`pipeline.pruned.Layout`); otherwise every pair is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .inputs import check_lengthscale_range, check_range
from .kernels import KernelSpec, make_spec
from .options import DTYPES, MODES, check_choice
from .plan import Plan, make_plan, with_pruning
from .sources import source_center
from .tiles import TileShape, formulation


@dataclass(frozen=True)
class Problem:
    """Everything fixed about a computation before the first tile runs."""

    spec: KernelSpec
    dtype: str  # compute precision: "float32" or "float64"
    mode: str  # "auto", "jacfwd" or "jacrev"
    formulation: str  # "radial", "dot" or "generic" (pipeline.tiles)
    plan: Plan
    center: tuple[float, ...]  # subtracted from points and sources in float64 (zeros: not re-centred)
    tolerance: float = 0.0
    layout: object = None  # pipeline.pruned.Layout of a pruned run; None: every pair is computed

    @property
    def pruned(self) -> bool:
        return self.layout is not None

    @property
    def shape(self) -> TileShape:
        return TileShape(self.plan.rows, self.plan.cols, self.plan.tiles_per_call)


def check_tolerance(tolerance) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating, np.integer)):
        raise InputError(f"tolerance={tolerance!r} is not a number; use 0 (exact) or e.g. 1e-9")
    value = float(tolerance)
    if not (0.0 <= value < 1.0):
        raise InputError(f"tolerance={tolerance!r} is out of range; use 0 (exact) or a number in (0, 1), "
                         f"e.g. 1e-9")
    return value


def make_problem(points: np.ndarray, sources: np.ndarray, *, kernel: str = "rbf", lengthscale=1.0,
                 variance=1.0, params: dict | None = None, dtype: str = "float32", mode: str = "auto",
                 tolerance: float = 0.0, weights: np.ndarray | None = None, sources_are_points: bool = False,
                 **plan_options) -> Problem:
    """Validate the kernel, dtype, mode and tolerance for points (N, D) and sources (M, D), plan the work
    (``plan_options`` go to :func:`~pipeline.plan.make_plan`: workers, memory, tile overrides ...) and
    check that the data fit the dtype.  Raises :class:`InputError` naming what is wrong.

    With ``tolerance > 0`` on a kernel that prunes, the spatial layout is built here (``weights``: the
    sources' weights, None for ones; ``sources_are_points``: one order serves both) and the plan holds the
    estimated pairs left; if pruning would leave more than :data:`pipeline.pruned.DENSE_ABOVE` of them, the
    run computes every pair (the bound then holds trivially) and the plan says why."""
    check_choice("dtype", dtype, DTYPES)
    check_choice("mode", mode, MODES)
    tolerance = check_tolerance(tolerance)
    (n, dim), m = points.shape, sources.shape[0]
    spec = make_spec(kernel, dim, lengthscale, variance, **(params or {}))
    form = formulation(spec, mode)
    center = source_center(sources, spec)
    if spec.kernel.radial_profile is not None:  # distances are measured in lengthscales
        check_lengthscale_range(points, sources, spec.lengthscale, dtype)
    check_range(sources, "sources", center, spec.lengthscale, dtype)
    check_range(points, "points", center, spec.lengthscale, dtype)
    plan_args = dict(dtype=dtype, formulation=form, distances=spec.kernel.distances, **plan_options)
    layout, reason = None, ""
    if tolerance > 0:
        layout, reason, plan = _pruned_plan(points, sources, weights, spec, mode, tolerance, sources_are_points,
                                            plan_args)
    if layout is None:
        plan = with_pruning(make_plan(n, m, dim, **plan_args), tolerance, None, reason)
    return Problem(spec, dtype, mode, form, plan, tuple(float(c) for c in center), tolerance, layout)


def _pruned_plan(points, sources, weights, spec, mode, tolerance, sources_are_points, plan_args):
    """(layout, "", plan) for a pruned run, or (None, why every pair is computed, None)."""
    from .pruned import DENSE_ABOVE, make_layout
    from .pruning import kernel_bounds, prunes

    if not prunes(spec, mode):
        why = (f"mode={mode} computes every pair" if mode != "auto" else
               f"kernel {spec.name} does not decay to 0 with distance, so nothing can be skipped")
        return None, f"{why}: the run is exact", None
    bounds = kernel_bounds(spec)
    if bounds is None:
        return None, f"kernel {spec.describe()} has no usable tail bound: the run is exact", None
    (n, dim), m = points.shape, sources.shape[0]
    plan = make_plan(n, m, dim, pruned=True, **plan_args)
    layout = make_layout(points, None if sources_are_points else sources, weights, spec, tolerance, bounds,
                         plan.rows)
    share = layout.estimated_pairs / max(plan.pairs, 1)
    if share > DENSE_ABOVE:
        return None, (f"pruning would skip only {1 - share:.0%} of the pairs at this tolerance, so every "
                      f"pair is computed (faster with the dense tiles; the bound holds exactly)"), None
    return layout, "", with_pruning(plan, tolerance, layout.estimated_pairs)
