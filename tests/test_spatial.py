"""pipeline.spatial (Morton order, the k-d refinement, block boxes) and the per-block variant choice of pipeline.block_precision."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.spatial import block_box, block_slices, morton_keys, morton_order


def test_morton_order_is_a_stable_permutation():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(5000, 3))
    order = morton_order(pts)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(5000))
    np.testing.assert_array_equal(order, morton_order(pts.copy()))  # deterministic
    dup = np.zeros((10, 2))
    np.testing.assert_array_equal(morton_order(dup), np.arange(10))  # ties keep input order
    np.testing.assert_array_equal(morton_order(np.ones((1, 4))), [0])


def test_morton_blocks_are_compact():
    """Blocks of consecutive points in Morton order are much smaller than blocks in input order."""
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 100, size=(8192, 2))
    order = morton_order(pts)
    radii = [block_box(pts[order[s]])[2] for s in block_slices(len(pts), 256)]
    assert np.median(radii) < 20 and block_box(pts[:256])[2] > 60


def test_morton_keys_interleave_bits():
    """On a 2 x 2 grid the Z order is (0,0), (0,1), (1,0), (1,1) with the first dimension most significant."""
    pts = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(morton_order(pts), [3, 1, 2, 0])
    assert morton_keys(pts).dtype == np.uint64


def test_block_box_and_slices():
    centre, half, radius = block_box(np.array([[0.0, 10.0], [2.0, 30.0]]), scale=[1.0, 10.0])
    np.testing.assert_array_equal(centre, [1.0, 20.0])
    np.testing.assert_array_equal(half, [1.0, 1.0])
    assert radius == pytest.approx(np.sqrt(2.0))
    assert block_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_dense_data_stays_on_the_float32_tiles():
    """The benchmark's data (standard normal, D = 3, lengthscale 1, unit weights): every query block of the
    in-process API takes the fast float32 variant (accuracy costs no speed there)."""
    from pipeline.block_precision import block_setup
    from pipeline.blocks import query_blocks
    from pipeline.sources import prepare_sources
    from pipeline.tiles import TileShape, Variant
    from pipeline.kernels import make_spec
    from pipeline.plan import make_plan

    x = np.random.default_rng(0).standard_normal((65536, 3)).astype(np.float32)
    spec = make_spec("rbf", 3)
    plan = make_plan(len(x), len(x), 3)
    prepared = prepare_sources(x[:512], None, spec, "float32", TileShape(plan.rows, 512, 1))
    variants = {block_setup(x[t.start + rows], prepared, spec, "auto", "float32").variant
                for t in plan.tasks for rows in query_blocks(x[t.start:t.stop], spec, plan.rows)}
    assert variants == {Variant("float32", "gemm")}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_variant_thresholds(dtype):
    from pipeline.block_precision import (FAST_RADIUS_FLOAT32, GEMM_RADIUS_FLOAT64, GEMM_RADIUS_WIDE,
                                          SPACING_FLOAT32, SPACING_FLOAT64, choose_variant)
    from pipeline.tiles import Variant
    from pipeline.kernels import make_spec

    rbf, m12, lin, per = (make_spec(k, 2) for k in ("rbf", "matern12", "linear", "periodic"))
    if dtype == "float64":
        assert choose_variant(rbf, "auto", dtype, GEMM_RADIUS_FLOAT64, False) == Variant("float64", "gemm")
        assert choose_variant(rbf, "auto", dtype, 2 * GEMM_RADIUS_FLOAT64, False).distances == "direct"
        assert choose_variant(rbf, "auto", dtype, 1.0, False, spacing=2 * SPACING_FLOAT64).distances == "direct"
        assert choose_variant(rbf, "jacfwd", dtype, 1e6, False) == Variant("float64", "gemm")  # no GEMM there
        return
    fast = Variant("float32", "gemm")
    assert choose_variant(rbf, "auto", dtype, FAST_RADIUS_FLOAT32, False, spacing=SPACING_FLOAT32) == fast
    assert choose_variant(rbf, "auto", dtype, FAST_RADIUS_FLOAT32, True) == Variant("float64", "gemm")  # may cancel
    assert choose_variant(rbf, "auto", dtype, 2 * FAST_RADIUS_FLOAT32, False) == Variant("float32", "wide")
    assert choose_variant(rbf, "auto", dtype, 1.0, False, spacing=2 * SPACING_FLOAT32) == Variant("float32", "wide")
    assert choose_variant(rbf, "auto", dtype, 1.0, False, spacing=2 * SPACING_FLOAT64).distances == "direct"
    assert choose_variant(rbf, "auto", dtype, 2 * GEMM_RADIUS_WIDE, False) == Variant("float64", "direct")
    assert choose_variant(m12, "auto", dtype, 1.0, False, spacing=100.0) == fast  # exact differences already
    assert choose_variant(m12, "auto", dtype, 2 * FAST_RADIUS_FLOAT32, False) == Variant("float64", "direct")
    assert choose_variant(rbf, "jacfwd", dtype, 2 * FAST_RADIUS_FLOAT32, False) == Variant("float64", "gemm")
    assert choose_variant(per, "auto", dtype, 1.0, False, reach=100.0) == Variant("float64", "gemm")
    assert choose_variant(lin, "auto", dtype, 0.0, False) == fast
    assert choose_variant(lin, "auto", dtype, 0.0, True) == Variant("float64", "gemm")


def test_wide_blocks_are_split_into_compact_ones():
    """A float32 block that would need the "wide" variant (radius above FAST_RADIUS_FLOAT32) is computed as
    SPLIT_WIDE blocks of its consecutive rows, each with its own centre and variant: on standard normal data
    at lengthscale 0.25 most rows then take the float32 tiles.  Every row stays in exactly one block, and
    blocks that were not wide are kept as they were."""
    from pipeline.blocks import SPLIT_WIDE, query_blocks, split_wide_blocks
    from pipeline.block_precision import block_setup
    from pipeline.kernels import make_spec
    from pipeline.sources import prepare_sources
    from pipeline.tiles import TileShape

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16384, 3)).astype(np.float32)
    spec = make_spec("rbf", 3, lengthscale=0.25)
    shape = TileShape(1024, 512, 4)
    prepared = prepare_sources(x, None, spec, "float32", shape)
    blocks = query_blocks(x, spec, shape.rows)
    setups = [block_setup(x[rows], prepared, spec, "auto", "float32") for rows in blocks]
    wide = [s.variant.distances == "wide" for s in setups]
    assert any(wide)
    out_blocks, out_setups, out_shapes = split_wide_blocks(x, blocks, setups, prepared, spec, "auto", "float32", shape)
    np.testing.assert_array_equal(np.sort(np.concatenate(out_blocks)), np.arange(len(x)))
    assert len(out_blocks) == len(blocks) + (SPLIT_WIDE - 1) * sum(wide)
    assert {s.rows for s in out_shapes} == {shape.rows, shape.rows // SPLIT_WIDE}
    for rows, setup, tile in zip(out_blocks, out_setups, out_shapes):
        assert len(rows) <= tile.rows
        again = block_setup(x[rows], prepared, spec, "auto", "float32")
        assert setup.variant == again.variant and np.array_equal(setup.center, again.center)
    wide_rows_before = sum(len(r) for r, w in zip(blocks, wide) if w)
    wide_rows_after = sum(len(r) for r, s in zip(out_blocks, out_setups) if s.variant.distances == "wide")
    assert wide_rows_after < wide_rows_before / 2
    # float64 runs and compact data are left alone
    same = split_wide_blocks(x, blocks, [block_setup(x[r], prepared, make_spec("rbf", 3, lengthscale=4.0), "auto",
                                                     "float32") for r in blocks], prepared, spec, "auto", "float32",
                             shape)
    assert len(same[0]) == len(blocks)


def _separated(rows: np.ndarray, size: int) -> bool:
    """The first ``size`` rows and the rest lie on two sides of one coordinate (in compact_order's float32
    keys, relative to each column's minimum)."""
    left, right = rows[:size], rows[size:]
    return any(left[:, d].max() <= right[:, d].min() for d in range(rows.shape[1]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 4), st.sampled_from([4, 16, 64]), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_compact_order_is_a_k_d_tree(n, dim, leaf, clustered, seed):
    """compact_order: a permutation, each range split along one coordinate into a power-of-two first part
    and the rest, and every aligned power-of-two range of the first part split into halves the same way, down
    to ``leaf`` rows (with duplicates and ties: equal keys may sit on both sides of a cut)."""
    from pipeline.spatial import compact_order, spatial_order

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) * rng.choice([1e-3, 1.0, 1e3])
    if clustered:
        x = np.round(x, 1) + rng.integers(0, 3, size=(n, 1)) * 1e4  # duplicates, clusters far apart
    lengthscale = rng.uniform(0.1, 10.0, size=dim)
    order = compact_order(x, lengthscale, spatial_order(x, lengthscale), leaf)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    scaled = x / lengthscale
    keys = np.minimum(scaled - scaled.min(axis=0), np.finfo(np.float32).max).astype(np.float32)[order]
    start = 0
    while n - start > leaf:  # the spine: [start, n) = a part of 2^k rows, then the rest
        first = 1 << ((n - start - 1).bit_length() - 1)
        assert _separated(keys[start:], first)
        size = first
        while size > leaf:
            for a in range(start, start + first, size):
                assert _separated(keys[a:a + size], size // 2), (a, size)
            size //= 2
        start += first


def _reference_compact_order(points, lengthscale, order, leaf):
    """compact_order by its definition, one range at a time: float32 keys, the widest dimension (the first
    of equal widths), the ``first`` smallest keys by a stable sort (ties in row order), each part keeping
    its rows' order."""
    scaled = np.asarray(points, np.float64) / np.asarray(lengthscale, np.float64)
    keys = np.minimum(scaled - scaled.min(axis=0), np.finfo(np.float32).max).astype(np.float32)

    def split(rows):
        if len(rows) <= leaf:
            return rows
        first = 1 << ((len(rows) - 1).bit_length() - 1)
        part = keys[rows]
        widest = int(np.argmax(part.max(axis=0) - part.min(axis=0)))
        chosen = np.sort(np.argsort(part[:, widest], kind="stable")[:first])
        left = np.zeros(len(rows), bool)
        left[chosen] = True
        return np.concatenate([split(rows[left]), split(rows[~left])])

    return split(np.asarray(order, np.int64))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 1500), st.integers(1, 6), st.sampled_from([2, 8, 64]), st.sampled_from([16, 256, 1 << 21]),
       st.integers(0, 2**32 - 1))
def test_compact_order_is_its_definition(n, dim, leaf, batch, seed):
    """The exact order, against a one-range-at-a-time reference (both the vectorised levels and the general
    path: KD_BATCH made small), with ties everywhere: the result is defined by the rows alone, not by the
    partition algorithm numpy picks for this CPU."""
    import pipeline.spatial as spatial

    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(n, dim)) * rng.choice([1.0, 10.0]), 0)  # many ties and duplicates
    order = spatial.spatial_order(x, 1.0)
    saved = spatial.KD_BATCH
    spatial.KD_BATCH = batch
    try:
        got = spatial.compact_order(x, 1.0, order, leaf)
    finally:
        spatial.KD_BATCH = saved
    assert np.array_equal(got, _reference_compact_order(x, 1.0, order, leaf))


def test_compact_order_does_not_depend_on_the_row_order():
    """The same rows in another order give the same sequence of rows (duplicates included)."""
    from pipeline.spatial import compact_order, spatial_order

    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=(5000, 3)), 1)  # many duplicates and ties
    w = rng.integers(1, 3, size=len(x)).astype(float)
    perm = rng.permutation(len(x))
    a = compact_order(x, 0.3, spatial_order(x, 0.3, w))
    b = compact_order(x[perm], 0.3, spatial_order(x[perm], 0.3, w[perm]))
    assert np.array_equal(x[a], x[perm][b]) and np.array_equal(w[a], w[perm][b])


def test_compact_order_blocks_are_smaller_than_morton_blocks():
    """On clustered data (benchmarks/pruning.py's kind, smaller) 64-row and 512-row blocks of the k-d order
    are more compact than Morton's, most of all in the tail (blocks that straddle clusters)."""
    from pipeline.spatial import compact_order, spatial_order

    rng = np.random.default_rng(5)
    centres = rng.uniform(0, 100, size=(200, 3))
    x = centres[rng.integers(0, 200, size=100_000)] + rng.normal(size=(100_000, 3))
    morton = spatial_order(x, 0.2)
    compact = compact_order(x, 0.2, morton)
    for rows in (64, 512):
        radii = {name: np.array([block_box(x[o[s]] / 0.2)[2] for s in block_slices(len(x), rows)])
                 for name, o in (("morton", morton), ("compact", compact))}
        assert np.median(radii["compact"]) < np.median(radii["morton"])
        assert np.percentile(radii["compact"], 90) < 0.8 * np.percentile(radii["morton"], 90)


def test_compact_order_takes_extreme_coordinates_quietly():
    """Coordinates near the float64 limits: a permutation, no overflow warnings (the keys are capped)."""
    import warnings

    from pipeline.spatial import compact_order

    x = np.array([[1e308, -1e308], [-1e308, 1e308], [0.0, 0.0], [1e-300, 5.0]] * 50)
    morton = np.arange(len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order = compact_order(x, 1e-3, morton, 4)
    assert np.array_equal(np.sort(order), np.arange(len(x)))


@pytest.mark.parametrize("kernel", ["rbf", "matern12", "periodic", "linear"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_block_setups_of_all_blocks_equal_one_block_at_a_time(kernel, dtype):
    """The pruned method's setups of every block at once (:func:`block_setups`) are exactly those of
    :func:`block_setup` block by block: centres (the bits of every result depend on them), radii and variants,
    with a last block of one row, duplicated rows, a block on the boundary of the spacing rule, data far from
    the origin."""
    from pipeline.block_precision import SPACING_FLOAT32, block_setup, block_setups
    from pipeline.kernels import make_spec
    from pipeline.sources import PreparedSources

    rng = np.random.default_rng(3)
    rows, ls = 64, 0.3
    x = rng.normal(size=(5 * rows + 1, 3)) * 4.0 + 1e4
    x[10:30] = x[10]  # duplicates: spacing 0
    x[rows:2 * rows] = x[rows] + np.arange(rows)[:, None] * (SPACING_FLOAT32 * ls / np.sqrt(3))  # spacing at the limit
    x[2 * rows:3 * rows] = rng.uniform(-1, 1, (rows, 3)) * ls * 3 + 1e4  # compact: float32 tiles where allowed
    spec = make_spec(kernel, 3, lengthscale=ls) if kernel != "linear" else make_spec(kernel, 3)
    prepared = PreparedSources(None, np.zeros(3), len(x), lower=x.min(0), upper=x.max(0), may_cancel=False)
    one_by_one = [block_setup(x[s:s + rows], prepared, spec, "auto", dtype) for s in range(0, len(x), rows)]
    at_once = block_setups(x, rows, prepared, spec, "auto", dtype)
    assert len(at_once) == len(one_by_one) == 6
    for a, b in zip(at_once, one_by_one):
        np.testing.assert_array_equal(a.center, b.center)
        assert a.radius == b.radius and a.variant == b.variant
    if kernel == "rbf" and dtype == "float32":
        assert len({s.variant for s in at_once}) > 1  # the cases above reach more than one variant
