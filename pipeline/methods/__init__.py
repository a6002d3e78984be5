"""The computation methods, behind one interface (:class:`pipeline.methods.base.Method`).

:data:`METHODS` lists them in order of preference: a problem is run by the first that accepts it
(:func:`choose`, called once, when the problem is planned), and ``dense`` accepts every problem.  Adding a
method is one module here implementing the interface, and its line in :data:`METHODS`.
"""

from __future__ import annotations

from ..errors import InputError
from .base import ClientRun, Method, Planned, PlanRequest
from .dense import DENSE
from .far_field import FAR_FIELD
from .pruned import PRUNED

METHODS: dict[str, Method] = {method.name: method for method in (FAR_FIELD, PRUNED, DENSE)}

__all__ = ["METHODS", "ClientRun", "Method", "Planned", "PlanRequest", "choose", "get"]


def get(name: str) -> Method:
    """The method called ``name`` (a job names its run's method; an unknown name is a bug, not a user error)."""
    return METHODS[name]


def choose(request: PlanRequest, name: str = "auto") -> tuple[Method, Planned, str]:
    """The first method of :data:`METHODS` that accepts the problem, its plan, and why the ones before it
    declined (one sentence each, for ``kgrad plan`` and the output's attributes; "" if none declined, or no
    tolerance was asked for).  ``name``: "auto", or the one method to use (an :class:`InputError` with its
    reason if it declines)."""
    if name != "auto":
        if name not in METHODS:
            raise InputError(f"method={name!r} is not a method; use auto or one of {', '.join(METHODS)}")
        answer = METHODS[name].plan(request)
        PRUNED.forget()
        if not isinstance(answer, Planned):
            raise InputError(f"method={name!r} cannot run this problem: {answer}; use --method auto")
        return METHODS[name], answer, ""
    reasons = []
    for method in METHODS.values():
        answer = method.plan(request)
        if isinstance(answer, Planned):
            why = "; ".join(reasons) if request.tolerance > 0 else ""
            PRUNED.forget()
            return method, answer, why
        reasons.append(answer)
    raise AssertionError("the dense method accepts every problem")  # pragma: no cover
