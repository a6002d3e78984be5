"""Usage errors are answered before JAX or dask is imported (importing them takes seconds): a bad kernel
name, dtype or mode, a missing or unreadable input, a missing --out, a mistyped flag.  Each case runs
``pipeline.cli.main`` in a fresh interpreter that then reports which of jax, dask and distributed were
imported: no timing, only what was loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

PROBE = """
import json, sys
from pipeline.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "imported": [m for m in ("jax", "dask", "distributed") if m in sys.modules]}))
"""


def probe(argv, cwd) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("usage")
    np.save(d / "p.npy", np.random.default_rng(0).normal(size=(50, 3)))
    (d / "p.csv").write_text("1,2,3\n4,5,6\n")
    return d


@pytest.mark.parametrize("argv, words", [
    (["run", "--points", "p.npy", "--kernel", "rbff", "--out", "y"], ("'rbff'", "rbf", "did you mean rbf?")),
    (["run", "--points", "missing.npy", "--out", "y"], ("missing.npy", "does not exist")),
    (["run", "--points", "p.csv", "--out", "y"], ("p.csv", "not a .npy file")),
    (["run", "--points", "p.npy", "--sources", "nosources.zarr", "--out", "y"], ("sources", "nosources.zarr")),
    (["run", "--points", "p.npy", "--dtype", "float16", "--out", "y"], ("float16", "float32", "float64")),
    (["run", "--points", "p.npy", "--mode", "hessian", "--out", "y"], ("hessian", "jacfwd")),
    (["run", "--points", "p.npy"], ("no output given", "--out")),
    (["run", "--points", "p.npy", "--out", "y", "--overwite"], ("--overwite", "did you mean --overwrite?")),
    (["plan", "--points", "p.npy", "--kernel", "matern"], ("'matern'", "matern12")),
    (["plan", "--points", "missing.zarr"], ("missing.zarr", "does not exist")),
], ids=["kernel", "missing-points", "csv", "missing-sources", "dtype", "mode", "no-out", "flag", "plan-kernel",
        "plan-missing"])
def test_usage_error_exits_2_in_one_line_without_importing_jax_or_dask(data, argv, words):
    result, stderr = probe(argv, data)
    assert result["code"] == 2, stderr
    assert stderr.startswith("kgrad: error: ") and stderr.count("\n") == 1, stderr
    for word in words:
        assert word in stderr, (word, stderr)
    assert result["imported"] == [], f"imported {result['imported']} before answering a usage error"


def test_the_probe_sees_jax_when_there_is_work(data):
    """The same probe on a valid plan: JAX is imported (so the test above can fail)."""
    result, stderr = probe(["plan", "--points", "p.npy"], data)
    assert result["code"] == 0, stderr
    assert "jax" in result["imported"]
