"""The problem a run solves, built once for the in-process API and for a cluster run alike.

A :class:`Problem` fixes, for points (N, D) and sources (M, D): the kernel with validated parameters
(:class:`~pipeline.kernels.KernelSpec`), the compute dtype and mode, the tile formulation, the plan (tile
shape and tasks, :mod:`pipeline.plan`) and the centre that coordinates are taken relative to (float64, in
the points' units), and the computation method that runs it (:mod:`pipeline.methods`, chosen here, once,
with its plan and fixed data).  :func:`make_problem` is where dtype, mode and tolerance are validated, and
where the data's range is checked against the dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .inputs import check_lengthscale_range, check_range
from .kernels import KernelSpec, make_spec
from .methods import Method, Planned, PlanRequest, choose
from .options import DTYPES, MODES, check_choice
from .plan import Plan
from .sources import source_center
from .tiles import TileShape, formulation


@dataclass(frozen=True)
class Problem:
    """Everything fixed about a computation before the first tile runs, including the method that runs it
    (chosen once, here)."""

    spec: KernelSpec
    dtype: str  # compute precision: "float32" or "float64"
    mode: str  # "auto", "jacfwd" or "jacrev"
    formulation: str  # "radial", "dot" or "generic" (pipeline.tiles)
    plan: Plan
    center: tuple[float, ...]  # subtracted from points and sources in float64 (zeros: not re-centred)
    method: Method
    planned: Planned = field(repr=False)  # the method's plan, fixed data (layout) and error bounds
    request: PlanRequest = field(repr=False)  # the data and options the method planned for
    tolerance: float = 0.0

    @property
    def layout(self):
        """The method's fixed data (e.g. the pruned method's spatial order and tile index; None for dense)."""
        return self.planned.layout

    @property
    def pruned(self) -> bool:
        return self.method.name == "pruned"

    @property
    def error_bounds(self) -> dict:
        return self.planned.error_bounds

    @property
    def shape(self) -> TileShape:
        return TileShape(self.plan.rows, self.plan.cols, self.plan.tiles_per_call)

    def compute(self, threads: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
        """g (N, D), v (N,) and the pairs computed, in this process, by the problem's method."""
        return self.method.compute(self, self.request, threads)


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
                 method: str = "auto", **plan_options) -> Problem:
    """Validate the kernel, dtype, mode and tolerance for points (N, D) and sources (M, D), plan the work
    (``plan_options`` go to :func:`~pipeline.plan.make_plan`: workers, memory, tile overrides ...) and
    check that the data fit the dtype.  Raises :class:`InputError` naming what is wrong.

    The method is the first of :data:`pipeline.methods.METHODS` that accepts the problem (``weights``: the
    sources' weights, None for ones; ``sources_are_points``: the sources are the points themselves).  With
    ``tolerance > 0`` on a kernel that prunes, that is the pruned method, unless pruning would leave more than
    :data:`pipeline.methods.pruned.DENSE_ABOVE` of the pairs; a run that computes every pair despite a
    tolerance says why in ``plan.exact_reason``.  ``method``: "auto", or the name of the one method to use
    (an :class:`InputError` saying why if it cannot run this problem)."""
    check_choice("dtype", dtype, DTYPES)
    check_choice("mode", mode, MODES)
    tolerance = check_tolerance(tolerance)
    dim = points.shape[1]
    spec = make_spec(kernel, dim, lengthscale, variance, **(params or {}))
    form = formulation(spec, mode)
    center = source_center(sources, spec)
    if spec.kernel.radial_profile is not None:  # distances are measured in lengthscales
        check_lengthscale_range(points, sources, spec.lengthscale, dtype)
    check_range(sources, "sources", center, spec.lengthscale, dtype)
    check_range(points, "points", center, spec.lengthscale, dtype)
    request = PlanRequest(points, sources, weights, sources_are_points, spec, mode, dtype, tolerance,
                          dict(dtype=dtype, formulation=form, distances=spec.kernel.distances, **plan_options),
                          method)
    method, planned, why = choose(request, method)
    plan = dataclasses.replace(planned.plan, exact_reason=why) if why else planned.plan
    return Problem(spec, dtype, mode, form, plan, tuple(float(c) for c in center), method,
                   dataclasses.replace(planned, plan=plan), request, tolerance)
