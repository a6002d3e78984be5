"""The README's code, run as written: the snippets a user may copy are extracted from README.md (so a test
fails when the README drifts) and checked against the float64 numpy oracle (tests/reference.py) and, for the
SVGD line, against SVGD's own definition computed pair by pair."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from reference import FLOAT32_BOUND, reference_gradients, relative_error

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def code_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of ``language`` (```python ... ```), in order."""
    text = README.read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def block_with(language: str, marker: str) -> str:
    """The one README block of ``language`` that contains ``marker``."""
    found = [block for block in code_blocks(language) if marker in block]
    assert len(found) == 1, f"expected one ```{language} block with {marker!r} in README.md, found {len(found)}"
    return found[0]


def svgd_repulsive_by_definition(x: np.ndarray, rows: np.ndarray, **kernel) -> np.ndarray:
    """SVGD's repulsive term (1/n) sum_j grad_{x_j} k(x_j, x_i) at particles ``x[rows]``, from its definition:
    the gradient in the FIRST argument, evaluated at every x_j with x_i as the second argument, summed over j
    (no symmetry of k is used)."""
    n = len(x)
    return np.stack([reference_gradients(x, x[i:i + 1], **kernel)[0].sum(axis=0) / n for i in rows])


def test_in_process_snippet_runs_and_matches_the_oracle():
    """The README's in-process block, executed as written: g and v match the oracle, g is float32 as its
    comment says, and phi_repulsive is SVGD's repulsive term (a sign error fails this by a factor of 2)."""
    pytest.importorskip("jax")
    code = block_with("python", "from pipeline import kernel_gradients")
    scope: dict = {}
    exec(compile(code, "README.md (in-process block)", "exec"), scope)
    x, g, v = scope["x"], scope["g"], scope["v"]
    kernel = dict(kernel="matern52", lengthscale=[0.5, 1.0, 2.0])
    assert "kernel=\"matern52\", lengthscale=[0.5, 1.0, 2.0]" in code, "the test's kernel must be the README's"
    rows = np.arange(0, len(x), len(x) // 40)
    g_ref, v_ref = reference_gradients(x[rows], x, **kernel)
    assert g.dtype == np.float32 and "float32" in code
    assert relative_error(g[rows], g_ref) < FLOAT32_BOUND
    assert relative_error(v[rows], v_ref) < FLOAT32_BOUND
    assert relative_error(scope["g64"][rows], g_ref) < 1e-10
    phi = svgd_repulsive_by_definition(x, rows, **kernel)
    assert relative_error(scope["phi_repulsive"][rows], phi) < FLOAT32_BOUND, "README's SVGD line has the wrong sign?"


def test_xarray_snippet_reads_a_run_as_the_readme_says(tmp_path, monkeypatch):
    """The README's xarray block, executed as written against a small ``kgrad run`` output at the path it
    names (out/demo.zarr, from the current directory): gradient, value and the score g / v match the oracle."""
    pytest.importorskip("xarray")
    import subprocess
    import sys

    rng = np.random.default_rng(3)
    points = rng.normal(size=(600, 3))
    weights = np.full(len(points), 1.0 / len(points))
    np.save(tmp_path / "p.npy", points)
    np.save(tmp_path / "w.npy", weights)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--points", "p.npy", "--weights", "w.npy",
                           "--lengthscale", "0.5", "--out", "out/demo.zarr", "--workers", "1", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.chdir(tmp_path)
    code = block_with("python", "xr.open_zarr")
    scope: dict = {}
    exec(compile(code, "README.md (xarray block)", "exec"), scope)
    ds, score = scope["ds"], scope["score"]
    g_ref, v_ref = reference_gradients(points, weights=weights, kernel="rbf", lengthscale=0.5)
    assert ds.gradient.dims == ("point", "dim") and ds.value.dims == ("point",)
    assert relative_error(ds.gradient.values, g_ref) < FLOAT32_BOUND
    assert relative_error(ds.value.values, v_ref) < FLOAT32_BOUND
    assert relative_error(score.values, g_ref / v_ref[:, None]) < 1e-4  # a ratio: both errors add
    assert (ds.attrs["kernel"], ds.attrs["lengthscale"], ds.attrs["complete"]) == ("rbf", [0.5, 0.5, 0.5], True)
