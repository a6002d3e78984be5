"""Tile formulations: summed kernel gradients and kernel sums of one block of queries against one tile of
sources, as jitted JAX code.

For a block of queries ``q_j`` (B, D) and sources ``x_i`` with weights ``w_i`` a tile computes

    g_j = sum_i w_i grad_q k(q_j, x_i)      (B, D), units of k per unit of q
    v_j = sum_i w_i k(q_j, x_i)             (B,),   units of k

Gradients are always derived by JAX, never written by hand per kernel.  Three formulations
(:func:`formulation`):

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

Each block is computed in a :class:`Variant` (chosen per block by :mod:`pipeline.block_precision`): the
formulation's own float32 or float64 tile, the "wide" radial tile (GEMMs and assembly in float64, the
kernel's elementwise work in float32) or exact per-dimension differences (radial kernels).  Coordinates
inside a tile are in input units, centred on the query block for stationary kernels (unshifted for the
others); ``u = q / l`` are in lengthscales.

Shapes are fixed and padded (:class:`TileShape`), so each process compiles once per (kernel, mode, dtype,
tile shape, variant) (:func:`compiled_block`): sources are padded to whole tiles with zero weight
(padding contributes exactly 0), query blocks are padded by repeating a row and trimmed after.  One jitted
call handles ``tiles_per_call`` source tiles with ``lax.scan`` and returns one partial sum per tile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .kernels import KernelSpec, get_kernel
from .lazy_jax import jax, jnp
from .options import MODES
from .precision import HIGHEST
from .reductions import sums_as_dots


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
    structure = spec.kernel.structure
    return structure if mode == "auto" else "generic"


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


@dataclass(frozen=True)
class Variant:
    """How one query block is computed: ``compute``, the dtype of the elementwise work; ``distances``:
    ``"gemm"`` (the formulation's own tile; kernel flags such as Matern's apply), ``"wide"`` (radial: GEMMs
    and assembly in float64, elementwise float32) or ``"direct"`` (radial: exact per-dimension differences)."""

    compute: str
    distances: str = "gemm"

    @property
    def uses_float64(self) -> bool:
        """Holds float64 arrays (float64 variants, and the float32 "wide" variant's float64 GEMMs): needs
        JAX's x64 switch."""
        return self.compute == "float64" or self.distances == "wide"


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


def pack_layout(dtype: str, dim: int) -> tuple[int, int]:
    """Columns of one packed source row and the number of query rows per query row of a call, for a run in
    ``dtype``: float32 runs hold ``[x (D), x_lo (D), w, w_lo]`` per source and ``q``, ``q_lo`` per query
    (hi/lo pairs, :mod:`pipeline.sources`); float64 runs ``[x (D), w]`` and ``q``."""
    return (2 * dim + 2, 2) if dtype == "float32" else (dim + 1, 1)


@dataclass(frozen=True)
class _CallParts:
    """What every compiled call of one (kernel, formulation, dtype, variant) is made of: the tile, the
    kernel's static parameters, and how packed points are unpacked and moved to the block's coordinates."""

    tile: object
    extra: dict
    split: bool  # float32 run: hi/lo pairs
    shift: bool  # stationary kernel: coordinates move to the block's centre
    compute: str  # dtype of the coordinates and weights inside the call
    dim: int

    def coords(self, x, x_lo, offset):
        """Points relative to the sources' centre -> the block's coordinates, in the compute dtype."""
        if not self.split:  # float64 run: one float64 array
            return x - offset[0] if self.shift else x
        if self.compute == "float32":  # hi/lo: (hi - c_hi) is exact for points near the block
            return (x - offset[0]) + (x_lo - offset[1]) if self.shift else x
        x64, lo64, off = x.astype(self.compute), x_lo.astype(self.compute), offset.astype(self.compute)
        return (x64 - (off[0] + off[1])) + lo64 if self.shift else x64 + lo64

    def weights(self, w, w_lo):
        if not self.split or self.compute == "float32":
            return w
        return w.astype(self.compute) + w_lo.astype(self.compute)

    def queries(self, packed, rows: int):
        """Packed queries (rows * k + 2, D) -> (q in the block's coordinates, offset)."""
        offset = packed[-2:]
        q, q_lo = (packed[:rows], packed[rows:2 * rows]) if self.split else (packed[:rows], None)
        # Queries are moved exactly as the sources are: a query equal to a source gets the same bits, so
        # their difference is exactly 0 (Matern 1/2's gradient jumps there).
        return self.coords(q, q_lo, offset), offset

    def sources(self, tile_rows, offset):
        """One tile's packed rows (cols, S) -> (x in the block's coordinates, w)."""
        dim = self.dim
        if not self.split:
            return self.coords(tile_rows[:, :dim], None, offset), self.weights(tile_rows[:, dim], None)
        return (self.coords(tile_rows[:, :dim], tile_rows[:, dim:2 * dim], offset),
                self.weights(tile_rows[:, 2 * dim], tile_rows[:, 2 * dim + 1]))


def _call_parts(name: str, static: tuple, form: str, mode: str, dtype: str, dim: int,
                variant: Variant | None) -> _CallParts:
    variant = variant or Variant(dtype, "gemm")
    kernel = get_kernel(name)
    compute = "float64" if variant.uses_float64 else variant.compute  # of the coordinates and weights
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
    return _CallParts(tile, dict(static), dtype == "float32", kernel.stationary, compute, dim)


@functools.lru_cache(maxsize=128)
def compiled_block(name: str, static: tuple, form: str, mode: str, dtype: str, shape: TileShape, dim: int,
                   variant: Variant | None = None):
    """The jitted call for one (kernel, formulation, dtype, tile shape, variant): built lazily, once per
    process.

    Signature: ``(queries, sources, dynamic params) -> (g, v)`` with ``g`` (tiles, rows, D) and ``v``
    (tiles, rows): one partial sum per source tile.  Each call takes two arrays (every numpy argument of a
    jitted call is copied to the device on its own, ~12 us each on the CPU, which small pruned calls felt):
    ``queries`` (rows * k + 2, D) stacks ``q``, in float32 runs its low part ``q_lo``, then ``offset``
    (2, D), the block's centre minus the sources' centre as a hi/lo pair (lo = 0 in float64 runs);
    ``sources`` (tiles, cols, S) holds each source's packed row (:func:`pack_layout`).  Queries and sources
    are relative to the sources' centre, in the run's dtype; inside the call both are moved to the block's
    coordinates in the variant's compute dtype.
    """
    parts = _call_parts(name, static, form, mode, dtype, dim, variant)

    def block(queries, sources, dynamic):
        p = {**dynamic, **parts.extra}
        q, offset = parts.queries(queries, shape.rows)

        def step(carry, tile_rows):
            return carry, parts.tile(q, *parts.sources(tile_rows, offset), p)

        _, (g, v) = jax.lax.scan(step, None, sources)
        return g, v

    return jax.jit(block)


@functools.lru_cache(maxsize=128)
def compiled_items(name: str, static: tuple, form: str, mode: str, dtype: str, rows: int, subs: int, dim: int,
                   variant: Variant | None = None):
    """The jitted call for *items* of one query block cut into ``subs`` sub-blocks of ``rows`` rows: item
    ``i`` is sub-block ``item_sub[i]`` against one tile of sources (the pruned method gives each sub-block the
    sources it alone cannot skip).  Signature: ``(queries, sources, item_sub, dynamic) -> (g, v)`` with
    ``queries`` (subs * rows * k + 2, D) packed as for :func:`compiled_block` (sub-block after sub-block,
    then their low parts, then the block's offset), ``sources`` (items, cols, S), ``item_sub`` (items,)
    int32, -1 for a padding item (skipped: its sums are 0, at no cost, so one call size serves any number of
    items); ``g`` (items, rows, D), ``v`` (items, rows).  Every sub-block is moved to the block's centre, in
    the block's variant, so an item's bits depend only on its block."""
    parts = _call_parts(name, static, form, mode, dtype, dim, variant)

    def items(queries, sources, item_sub, dynamic):
        p = {**dynamic, **parts.extra}
        q, offset = parts.queries(queries, subs * rows)
        q = q.reshape(subs, rows, dim)

        def step(carry, item):
            tile_rows, sub = item
            mine = jax.lax.dynamic_index_in_dim(q, jnp.maximum(sub, 0), 0, keepdims=False)

            def compute():
                return parts.tile(mine, *parts.sources(tile_rows, offset), p)

            def skip():
                return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(compute))

            return carry, jax.lax.cond(sub >= 0, compute, skip)

        _, (g, v) = jax.lax.scan(step, None, (sources, item_sub))
        return g, v

    return jax.jit(items)
