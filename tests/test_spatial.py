"""pipeline.spatial (Morton order, block boxes) and the per-block variant choice of pipeline.block_precision."""

from __future__ import annotations

import numpy as np
import pytest

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
