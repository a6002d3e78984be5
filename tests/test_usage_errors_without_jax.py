"""What a process imports, not how long it takes (no timing here).

* Usage errors are answered before JAX or dask is imported (importing them takes seconds): a bad kernel
  name, dtype or mode, a missing or unreadable input, a missing --out, a mistyped flag.
* The client of a run never imports JAX: it plans, writes the output and hands tasks to the workers
  (JAX is imported where it is used, :mod:`pipeline.lazy_jax`); a ``--tolerance`` run's plan reads the
  kernel's tail table from the user's cache once it has been made.
* A task sets JAX's options before JAX is imported, so a far-field worker, which runs no JAX, never imports it.

Each case runs ``pipeline.cli.main`` (or the task's set-up) in a fresh interpreter that then reports which of
jax, dask and distributed were imported."""

from __future__ import annotations

import json
import os
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


def test_the_probe_sees_what_a_plan_imports(data):
    """The same probe on a valid plan: dask and distributed are imported (so the test above can fail)."""
    result, stderr = probe(["plan", "--points", "p.npy"], data)
    assert result["code"] == 0, stderr
    assert {"dask", "distributed"} <= set(result["imported"]), result


def test_the_client_of_a_run_never_imports_jax(data, tmp_path, monkeypatch):
    """A dense run, then a far-field run twice: the first makes the kernel's tail table (JAX, in the client:
    the probe sees it), the second reads it from the cache and imports no JAX; both runs' results agree."""
    monkeypatch.setenv("KGRAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KGRAD_NO_CACHE", raising=False)
    np.save(data / "field.npy", np.random.default_rng(1).uniform(0.0, 100.0, (20000, 2)).astype(np.float32))
    common = ["run", "--points", "field.npy", "--lengthscale", "5", "--workers", "1", "--no-progress"]
    result, stderr = probe(["run", "--points", "p.npy", "--workers", "1", "--no-progress", "--out",
                            str(tmp_path / "dense.zarr")], data)
    assert result["code"] == 0 and "jax" not in result["imported"], (result, stderr)
    far = [*common, "--tolerance", "1e-6", "--overwrite"]
    first, stderr = probe([*far, "--out", str(tmp_path / "first.zarr")], data)
    assert first["code"] == 0 and "jax" in first["imported"], (first, stderr)
    again, stderr = probe([*far, "--out", str(tmp_path / "again.zarr")], data)
    assert again["code"] == 0 and "jax" not in again["imported"], (again, stderr)
    import zarr

    a, b = (zarr.open_group(str(tmp_path / name), mode="r") for name in ("first.zarr", "again.zarr"))
    assert a.attrs["method"] == "far_field" == b.attrs["method"]
    np.testing.assert_array_equal(a["gradient"][:], b["gradient"][:])


TASK_PROBE = """
import json, sys
from pipeline.cache import enable_compilation_cache
from pipeline.precision import enable_x64
path = enable_compilation_cache(sys.argv[1])
enable_x64()  # what every task does first (pipeline.task.start_task)
before = "jax" in sys.modules
import jax
print(json.dumps({"before": before, "x64": jax.config.read("jax_enable_x64"), "path": path,
                  "cache": jax.config.jax_compilation_cache_dir,
                  "minimums": [jax.config.jax_persistent_cache_min_compile_time_secs,
                               jax.config.jax_persistent_cache_min_entry_size_bytes]}))
"""


def test_a_task_sets_jax_options_before_jax_is_imported(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "KGRAD_NO_CACHE"}
    proc = subprocess.run([sys.executable, "-c", TASK_PROBE, str(tmp_path / "cache")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["before"] is False and result["x64"] is True, result
    assert result["cache"] == result["path"] == str(tmp_path / "cache"), result
    assert result["minimums"] == [0.0, 0], result


BACKGROUND_PROBE = """
import json, os, sys
from pipeline import lazy_jax
lazy_jax.import_in_background()
if sys.argv[1] == "option":
    lazy_jax.set_option("jax_enable_x64", True)  # while the import may still be under way
    import jax
    print(json.dumps({"x64": jax.config.read("jax_enable_x64"), "env": os.environ.get("JAX_ENABLE_X64")}))
else:  # a submodule through a stand-in, at once: Python would not wait for the package being imported
    print(json.dumps({"sum": float(lazy_jax.jnp.ones(2).sum())}))
"""


@pytest.mark.parametrize("use,expected", [("option", {"x64": True, "env": None}), ("submodule", {"sum": 2.0})])
def test_jax_used_during_a_background_import_waits_for_it(use, expected):
    """:func:`pipeline.lazy_jax.set_option` and the stand-ins wait for a background import of JAX (a module
    being imported is in ``sys.modules`` before its attributes are, and importing ``jax.numpy`` meanwhile
    fails), then use JAX itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    proc = subprocess.run([sys.executable, "-c", BACKGROUND_PROBE, use], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
