"""The problem a run solves, built once for the in-process API and for a cluster run alike.

A :class:`Problem` fixes, for points (N, D) and sources (M, D): the kernel with validated parameters
(:class:`~pipeline.kernels.KernelSpec`), the compute dtype and mode, the tile formulation, the plan (tile
shape and tasks, :mod:`pipeline.plan`) and the centre that coordinates are taken relative to (float64, in
the points' units).  :func:`make_problem` is where dtype and mode are validated, and where the data's
range is checked against the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .gradients import DTYPES, MODES, TileShape, formulation, source_center
from .inputs import check_range
from .kernels import KernelSpec, make_spec
from .plan import Plan, make_plan


@dataclass(frozen=True)
class Problem:
    """Everything fixed about a computation before the first tile runs."""

    spec: KernelSpec
    dtype: str  # compute precision: "float32" or "float64"
    mode: str  # "auto", "jacfwd" or "jacrev"
    formulation: str  # "radial", "dot" or "generic" (pipeline.gradients)
    plan: Plan
    center: tuple[float, ...]  # subtracted from points and sources in float64 (zeros: not re-centred)

    @property
    def shape(self) -> TileShape:
        return TileShape(self.plan.rows, self.plan.cols, self.plan.tiles_per_call)


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)}")


def make_problem(points: np.ndarray, sources: np.ndarray, *, kernel: str = "rbf", lengthscale=1.0,
                 variance=1.0, params: dict | None = None, dtype: str = "float32", mode: str = "auto",
                 **plan_options) -> Problem:
    """Validate the kernel, dtype and mode for points (N, D) and sources (M, D), plan the work
    (``plan_options`` go to :func:`~pipeline.plan.make_plan`: workers, memory, tile overrides ...) and
    check that the data fit the dtype.  Raises :class:`InputError` naming what is wrong."""
    check_choice("dtype", dtype, DTYPES)
    check_choice("mode", mode, MODES)
    (n, dim), m = points.shape, sources.shape[0]
    spec = make_spec(kernel, dim, lengthscale, variance, **(params or {}))
    form = formulation(spec, mode)
    plan = make_plan(n, m, dim, dtype=dtype, formulation=form, distances=spec.kernel.distances, **plan_options)
    center = source_center(sources, spec)
    check_range(sources, "sources", center, spec.lengthscale, dtype)
    check_range(points, "points", center, spec.lengthscale, dtype)
    return Problem(spec, dtype, mode, form, plan, tuple(float(c) for c in center))
