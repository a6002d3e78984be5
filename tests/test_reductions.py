"""pipeline.reductions.sums_as_dots: the rewritten function has the same values and JAX derivatives (to
rounding), no floating-point reduce_sum is left in its trace, and everything else passes through."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
jaxprs_in_params = pytest.importorskip("jax.extend.core").jaxprs_in_params

from pipeline.precision import x64_enabled  # noqa: E402
from pipeline.reductions import sums_as_dots  # noqa: E402


@pytest.fixture(autouse=True)
def float64():
    """float64 comparisons, with JAX's x64 switch restored afterwards (other tests run with it off)."""
    with x64_enabled():
        yield


def periodic_like(q, x, p):
    s = jnp.sin(jnp.pi * (q - x) / p["period"])
    return p["variance"] * jnp.exp(-2.0 * jnp.sum(s * s / p["lengthscale"] ** 2))


def many_sums(q, x, p):
    """Sums over one axis, over two axes, over all axes, with keepdims, inside jnp helpers (nested jit),
    an integer sum (left alone), a custom-JVP function and a cond."""
    outer = jnp.outer(q, x)  # (D, D)
    a = jnp.sum(outer, axis=0) @ jnp.sum(outer, axis=1)
    b = jnp.sum(outer) + jnp.sum(outer, axis=(0, 1), keepdims=True)[0, 0]
    c = jnp.linalg.norm(q - x) + jnp.mean(q * x) + jnp.var(q)
    n = jnp.sum(jnp.arange(q.shape[0]))  # int: not rewritten
    d = jnp.sum(jax.nn.softplus(q - x)) + jnp.sum(jax.nn.relu(q))
    e = jax.lax.cond(jnp.sum(q) > 0, lambda t: jnp.sum(t ** 2), lambda t: -jnp.sum(t), x)
    return p["variance"] * (a + b + c + d + e) + n


def pair_output(q, x, p):
    """A pytree out: (value, dict)."""
    return jnp.sum(q * x), {"sq": jnp.sum((q - x) ** 2, keepdims=True)}


def float_reduce_sums(fn, *args):
    """Count floating-point reduce_sum equations in fn's trace, nested jaxprs included."""
    def count(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "reduce_sum" and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating):
                total += 1
            for sub in jaxprs_in_params(eqn.params):
                total += count(sub)
        return total
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.fixture
def inputs():
    rng = np.random.default_rng(3)
    q, x = rng.normal(size=4), rng.normal(size=4)
    p = {"lengthscale": np.array([0.7, 1.1, 1.9, 0.5]), "variance": np.float64(1.7), "period": np.float64(2.3)}
    return q, x, p


@pytest.mark.sampled(3, cover=())
@pytest.mark.parametrize("fn", [periodic_like, many_sums])
def test_same_value_and_gradients(fn, inputs):
    q, x, p = inputs
    rewritten = sums_as_dots(fn)
    np.testing.assert_allclose(rewritten(q, x, p), fn(q, x, p), rtol=1e-14)
    for argnums in (0, 1):
        np.testing.assert_allclose(jax.grad(rewritten, argnums)(q, x, p), jax.grad(fn, argnums)(q, x, p),
                                   rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(jax.jacfwd(rewritten)(q, x, p), jax.jacfwd(fn)(q, x, p), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(jax.grad(lambda p: rewritten(q, x, p))(p)["lengthscale"],
                               jax.grad(lambda p: fn(q, x, p))(p)["lengthscale"], rtol=1e-13, atol=1e-14)


def test_under_vmap_and_jit_in_the_tile_layout(inputs):
    """The way the generic tile uses it: vmap over pairs with the pair axis last, value_and_grad, jit."""
    _, _, p = inputs
    rng = np.random.default_rng(4)
    qs, xs = rng.normal(size=(4, 300)), rng.normal(size=(4, 300))

    def pairs(f):
        pair = jax.value_and_grad(lambda a, b: f(a, b, p))
        return jax.jit(jax.vmap(pair, in_axes=(1, 1), out_axes=(0, 1)))(qs, xs)

    for got, want in zip(pairs(sums_as_dots(periodic_like)), pairs(periodic_like)):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_pytree_outputs(inputs):
    q, x, p = inputs
    got, want = sums_as_dots(pair_output)(q, x, p), pair_output(q, x, p)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_no_float_reduce_sum_is_left(inputs):
    q, x, p = inputs
    assert float_reduce_sums(periodic_like, q, x, p) == 1
    assert float_reduce_sums(sums_as_dots(periodic_like), q, x, p) == 0
    assert float_reduce_sums(many_sums, q, x, p) > 5
    assert float_reduce_sums(sums_as_dots(many_sums), q, x, p) <= float_reduce_sums(
        lambda q, x, p: jax.lax.cond(jnp.sum(q) > 0, lambda t: jnp.sum(t ** 2), lambda t: -jnp.sum(t), x),
        q, x, p)  # only the sums inside cond's branches (bound unchanged) may remain


def test_float32_stays_float32():
    q = np.linspace(-1, 1, 3, dtype=np.float32)
    out = sums_as_dots(lambda a: jnp.sum(a * a))(q)
    assert out.dtype == np.float32 and out.shape == ()
    assert float(out) == pytest.approx(2.0, rel=1e-6)
