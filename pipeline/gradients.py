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

Shapes are fixed and padded, so each process compiles once per (kernel, mode, dtype, tile shape):
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
from .reductions import sums_as_dots

MODES = ("auto", "jacfwd", "jacrev")
DTYPES = ("float32", "float64")
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


@functools.lru_cache(maxsize=64)
def compiled_block(name: str, static: tuple, form: str, mode: str, dtype: str, shape: TileShape, dim: int):
    """The jitted call for one (kernel, formulation, dtype, tile shape): built lazily, once per process.

    Signature: ``(q (rows, D), x (tiles, cols, D), w (tiles, cols), dynamic params) -> (g, v)`` with
    ``g`` (tiles, rows, D) and ``v`` (tiles, rows): one partial sum per source tile.
    """
    kernel = get_kernel(name)
    extra = dict(static)
    if form == "radial" and kernel.distances == "direct":
        tile = functools.partial(_radial_direct_tile, kernel.radial_profile)
    elif form == "radial" and kernel.exponent is not None and kernel.distances == "gemm":
        tile = functools.partial(_gaussian_tile, kernel.radial_profile, kernel.exponent)
    elif form == "radial":
        wide = kernel.distances == "wide" and dtype == "float32"
        tile = functools.partial(_radial_tile, kernel.radial_profile, wide)
    elif form == "dot":
        tile = functools.partial(_dot_tile, kernel.dot_profile)
    elif mode == "auto":  # a kernel without structure: the fastest generic formulation measured
        tile = functools.partial(_pairwise_grad_tile, kernel.evaluate)
    else:
        ad = jax.jacrev if mode == "jacrev" else jax.jacfwd
        tile = functools.partial(_generic_tile, kernel.evaluate, ad)

    def block(q, xs, ws, dynamic):
        p = {**dynamic, **extra}

        def step(carry, xw):
            return carry, tile(q, xw[0], xw[1], p)

        _, (g, v) = jax.lax.scan(step, None, (xs, ws))
        return g, v

    return jax.jit(block)


@dataclass(frozen=True)
class PreparedSources:
    """Sources cast, re-centred and padded to whole calls of ``shape``: ready for every query block."""

    coords: np.ndarray  # (calls, tiles_per_call, cols, D), compute dtype (or a list of device arrays)
    weights: np.ndarray  # (calls, tiles_per_call, cols), compute dtype; 0 on padding
    center: np.ndarray  # (D,) float64, subtracted from sources and queries (zeros if not stationary)
    count: int

    def to_device(self) -> "PreparedSources":
        """The same sources held on an accelerator, one array per call: workers that reuse them for many
        query blocks move them over the bus once.  On the CPU it returns ``self`` (no second copy)."""
        if on_cpu():
            return self
        return dataclasses.replace(self, coords=[jax.device_put(c) for c in self.coords],
                                   weights=[jax.device_put(w) for w in self.weights])


def source_center(sources: np.ndarray, spec: KernelSpec) -> np.ndarray:
    """Stationary kernels depend on q - x only: shift by the sources' mid-range (in float64) so that
    coordinates far from the origin lose no float32 precision.  Other kernels are not shifted."""
    dim = sources.shape[1]
    if not get_kernel(spec.name).stationary or len(sources) == 0:
        return np.zeros(dim)
    lo = np.min(sources, axis=0).astype(np.float64)
    hi = np.max(sources, axis=0).astype(np.float64)
    return 0.5 * (lo + hi)


def prepare_sources(sources, weights, spec: KernelSpec, dtype: str, shape: TileShape,
                    center: np.ndarray | None = None) -> PreparedSources:
    sources = np.asarray(sources)
    m, dim = sources.shape
    center = source_center(sources, spec) if center is None else np.asarray(center, np.float64)
    per_call = shape.sources_per_call
    calls = max(1, -(-m // per_call))
    padded = calls * per_call
    coords = np.empty((padded, dim), dtype=dtype)
    for start in range(0, m, PREPARE_ROWS):  # centre in float64, a block at a time (bounded memory)
        stop = min(start + PREPARE_ROWS, m)
        coords[start:stop] = sources[start:stop].astype(np.float64) - center
    coords[m:] = coords[0] if m else 0.0  # a real point with weight 0: contributes exactly 0
    w = np.zeros(padded, dtype=dtype)
    w[:m] = 1.0 if weights is None else weights
    return PreparedSources(coords.reshape(calls, shape.tiles_per_call, shape.cols, dim),
                           w.reshape(calls, shape.tiles_per_call, shape.cols), center, m)


def block_sums(queries, prepared: PreparedSources, spec: KernelSpec, mode: str, dtype: str,
               shape: TileShape) -> tuple[np.ndarray, np.ndarray]:
    """Summed gradient (b, D) and kernel sum (b,) in float64 for up to ``shape.rows`` query rows.
    Needs JAX's x64 switch on (:func:`enable_x64` or :func:`x64_enabled`)."""
    queries = np.asarray(queries)
    b, dim = queries.shape
    if b > shape.rows:
        raise ValueError(f"block of {b} rows exceeds the tile's {shape.rows} rows")
    q = np.empty((shape.rows, dim), dtype=dtype)
    q[:b] = queries.astype(np.float64) - prepared.center
    q[b:] = q[0] if b else 0.0
    dynamic, static = split_params(spec, dtype)
    fn = compiled_block(spec.name, static, formulation(spec, mode), mode, dtype, shape, dim)
    # Dispatch every call first (JAX runs them asynchronously), then add the partials in a fixed order.
    partials = [fn(q, xs, ws, dynamic) for xs, ws in zip(prepared.coords, prepared.weights)]
    g_total = np.zeros((shape.rows, dim))
    v_total = np.zeros(shape.rows)
    for g, v in partials:
        g_total += np.sum(np.asarray(g, dtype=np.float64), axis=0)
        v_total += np.sum(np.asarray(v, dtype=np.float64), axis=0)
    return g_total[:b], v_total[:b]
