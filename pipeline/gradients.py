"""Tile math: summed kernel gradients and kernel sums for one block of query rows.

For a block of queries ``q_j`` (B, D) and sources ``x_i`` with weights ``w_i`` this computes

    g_j = sum_i w_i grad_q k(q_j, x_i)      (B, D), units of k per unit of q
    v_j = sum_i w_i k(q_j, x_i)             (B,),   units of k

Gradients are always derived by JAX, never written by hand per kernel.  Three formulations:

``radial`` (``mode="auto"`` on a kernel with a radial profile ``k = f(r2)``, ``r2 = |(q - x) / l|^2``)
    grad_q k(q, x) = 2 f'(r2) (q - x) / l^2, so with ``u = q / l`` and ``F'_ji = w_i f'(r2_ji)``:
    ``g_j = (2 / l) * (u_j * sum_i F'_ji - (F' @ u_x)_j)``.  ``f'`` comes from ``vmap(jacfwd(f))``
    elementwise; ``r2`` and both sums are GEMMs.  For the Gaussian family (``f(r2) = f(0) exp(e(r2))``
    with ``e`` linear, e.g. rbf), ``f' = e' f`` with ``e'`` from ``jacfwd(e)``: the GEMM yields ``e(r2)``
    directly, and ``S = F @ [w u_x, w]`` is the only other GEMM (``v = S[:, -1]``); one exp per pair.
``dot`` (``mode="auto"`` on a kernel with a dot-product profile ``k = f(q . x)``)
    grad_q k = f'(q . x) x, so ``g = (w * F') @ X``.
``generic`` (kernels without structure, and any kernel with ``mode="jacfwd"`` or ``"jacrev"``)
    ``mode="auto"``: ``vmap`` over every pair of JAX's per-pair gradient of k, in a structure-of-arrays
    layout (see :func:`_pairwise_grad_tile`); ``mode="jacfwd"`` / ``"jacrev"``: ``vmap`` over query rows of
    ``jacfwd`` (or ``jacrev``) of the row sum ``q -> sum_i w_i k(q, x_i)``, the seed post's formulation
    in tiles.

Precision is chosen per query block (:func:`block_setup`): each block is computed in coordinates centred
on itself, with float32 tiles where that is accurate enough and float64 GEMMs or exact per-dimension
differences where it is not (:class:`Variant`).

Shapes are fixed and padded, so each process compiles once per (kernel, mode, dtype, tile shape, variant):
sources are padded to whole tiles with zero weight (padding contributes exactly 0), query blocks are
padded by repeating a row and trimmed after.  One jitted call handles ``tiles_per_call`` source tiles
with ``lax.scan`` and returns one partial sum per tile; partials are added in float64, in a fixed order,
so results are reproducible bit for bit and float32 error does not grow with the number of sources.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .kernels import KernelSpec, get_kernel
from .options import DTYPES, MODES  # noqa: F401  (defined without JAX: the command line checks them first)
from .reductions import sums_as_dots
HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on GPUs: r2 needs full precision
PREPARE_ROWS = 1 << 16  # sources re-centred in float64 this many rows at a time


@dataclass(frozen=True)
class TileShape:
    """Fixed shapes of one compiled call: ``rows`` queries x ``tiles_per_call`` tiles of ``cols`` sources."""

    rows: int
    cols: int
    tiles_per_call: int

    @property
    def sources_per_call(self) -> int:
        return self.cols * self.tiles_per_call


def formulation(spec: KernelSpec, mode: str) -> str:
    """Which tile formulation a kernel and mode use: ``radial``, ``dot`` or ``generic``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {', '.join(MODES)}")
    structure = get_kernel(spec.name).structure
    return structure if mode == "auto" else "generic"


def enable_x64() -> None:
    """Turn on JAX's x64 switch for the rest of this process (worker processes: float64 runs, and float32
    runs that take some steps in float64).  Arrays are always cast explicitly, so float32 stays float32."""
    if not jax.config.read("jax_enable_x64"):
        jax.config.update("jax_enable_x64", True)


def needs_x64(spec: KernelSpec, mode: str, dtype: str) -> bool:
    """float64 runs, and float32 runs that take their distances in float64 (Matern 3/2, 5/2)."""
    kernel = get_kernel(spec.name)
    return dtype == "float64" or (formulation(spec, mode) == "radial" and kernel.distances == "wide")


@contextlib.contextmanager
def x64_enabled(needed: bool = True):
    """JAX's x64 switch on inside the block (if ``needed``) and restored after: the in-process API leaves
    the caller's JAX configuration as it found it.  (Switched per call, it costs JAX its fast dispatch
    path, so float32 runs that need no float64 step leave it alone.)"""
    before = jax.config.read("jax_enable_x64")
    if not needed or before:
        yield
        return
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def thread_x64(enabled: bool):
    """A context that sets JAX's x64 switch for the current thread only (threads do not inherit it)."""
    context = getattr(jax, "enable_x64", None)
    if context is None:  # JAX before jax.enable_x64
        from jax.experimental import enable_x64 as context
    return context(enabled)


def on_cpu() -> bool:
    """JAX's default backend is the CPU (the in-process API then runs one query block per core)."""
    return jax.default_backend() == "cpu"


def split_params(spec: KernelSpec, dtype: str):
    """Parameters as (dynamic arrays, static integers): changing a float parameter never recompiles."""
    dynamic = {"lengthscale": np.asarray(spec.lengthscale, dtype=dtype),
               "variance": np.asarray(spec.variance, dtype=dtype)}
    static = []
    for name, value in spec.params:
        if isinstance(value, int) and not isinstance(value, bool):
            static.append((name, value))
        else:
            dynamic[name] = np.asarray(value, dtype=dtype)
    return dynamic, tuple(static)


def squared_distances(u, ux, wide=False):
    """r2_ji = |u_j|^2 + |ux_i|^2 - 2 u_j.ux_i as one GEMM (clamped at 0).  ``wide``: in float64."""
    if wide:
        return squared_distances(u.astype(jnp.float64), ux.astype(jnp.float64)).astype(u.dtype)
    return jnp.maximum(_scaled_distance_gemm(u, ux, 1.0), 0.0)


def _scaled_distance_gemm(u, ux, scale):
    """scale * r2_ji as one GEMM: the scale is folded into the (C, D + 2) source operand, not applied to
    the (B, C) result."""
    qa = jnp.concatenate([u, jnp.sum(u * u, 1, keepdims=True), jnp.ones_like(u[:, :1])], 1)
    xa = jnp.concatenate([-2.0 * ux, jnp.ones_like(ux[:, :1]), jnp.sum(ux * ux, 1, keepdims=True)], 1)
    return jnp.matmul(qa, xa.T * scale, precision=HIGHEST)


def _radial_direct_tile(profile, q, x, w, p):
    """(g, v) of one tile for k = f(r2) from exact per-dimension differences (no GEMM cancellation).

    Slower than :func:`_radial_tile` (B x C elementwise work per dimension) but accurate for close pairs
    when f'(r2) grows like 1/r (Matern 1/2).
    """
    inv_l = 1.0 / p["lengthscale"]
    qt, xt = q.T, x.T  # (D, B), (D, C): contiguous rows per dimension
    # Subtract first, then scale: q == x gives exactly 0 however XLA fuses (no FMA residue), so the
    # safe square root at r = 0 sees the same r2 = 0 wherever XLA recomputes it.
    diffs = [(qt[d][:, None] - xt[d][None, :]) * inv_l[d] for d in range(qt.shape[0])]
    r2 = sum(t * t for t in diffs)
    d_f, f = _elementwise_jacfwd(lambda r: profile(r, p))(r2)
    fw = d_f * w
    g = jnp.stack([jnp.sum(fw * t, axis=1) for t in diffs], axis=1)
    return 2.0 * inv_l * g, jnp.matmul(f, w, precision=HIGHEST)


def _radial_tile(profile, wide, q, x, w, p):
    """(g, v) of one tile for k = f(|(q - x)/l|^2).  q (B, D), x (C, D), w (C,)."""
    inv_l = 1.0 / p["lengthscale"]
    u, ux = q * inv_l, x * inv_l
    r2 = squared_distances(u, ux, wide)
    d_f, f = _elementwise_jacfwd(lambda r: profile(r, p))(r2)
    xw = jnp.concatenate([ux * w[:, None], w[:, None]], 1)  # (C, D + 1)
    s = jnp.matmul(d_f, xw, precision=HIGHEST)  # (B, D + 1): [F'w @ ux, F'w @ 1]
    g = 2.0 * inv_l * (u * s[:, -1:] - s[:, :-1])
    return g, jnp.matmul(f, w, precision=HIGHEST)


def _gaussian_tile(profile, exponent, q, x, w, p):
    """(g, v) of one tile for k = f(0) exp(e(r2)) with e linear in r2 and e' < 0 (rbf: e = -r2 / 2).

    grad_q k = 2 e' k (q - x) / l^2, so with ``S = F @ [w u_x, w]`` (``F_ji = exp(e(r2_ji))``):
    ``v = f(0) S[:, -1]`` and ``g = (2 e' f(0) / l) (u S[:, -1] - S[:, :-1])``.  ``e'`` is JAX's derivative
    of the exponent (constant, as e is linear); the GEMM computes ``e' r2`` directly, clamped at 0 above.
    """
    inv_l = 1.0 / p["lengthscale"]
    u, ux = q * inv_l, x * inv_l
    zero = jnp.zeros((), q.dtype)
    slope = jax.jacfwd(lambda r2: exponent(r2, p))(zero)
    f = jnp.exp(jnp.minimum(_scaled_distance_gemm(u, ux, slope), 0.0))
    xw = jnp.concatenate([ux * w[:, None], w[:, None]], 1)  # (C, D + 1)
    s = jnp.matmul(f, xw, precision=HIGHEST) * profile(zero, p)  # (B, D + 1)
    g = 2.0 * slope * inv_l * (u * s[:, -1:] - s[:, :-1])
    return g, s[:, -1]


def _dot_tile(profile, q, x, w, p):
    """(g, v) of one tile for k = f(q . x)."""
    s = jnp.matmul(q, x.T, precision=HIGHEST)
    d_f, f = _elementwise_jacfwd(lambda t: profile(t, p))(s)
    return jnp.matmul(d_f * w, x, precision=HIGHEST), jnp.matmul(f, w, precision=HIGHEST)


def _pairwise_grad_tile(evaluate, q, x, w, p):
    """(g, v) of one tile for any single-point k: ``vmap`` over all B x C pairs of JAX's gradient of k.

    The pairs are laid out structure-of-arrays, (D, B*C) with the pair axis last, so the kernel's
    reductions over the D coordinates run across whole rows.  XLA:CPU vectorises that well; with the
    pair axis first (``vmap`` over rows of ``jacfwd(row_sum)``) it spends its time on length-D inner loops
    and runs several times slower (benchmarks/).  Reverse mode (``value_and_grad``) gives each pair's
    value and gradient in one forward and one backward pass.  The kernel's sums (over its D coordinates)
    run as dots with ones (:mod:`pipeline.reductions`): with XLA:CPU's fused reductions over the leading
    axis the periodic tile ran at about half the speed.
    """
    dim, rows, cols = q.shape[1], q.shape[0], x.shape[0]
    qs = jnp.broadcast_to(q.T[:, :, None], (dim, rows, cols)).reshape(dim, rows * cols)
    xs = jnp.broadcast_to(x.T[:, None, :], (dim, rows, cols)).reshape(dim, rows * cols)
    pair = jax.value_and_grad(sums_as_dots(lambda a, b: evaluate(a, b, p)))
    k, dk = jax.vmap(pair, in_axes=(1, 1), out_axes=(0, 1))(qs, xs)
    g = jnp.matmul(dk.reshape(dim, rows, cols), w, precision=HIGHEST).T
    return g, jnp.matmul(k.reshape(rows, cols), w, precision=HIGHEST)


def _generic_tile(evaluate, ad, q, x, w, p):
    """(g, v) of one tile for any single-point k, by vmap over rows of jacfwd/jacrev of the row sum."""

    def row_sum(qj):
        s = jnp.dot(jax.vmap(evaluate, (None, 0, None))(qj, x, p), w, precision=HIGHEST)
        return s, s

    return jax.vmap(ad(row_sum, has_aux=True))(q)


def _elementwise_jacfwd(scalar_fn):
    """Elementwise (f'(t), f(t)) over a 2-D array, by vmap of jacfwd of the scalar function."""
    fn = jax.jacfwd(lambda t: (scalar_fn(t), scalar_fn(t)), has_aux=True)
    return jax.vmap(jax.vmap(fn))


# ----------------------------------------------------------------------------------------------------------
# Precision per query block.
#
# Stationary kernels depend on q - x only, so each query block is computed in its own coordinates, centred
# on the block's mid-range c (float64).  Queries and sources are held relative to the run's centre, as
# float32 hi/lo pairs in float32 runs (one float64 array in float64 runs), and moved to c inside the jitted
# call in the same way (a query equal to a source stays exactly equal), so they keep ~48 bits wherever the
# block lies.  With the block's radius e (in lengthscales), the GEMM forms' errors are then ~eps (e + r)^2
# in r^2 and ~eps e sum|F'| in the assembly u S - F' u_x: small for compact blocks, whatever the data's
# offset or total spread.  Blocks for which that is too large take a variant with float64 GEMMs, or exact
# per-dimension differences (:func:`choose_variant`; thresholds below, measured in NOTES of issue 9 and
# tested by tests/test_accuracy_layouts.py).

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
# Kernels that are not re-centred (dot-product and user kernels) can take both signs, so their sums may
# cancel even with positive weights.  float32 runs estimate the cancellation ratio max_j sum_i |w_i k_ji| /
# max_j |v_j| (and the same for g) on a sample of the sources as queries (in float64), and compute in
# float64 above this.  Measured: float32 error ~2 eps x ratio (2.4e-5 at ratio 214, the linear kernel on
# centred data).
CANCELLATION_MAX = 32.0
CANCELLATION_SAMPLE = 64


@dataclass(frozen=True)
class Variant:
    """How one query block is computed: ``compute``, the dtype of the elementwise work; ``distances``:
    ``"gemm"`` (the formulation's own tile; kernel flags such as Matern's apply), ``"wide"`` (radial: GEMMs
    and assembly in float64, elementwise float32) or ``"direct"`` (radial: exact per-dimension differences)."""

    compute: str
    distances: str = "gemm"

    @property
    def float64(self) -> bool:
        """Needs JAX's x64 switch."""
        return self.compute == "float64" or self.distances == "wide"


@dataclass(frozen=True)
class BlockSetup:
    center: np.ndarray  # (D,) float64: the block's coordinates are relative to it (stationary kernels)
    radius: float  # the block's half-diagonal in lengthscales (0 for kernels that are not re-centred)
    variant: Variant


def choose_variant(spec: KernelSpec, mode: str, dtype: str, radius: float, signed: bool,
                   reach: float = 0.0, spacing: float = 0.0) -> Variant:
    """The cheapest variant that keeps a block within the accuracy bound (see the thresholds above).

    ``radius``: the block's half-diagonal in lengthscales; ``signed``: the weights have both signs or the
    sums cancel (float32 rounding of w and of each term would then exceed the bound: float32 runs compute
    in float64); ``reach``: periodic kernels, see :data:`FAST_REACH_PERIODIC`; ``spacing``: see
    :data:`SPACING_FLOAT32`.
    """
    kernel = get_kernel(spec.name)
    radial = formulation(spec, mode) == "radial" and kernel.stationary
    if dtype == "float64":
        exact = radial and (radius > GEMM_RADIUS_FLOAT64 or spacing > SPACING_FLOAT64)
        return Variant("float64", "direct" if exact else "gemm")
    fast = not signed
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
    if signed or kernel.distances == "direct" or radius > GEMM_RADIUS_WIDE or spacing > SPACING_FLOAT64:
        return Variant("float64", "direct" if radius > GEMM_RADIUS_WIDE or spacing > SPACING_FLOAT64
                       or kernel.distances == "direct" else "gemm")
    return Variant("float32", "wide")


def block_setup(queries, prepared: "PreparedSources", spec: KernelSpec, mode: str, dtype: str) -> BlockSetup:
    """Centre, radius and variant of one block of query rows (numpy, float64)."""
    from .spatial import block_box

    queries = np.asarray(queries)
    kernel = get_kernel(spec.name)
    if not kernel.stationary or len(queries) == 0:
        return BlockSetup(prepared.center, 0.0, choose_variant(spec, mode, dtype, 0.0, prepared.signed))
    lengthscale = np.asarray(spec.lengthscale, np.float64)
    center, half, radius = block_box(queries, lengthscale)
    if len(queries) > 1:  # rows in computing (Morton) order: neighbours in space follow each other
        steps = np.diff(np.asarray(queries, np.float64) / lengthscale, axis=0)
        spacing = float(np.sqrt(np.min(np.sum(steps * steps, axis=1))))
    else:
        spacing = np.inf
    reach = 0.0
    if kernel.radial_profile is None and prepared.count:
        period = float(dict(spec.params).get("period", 1.0))
        far = np.maximum(np.abs(center - prepared.lower), np.abs(prepared.upper - center)) + half * lengthscale
        reach = float(np.max(far / period * np.maximum(1.0, 1.0 / lengthscale ** 2)))
    variant = choose_variant(spec, mode, dtype, radius, prepared.signed, reach, spacing)
    return BlockSetup(center, radius, variant)


def _wide_radial_tile(profile, exponent, q, x, w, p):
    """(g, v) of one tile for k = f(|(q - x)/l|^2) with q, x, w in float64 (block coordinates): r^2 by a
    float64 GEMM, f and f' in float32, then the sums and the assembly u S - S_x in float64.  The float32
    rounding of each f' multiplies its own (u - u_x), so the error is ~eps32 sum |F' w (u - u_x)| whatever
    the block's extent.  ``exponent``: the Gaussian family's (one exp per pair, as :func:`_gaussian_tile`)."""
    f32, f64 = jnp.float32, q.dtype
    inv_l = 1.0 / p["lengthscale"]
    u, ux = q * inv_l, x * inv_l
    p32 = {k: (v.astype(f32) if hasattr(v, "astype") else v) for k, v in p.items()}
    xw = jnp.concatenate([ux * w[:, None], w[:, None]], 1)  # (C, D + 1), float64
    if exponent is not None:
        slope = jax.jacfwd(lambda r2: exponent(r2, p))(jnp.zeros((), f64))
        f = jnp.exp(jnp.minimum(_scaled_distance_gemm(u, ux, slope), 0.0).astype(f32))
        s = jnp.matmul(f.astype(f64), xw, precision=HIGHEST) * profile(jnp.zeros((), f64), p)
        return 2.0 * slope * inv_l * (u * s[:, -1:] - s[:, :-1]), s[:, -1]
    r2 = jnp.maximum(_scaled_distance_gemm(u, ux, 1.0), 0.0).astype(f32)
    d_f, f = _elementwise_jacfwd(lambda r: profile(r, p32))(r2)
    s = jnp.matmul(d_f.astype(f64), xw, precision=HIGHEST)
    g = 2.0 * inv_l * (u * s[:, -1:] - s[:, :-1])
    return g, jnp.matmul(f.astype(f64), w, precision=HIGHEST)


@functools.lru_cache(maxsize=128)
def compiled_block(name: str, static: tuple, form: str, mode: str, dtype: str, shape: TileShape, dim: int,
                   variant: Variant | None = None):
    """The jitted call for one (kernel, formulation, dtype, tile shape, variant): built lazily, once per
    process.

    Signature: ``(q (rows, D), q_lo, offset (2, D), x (tiles, cols, D), x_lo, w (tiles, cols), w_lo,
    dynamic params) -> (g, v)`` with ``g`` (tiles, rows, D) and ``v`` (tiles, rows): one partial sum per
    source tile.  Queries and sources are relative to the sources' centre, in the run's dtype, with their
    low parts ``q_lo``, ``x_lo``, ``w_lo`` in float32 runs (None in float64 runs); ``offset`` is the block's
    centre minus the sources' centre as a hi/lo pair (lo = 0 in float64 runs).  Inside the call both are
    moved to the block's coordinates in the variant's compute dtype.
    """
    variant = variant or Variant(dtype, "gemm")
    kernel = get_kernel(name)
    extra = dict(static)
    compute = "float64" if variant.float64 else variant.compute  # of the coordinates and weights
    if form == "radial" and variant.distances == "wide":
        gaussian = kernel.exponent if kernel.distances == "gemm" else None
        tile = functools.partial(_wide_radial_tile, kernel.radial_profile, gaussian)
    elif form == "radial" and (kernel.distances == "direct" or variant.distances == "direct"):
        tile = functools.partial(_radial_direct_tile, kernel.radial_profile)
    elif form == "radial" and kernel.exponent is not None and kernel.distances == "gemm":
        tile = functools.partial(_gaussian_tile, kernel.radial_profile, kernel.exponent)
    elif form == "radial":
        wide = kernel.distances == "wide" and compute == "float32"
        tile = functools.partial(_radial_tile, kernel.radial_profile, wide)
    elif form == "dot":
        tile = functools.partial(_dot_tile, kernel.dot_profile)
    elif mode == "auto":  # a kernel without structure: the fastest generic formulation measured
        tile = functools.partial(_pairwise_grad_tile, kernel.evaluate)
    else:
        ad = jax.jacrev if mode == "jacrev" else jax.jacfwd
        tile = functools.partial(_generic_tile, kernel.evaluate, ad)
    shift = kernel.stationary
    split = dtype == "float32"

    def coords(x, x_lo, offset):
        """Points relative to the sources' centre -> the block's coordinates, in the compute dtype."""
        if not split:  # float64 run: one float64 array
            return x - offset[0] if shift else x
        if compute == "float32":  # hi/lo: (hi - c_hi) is exact for points near the block
            return (x - offset[0]) + (x_lo - offset[1]) if shift else x
        x64, lo64, off = x.astype(compute), x_lo.astype(compute), offset.astype(compute)
        return (x64 - (off[0] + off[1])) + lo64 if shift else x64 + lo64

    def weights(w, w_lo):
        if not split or compute == "float32":
            return w
        return w.astype(compute) + w_lo.astype(compute)

    def block(q, q_lo, offset, xs, xs_lo, ws, ws_lo, dynamic):
        p = {**dynamic, **extra}
        # Queries are moved exactly as the sources are: a query equal to a source gets the same bits, so
        # their difference is exactly 0 (Matern 1/2's gradient jumps there).
        q = coords(q, q_lo, offset)

        def step(carry, xw):
            return carry, tile(q, coords(xw[0], xw[1], offset), weights(xw[2], xw[3]), p)

        _, (g, v) = jax.lax.scan(step, None, (xs, xs_lo, ws, ws_lo))
        return g, v

    return jax.jit(block)


@dataclass(frozen=True)
class PreparedSources:
    """Sources cast, re-centred and padded to whole calls of ``shape``: ready for every query block.

    float32 runs keep each coordinate and weight as a hi/lo pair of float32 (hi = float32(a), lo =
    float32(a - hi)): 48 bits, so blocks can be re-centred anywhere and float64 variants see (nearly) the
    float64 inputs.  float64 runs keep one float64 array (``coords_lo``, ``weights_lo`` None).
    """

    coords: np.ndarray  # (calls, tiles_per_call, cols, D), run dtype (or a list of device arrays)
    weights: np.ndarray  # (calls, tiles_per_call, cols), run dtype; 0 on padding
    center: np.ndarray  # (D,) float64, subtracted from sources and queries (zeros if not stationary)
    count: int
    coords_lo: np.ndarray | None = None
    weights_lo: np.ndarray | None = None
    lower: np.ndarray | None = None  # (D,) float64: the sources' bounding box, in input coordinates
    upper: np.ndarray | None = None
    signed: bool = False  # float32 terms may cancel: weights of both signs, or (kernels not re-centred) a
    # sampled cancellation ratio above CANCELLATION_MAX; float32 runs then compute in float64

    def calls(self):
        """Per call: (coords, coords_lo, weights, weights_lo)."""
        n = len(self.coords)
        lo_c = self.coords_lo if self.coords_lo is not None else [None] * n
        lo_w = self.weights_lo if self.weights_lo is not None else [None] * n
        return zip(self.coords, lo_c, self.weights, lo_w)

    def to_device(self) -> "PreparedSources":
        """The same sources held on an accelerator, one array per call: workers that reuse them for many
        query blocks move them over the bus once.  On the CPU it returns ``self`` (no second copy)."""
        if on_cpu():
            return self
        put = lambda arrays: None if arrays is None else [jax.device_put(a) for a in arrays]  # noqa: E731
        return dataclasses.replace(self, coords=put(self.coords), weights=put(self.weights),
                                   coords_lo=put(self.coords_lo), weights_lo=put(self.weights_lo))


def source_center(sources: np.ndarray, spec: KernelSpec) -> np.ndarray:
    """Stationary kernels depend on q - x only: shift by the sources' mid-range (in float64) so that
    coordinates far from the origin lose no float32 precision.  Other kernels are not shifted."""
    dim = sources.shape[1]
    if not get_kernel(spec.name).stationary or len(sources) == 0:
        return np.zeros(dim)
    lo = np.min(sources, axis=0).astype(np.float64)
    hi = np.max(sources, axis=0).astype(np.float64)
    return 0.5 * (lo + hi)


def _split(values: np.ndarray, hi: np.ndarray, lo: np.ndarray | None) -> None:
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
    coords = np.empty((padded, dim), dtype=dtype)
    coords_lo = np.empty((padded, dim), dtype=dtype) if split else None
    for start in range(0, m, PREPARE_ROWS):  # centre in float64, a block at a time (bounded memory)
        stop = min(start + PREPARE_ROWS, m)
        _split(sources[start:stop].astype(np.float64) - center, coords[start:stop],
               None if coords_lo is None else coords_lo[start:stop])
    coords[m:] = coords[0] if m else 0.0  # a real point with weight 0: contributes exactly 0
    if split:
        coords_lo[m:] = coords_lo[0] if m else 0.0
    w = np.zeros(padded, dtype=dtype)
    w_lo = np.zeros(padded, dtype=dtype) if split else None
    signed = False
    if weights is None:
        w[:m] = 1.0
    else:
        w64 = np.asarray(weights, dtype=np.float64)
        _split(w64, w[:m], None if w_lo is None else w_lo[:m])
        signed = bool(m and w64.min() < 0 < w64.max())
    if split and m and not signed and not get_kernel(spec.name).stationary:
        signed = cancellation_ratio(spec, sources, weights) > CANCELLATION_MAX
    lower = np.min(sources, axis=0).astype(np.float64) if m else np.zeros(dim)
    upper = np.max(sources, axis=0).astype(np.float64) if m else np.zeros(dim)
    lay = lambda a, *tail: None if a is None else a.reshape(calls, shape.tiles_per_call, shape.cols, *tail)  # noqa: E731
    return PreparedSources(lay(coords, dim), lay(w), center, m, lay(coords_lo, dim), lay(w_lo),
                           lower, upper, signed)


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


def query_blocks(queries, spec: KernelSpec, rows: int) -> list[np.ndarray]:
    """Row indices of each query block of at most ``rows`` rows, in the order they are computed.

    Stationary kernels: the rows in Morton order of their coordinates scaled by the lengthscales
    (:func:`pipeline.spatial.morton_order`), so that each block is compact; others: input order.  Results
    are written back to the rows' own places, so only which rows share a block changes.
    """
    from .spatial import block_slices, morton_order

    queries = np.asarray(queries)
    n = len(queries)
    if get_kernel(spec.name).stationary and n > rows:
        order = morton_order(queries.astype(np.float64) / np.asarray(spec.lengthscale, np.float64))
    else:
        order = np.arange(n, dtype=np.int64)
    return [order[s] for s in block_slices(n, rows)]


def x64_active() -> bool:
    """JAX's x64 switch is on for this thread (``jax.enable_x64`` contexts are per thread)."""
    return jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)


def block_sums(queries, prepared: PreparedSources, spec: KernelSpec, mode: str, dtype: str,
               shape: TileShape, setup: BlockSetup | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed gradient (b, D) and kernel sum (b,) in float64 for up to ``shape.rows`` query rows.
    Needs JAX's x64 switch on (:func:`enable_x64` or :func:`x64_enabled`) for float64 runs and for blocks
    whose variant computes in float64 (:func:`block_setup`)."""
    queries = np.asarray(queries)
    b, dim = queries.shape
    if b > shape.rows:
        raise ValueError(f"block of {b} rows exceeds the tile's {shape.rows} rows")
    setup = setup or block_setup(queries, prepared, spec, mode, dtype)
    variant = setup.variant
    if variant.float64 and not x64_active():
        raise RuntimeError("this block computes in float64 but JAX's x64 switch is off (use x64_enabled)")
    split = dtype == "float32"
    q = np.empty((shape.rows, dim), dtype=dtype)
    q_lo = np.empty((shape.rows, dim), dtype=dtype) if split else None
    _split(queries.astype(np.float64) - prepared.center, q[:b], q_lo[:b] if split else None)
    q[b:] = q[0] if b else 0.0
    if split:
        q_lo[b:] = q_lo[0] if b else 0.0
    delta = setup.center - prepared.center
    offset = np.zeros((2, dim), dtype=dtype)
    _split(delta, offset[0], offset[1] if dtype == "float32" else None)
    dynamic, static = split_params(spec, "float64" if variant.float64 else dtype)
    fn = compiled_block(spec.name, static, formulation(spec, mode), mode, dtype, shape, dim, variant)
    # Dispatch every call first (JAX runs them asynchronously), then add the partials in a fixed order.
    partials = [fn(q, q_lo, offset, xs, xs_lo, ws, ws_lo, dynamic) for xs, xs_lo, ws, ws_lo in prepared.calls()]
    g_total = np.zeros((shape.rows, dim))
    v_total = np.zeros(shape.rows)
    for g, v in partials:
        g_total += np.sum(np.asarray(g, dtype=np.float64), axis=0)
        v_total += np.sum(np.asarray(v, dtype=np.float64), axis=0)
    return g_total[:b], v_total[:b]
