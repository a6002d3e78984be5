"""``kgrad`` end to end on a real local dask cluster: run (from a workflow file and from flags), plan,
inspect, --overwrite and --resume.

Every ``kgrad run`` starts a cluster (a few seconds), so the module makes five outputs, once each, in
module-scoped fixtures, and every other test reads them.  Outputs are checked against
``pipeline.kernel_gradients`` on the same inputs and dtype (float64: 1e-12).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

import pipeline
from pipeline import store
from fileutil import tree_digest

pytest_plugins = ["cluster_fixtures"]  # dask_cli_cluster: the runs that need no cluster of their own use it

xr = pytest.importorskip("xarray")

N, M, D = 1000, 700, 3
_rng = np.random.default_rng(7)
POINTS = _rng.normal(scale=0.8, size=(N, D))
SOURCES = _rng.normal(scale=0.8, size=(M, D)) + 0.3
POINT_WEIGHTS = _rng.uniform(0.2, 2.0, size=N)  # the group's weights (its points are the sources)
SOURCE_WEIGHTS = _rng.normal(size=M)  # signed, as for a GP mean
POINTS_1D = _rng.uniform(-2.0, 2.0, size=N)

TIMEOUT = 600  # the machine is shared; a run normally takes a few seconds


def kgrad(args, cwd, check=True):
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, f"kgrad {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return proc


def assert_close(actual, expected, dtype):
    """Tight agreement: both sides run the same tile code, so only float32 rounding is allowed for."""
    tol = 1e-12 if dtype == "float64" else 1e-6
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def fingerprint(location, role="points"):
    ref = store.resolve_input(str(location), role)
    return store.load_input(ref, role)[1]


def read_output(path):
    """The output as xarray reads it (the contract), plus its attributes as zarr has them."""
    ds = xr.open_zarr(str(path))
    return ds, dict(zarr.open_group(str(path), mode="r").attrs)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Inputs in every supported form; runs use this as their current directory (relative paths)."""
    root = tmp_path_factory.mktemp("cli")
    np.save(root / "points.npy", POINTS)
    np.save(root / "points_1d.npy", POINTS_1D)
    np.save(root / "source_weights.npy", SOURCE_WEIGHTS)
    zarr.create_array(str(root / "points_7x3.zarr"), data=POINTS, chunks=(7, 3))
    zarr.create_array(str(root / "points_Nx1.zarr"), data=POINTS, chunks=(N, 1))
    zarr.create_array(str(root / "sources_Mx1.zarr"), data=SOURCES, chunks=(M, 1))
    group = zarr.open_group(str(root / "group.zarr"), mode="w")
    group.create_array("points", data=POINTS, chunks=(128, 3))
    group.create_array("weights", data=POINT_WEIGHTS, chunks=(300,))
    return root


WORKFLOW = """\
[inputs]
points = "group.zarr"

[kernel]
name = "matern52"
lengthscale = [0.5, 1.0, 2.0]
variance = 1.0

[run]
out = "from_workflow.zarr"
dtype = "float32"
workers = 2
"""


@pytest.fixture(scope="module")
def workflow_run(workdir):
    """A workflow file (group input with weights, 2 workers) with some of its settings overridden."""
    (workdir / "wf.toml").write_text(WORKFLOW)
    proc = kgrad(["run", "wf.toml", "--dtype", "float64", "--lengthscale", "0.8", "0.9", "1.1",
                  "--variance", "1.7", "--out", "workflow.zarr", "--rows-per-task", "256", "--no-progress"],
                 cwd=workdir)
    return workdir / "workflow.zarr", proc


SPLIT_ARGS = ["run", "--points", "points_7x3.zarr", "--sources", "sources_Mx1.zarr", "--weights",
              "source_weights.npy", "--kernel", "rational_quadratic", "--param", "alpha=2", "--lengthscale", "0.7",
              "--dtype", "float64", "--out", "split.zarr", "--no-progress"]


def on(cluster) -> list[str]:
    """The flag of a run on the session's dask CLI cluster."""
    return ["--scheduler", str(cluster.scheduler_file)]


@pytest.fixture(scope="module")
def split_run(workdir, dask_cli_cluster):
    """Points chunked (7, 3), separate sources chunked (M, 1), weights from a .npy file."""
    proc = kgrad([*SPLIT_ARGS, *on(dask_cli_cluster)], cwd=workdir)
    return workdir / "split.zarr", proc


@pytest.fixture(scope="module")
def one_d_run(workdir, dask_cli_cluster):
    """A 1-D .npy input: N points in D = 1."""
    kgrad(["run", "--points", "points_1d.npy", "--lengthscale", "0.3", "--dtype", "float64",
           "--out", "one_d.zarr", *on(dask_cli_cluster), "--no-progress"], cwd=workdir)
    return workdir / "one_d.zarr"


@pytest.fixture(scope="module")
def float32_run(workdir, dask_cli_cluster):
    """Points chunked (N, 1), float32, the default kernel settings otherwise."""
    kgrad(["run", "--points", "points_Nx1.zarr", "--kernel", "matern32", "--out", "float32.zarr",
           *on(dask_cli_cluster), "--no-progress"], cwd=workdir)
    return workdir / "float32.zarr"


# ----------------------------------------------------------------------------------------- run


def test_workflow_file_with_flag_overrides(workflow_run, workdir):
    out, proc = workflow_run
    assert not (workdir / "from_workflow.zarr").exists(), "--out must override [run] out"
    ds, attrs = read_output(out)
    # from the flags
    assert attrs["dtype"] == "float64" and ds["gradient"].dtype == np.float64
    assert attrs["lengthscale"] == [0.8, 0.9, 1.1]
    assert attrs["variance"] == 1.7
    # from the file
    assert attrs["kernel"] == "matern52"
    assert attrs["plan"]["workers"] == 2
    group = str(workdir / "group.zarr")  # relative paths are recorded absolute (workers may run elsewhere)
    assert attrs["inputs"]["weights"]["location"] == group, "the group's weights are used"
    assert attrs["inputs"]["weights"]["array"] == "weights"
    assert attrs["inputs"]["points"]["location"] == group
    assert attrs["inputs"]["points"]["array"] == "points"
    assert attrs["inputs"]["sources"] is None
    g, v = pipeline.kernel_gradients(POINTS, weights=POINT_WEIGHTS, kernel="matern52", lengthscale=[0.8, 0.9, 1.1],
                                     variance=1.7, dtype="float64", return_value=True)
    assert_close(ds["gradient"].values, g, "float64")
    assert_close(ds["value"].values, v, "float64")


def test_output_layout_and_attributes(workflow_run, workdir):
    out, _ = workflow_run
    ds, attrs = read_output(out)
    assert ds["gradient"].dims == ("point", "dim") and ds["gradient"].shape == (N, D)
    assert ds["value"].dims == ("point",) and ds["value"].shape == (N,)
    assert attrs["complete"] is True and ds.attrs["complete"] is True
    assert (attrs["N"], attrs["M"], attrs["D"]) == (N, N, D)
    assert attrs["mode"] == "auto" and attrs["formulation"] == "radial"
    assert attrs["kgrad_version"] == pipeline.__version__
    assert attrs["run_fingerprint"]
    assert attrs["timings"]["tasks_run"] == attrs["plan"]["n_tasks"] >= 2
    done = zarr.open_group(str(out), mode="r")["task_done"][:]
    assert done.shape == (attrs["plan"]["n_tasks"],) and done.all()
    # fingerprints identify the data, whatever the container and chunking
    fp = attrs["inputs"]["points"]["fingerprint"]
    assert fp == fingerprint(workdir / "group.zarr") == fingerprint(workdir / "points.npy")
    assert attrs["inputs"]["weights"]["fingerprint"] == fingerprint(workdir / "group.zarr", "weights")


def test_split_inputs_chunked_along_either_axis(split_run, workdir):
    out, _ = split_run
    ds, attrs = read_output(out)
    assert (attrs["N"], attrs["M"], attrs["D"]) == (N, M, D)
    assert attrs["kernel"] == "rational_quadratic" and attrs["kernel_params"] == {"alpha": 2}
    assert attrs["complete"] is True
    for role, path in (("points", "points_7x3.zarr"), ("sources", "sources_Mx1.zarr"),
                       ("weights", "source_weights.npy")):
        assert attrs["inputs"][role]["location"] == str(workdir / path)
        assert attrs["inputs"][role]["fingerprint"] == fingerprint(workdir / path, role)
    g, v = pipeline.kernel_gradients(POINTS, SOURCES, SOURCE_WEIGHTS, kernel="rational_quadratic", alpha=2,
                                     lengthscale=0.7, dtype="float64", return_value=True)
    assert_close(ds["gradient"].values, g, "float64")
    assert_close(ds["value"].values, v, "float64")


def test_one_dimensional_input(one_d_run):
    ds, attrs = read_output(one_d_run)
    assert attrs["D"] == 1 and ds["gradient"].dims == ("point", "dim") and ds["gradient"].shape == (N, 1)
    g, v = pipeline.kernel_gradients(POINTS_1D, lengthscale=0.3, dtype="float64", return_value=True)
    assert g.shape == (N,)
    assert_close(ds["gradient"].values[:, 0], g, "float64")
    assert_close(ds["value"].values, v, "float64")


def test_float32_input_chunked_by_column(float32_run):
    ds, attrs = read_output(float32_run)
    assert attrs["dtype"] == "float32" and ds["gradient"].dtype == np.float32
    g, v = pipeline.kernel_gradients(POINTS, kernel="matern32", dtype="float32", return_value=True)
    assert_close(ds["gradient"].values, g, "float32")
    assert_close(ds["value"].values, v, "float32")


# ----------------------------------------------------------------------------------------- overwrite, resume


def test_overwrite_replaces(float32_run, tmp_path, dask_cli_cluster):
    out = tmp_path / "replaced.zarr"
    shutil.copytree(float32_run, out)
    stale = out / "gradient" / "c" / "99" / "0"  # a chunk only an earlier, larger run had: kgrad's own
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left over from the old output")
    before = tree_digest(out)
    proc = kgrad(["run", "--points", str(float32_run.parent / "points.npy"), "--kernel", "rbf", "--lengthscale",
                  "0.6", "--dtype", "float64", "--out", str(out), "--overwrite", *on(dask_cli_cluster),
                  "--no-progress"], cwd=tmp_path)
    assert tree_digest(out) != before
    assert not stale.exists(), "--overwrite starts over"
    ds, attrs = read_output(out)
    assert attrs["kernel"] == "rbf" and attrs["dtype"] == "float64" and attrs["complete"] is True
    assert attrs["timings"]["resumed"] is False
    g, v = pipeline.kernel_gradients(POINTS, lengthscale=0.6, dtype="float64", return_value=True)
    assert_close(ds["gradient"].values, g, "float64")
    assert_close(ds["value"].values, v, "float64")
    assert "wrote" in proc.stderr


def test_resume_on_complete_output_does_nothing(split_run, workdir):
    out, _ = split_run
    before = tree_digest(out)
    proc = kgrad([*SPLIT_ARGS, "--workers", "1", "--resume"], cwd=workdir)
    assert "already complete" in proc.stderr
    assert "wrote" not in proc.stderr and "workers" not in proc.stderr, "no cluster, no tasks"
    assert tree_digest(out) == before


# ----------------------------------------------------------------------------------------- plan, inspect


def test_plan_prints_and_writes_nothing(workdir, tmp_path):
    before = tree_digest(workdir)
    proc = kgrad(["plan", "--points", str(workdir / "points_7x3.zarr"), "--sources", str(workdir / "sources_Mx1.zarr"),
                  "--out", str(tmp_path / "planned.zarr"), "--workers", "2", "--memory-limit", "2GiB"],
                 cwd=tmp_path)
    assert proc.stderr == ""
    out = proc.stdout
    for word in ("tile", "tasks", "memory", "MiB", "worker limit 2.00 GiB", f"N={N}", f"M={M}", f"D={D}",
                 "planned.zarr: create"):
        assert word in out, f"{word!r} not in:\n{out}"
    assert not (tmp_path / "planned.zarr").exists()
    assert tree_digest(tmp_path) == {}
    assert tree_digest(workdir) == before


def test_inspect_text(workflow_run):
    out, _ = workflow_run
    proc = kgrad(["inspect", str(out)], cwd=out.parent)
    text = proc.stdout
    for word in ("complete", "matern52", f"N={N}", f"M={N}", f"D={D}", "gradient", "value",
                 "('point', 'dim')", "group.zarr[points]", "group.zarr[weights]", "float64"):
        assert word in text, f"{word!r} not in:\n{text}"
    assert "INCOMPLETE" not in text


def test_inspect_json(workflow_run):
    out, _ = workflow_run
    info = json.loads(kgrad(["inspect", str(out), "--json"], cwd=out.parent).stdout)
    assert info["complete"] is True
    assert info["tasks_done"] == info["tasks_total"] >= 2
    assert (info["N"], info["M"], info["D"]) == (N, N, D)
    assert info["dtype"] == "float64" and info["formulation"] == "radial"
    assert info["arrays"]["gradient"]["shape"] == [N, D]
    assert info["arrays"]["gradient"]["dimension_names"] == ["point", "dim"]
    assert info["arrays"]["value"]["dimension_names"] == ["point"]
    ds, _ = read_output(out)
    norms = np.linalg.norm(ds["gradient"].values, axis=1)
    assert info["gradient_norm"]["nan"] == 0
    assert info["gradient_norm"]["max"] == pytest.approx(norms.max(), rel=1e-12)
    assert info["gradient_norm"]["min"] == pytest.approx(norms.min(), rel=1e-12)
