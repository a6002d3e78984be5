"""A rewrite of a single-point kernel's jaxpr: each floating-point ``reduce_sum`` becomes a dot product with
a vector of ones.

Why: the generic path evaluates ``value_and_grad`` of a user's ``k(q, x, p)`` over every pair, ``vmap``-ed
in a structure-of-arrays layout (D, pairs).  A kernel's ``jnp.sum`` over its D coordinates then becomes a
reduction over the leading axis of a (D, pairs) array, and XLA:CPU fuses it with the elementwise work that
produces its operand into slow code: on a 2-core AVX-512 machine, poly-then-sum over a (3, 65536) array
ran about 4x slower than the same polynomials added row by row, and the periodic kernel's tile went from
0.11 to 0.20 G pairs/s per core with this rewrite.  A dot with ones is the same sum (up to the order of
the additions: rounding only) that XLA compiles as a small matrix-vector product, and its transpose (for
reverse mode) is an outer product with ones, a broadcast.

The rewrite changes only ``reduce_sum`` over floating-point arrays; it inlines nested ``jit`` calls so that
sums inside ``jnp`` helpers are reached, and binds every other primitive unchanged (control flow, custom
derivatives and all), as :func:`jax.core.eval_jaxpr` does.
"""

from __future__ import annotations

import contextlib
import functools

from .lazy_jax import jax, jnp, lax
from .precision import HIGHEST


def sums_as_dots(fn):
    """``fn`` with each floating-point ``reduce_sum`` in its trace computed as a dot with ones.

    ``fn`` takes and returns pytrees of arrays; the result has the same signature and, up to rounding, the
    same values and derivatives (JAX differentiates the rewritten program).
    """

    @functools.wraps(fn)
    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return rewritten


def _sum_as_dot(x, axes):
    for axis in sorted(axes, reverse=True):  # the highest axis first: the lower ones keep their numbers
        ones = jnp.ones((x.shape[axis],), x.dtype)
        x = lax.dot_general(x, ones, (((axis,), (0,)), ((), ())), precision=HIGHEST)
    return x


@functools.cache
def _literal():
    try:
        from jax.extend.core import Literal
    except ImportError:  # JAX before jax.extend.core.Literal
        from jax.core import Literal
    return Literal


def _evaluate(jaxpr, consts, args):
    env = {}
    Literal = _literal()  # noqa: N806

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "reduce_sum" and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
            outs = [_sum_as_dot(values[0], eqn.params["axes"])]
        elif name in ("pjit", "jit"):
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, values)
        else:
            bind = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bind if isinstance(bind, tuple) else ((), bind)  # older JAX: (subfuns, params)
            ctx = getattr(eqn, "ctx", None)  # per-equation JAX context (newer JAX), else none
            with ctx.manager if ctx is not None else contextlib.nullcontext():
                outs = eqn.primitive.bind(*subfuns, *values, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
