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
