"""Finite inputs whose results are not finite (the polynomial kernel's (q.x + c)^d beyond float32's 3.4e38)
fail with a clear message naming the cause and float64, never written as inf without a word: in process
(:class:`pipeline.NonFiniteResultError`) and from ``kgrad run`` (exit 1, one line, output incomplete, the
task that found it not marked done)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

pytest.register_assert_rewrite("cluster_fixtures")
from cluster_fixtures import kgrad  # noqa: E402

from pipeline import NonFiniteResultError, kernel_gradients  # noqa: E402

# q.x = 3e4 for the large points: (3e4 + 1)^9 ~ 2e40 overflows float32, not float64
LARGE = np.full((50, 3), 100.0)
DEGREE = 9


def test_api_raises_on_float32_overflow():
    with pytest.raises(NonFiniteResultError, match=r"polynomial.*inf.*overflow float32.*dtype=\"float64\""):
        kernel_gradients(LARGE, kernel="polynomial", degree=DEGREE)


def test_api_float64_is_finite_and_right():
    g, v = kernel_gradients(LARGE, kernel="polynomial", degree=DEGREE, dtype="float64", return_value=True)
    k = (LARGE @ LARGE.T + 1.0) ** DEGREE
    np.testing.assert_allclose(v, k.sum(axis=1), rtol=1e-10)
    assert v.max() > np.finfo(np.float32).max and np.isfinite(g).all()


def test_api_finite_results_pass():
    g = kernel_gradients(LARGE / 100, kernel="polynomial", degree=DEGREE)
    assert np.isfinite(g).all()


@pytest.mark.slow
def test_cli_overflow_fails_with_one_line_and_leaves_the_output_incomplete(tmp_path):
    # task 0: queries at the origin, (0.x + 1)^9 = 1 is finite; task 1: large queries overflow
    points = np.concatenate([np.zeros((100, 3)), np.full((100, 3), 100.0)])
    np.save(tmp_path / "points.npy", points)
    np.save(tmp_path / "sources.npy", LARGE)
    out = tmp_path / "out.zarr"
    result = kgrad(["run", "--points", "points.npy", "--sources", "sources.npy", "--kernel", "polynomial",
                    "--param", f"degree={DEGREE}", "--out", "out.zarr", "--rows-per-task", "100",
                    "--workers", "1", "--no-progress"], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("kgrad: 2 tasks")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("kgrad: failed: polynomial")
    for word in ("overflow float32", "--dtype float64", "inf", "rows 100:200", str(out), "--overwrite"):
        assert word in errors[0], errors[0]
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["complete"] is False
    done = np.asarray(group["task_done"][:])
    assert done[1] == 0, "the task with non-finite results must not mark itself done"
    assert not np.isinf(np.asarray(group["value"][100:200])).any(), "nothing non-finite is written"
