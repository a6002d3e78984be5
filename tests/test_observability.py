"""Progress, the dashboard address, dask's performance report and run timings, on a real local cluster."""

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

N, D = 3000, 3


@pytest.fixture(scope="module")
def observed_run(tmp_path_factory):
    pytest.importorskip("bokeh")
    work = tmp_path_factory.mktemp("observe")
    np.save(work / "points.npy", np.random.default_rng(3).normal(size=(N, D)))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--points", "points.npy", "--out", "out.zarr",
                           "--workers", "1", "--rows-per-task", "512", "--performance-report", "report.html"],
                          cwd=work, capture_output=True, text=True, timeout=300)
    return work, proc


@pytest.mark.slow
def test_progress_and_dashboard_are_printed(observed_run):
    _, proc = observed_run
    assert proc.returncode == 0, proc.stderr
    assert "dashboard http://127.0.0.1:" in proc.stderr, "local clusters are on loopback; the link is printed"
    assert f"{-(-N // 512)}/{-(-N // 512)} tasks (100%)" in proc.stderr, proc.stderr
    assert "G pairs/s" in proc.stderr and "s left" in proc.stderr
    assert "\r" not in proc.stderr, "stderr is not a terminal: progress comes as whole lines"


@pytest.mark.slow
def test_performance_report_is_written(observed_run):
    work, proc = observed_run
    report = work / "report.html"
    assert report.exists(), proc.stderr
    text = report.read_text(errors="replace")
    assert report.stat().st_size > 10_000 and "<html" in text.lower()
    assert "kgrad" in text, "the report's task stream names kgrad's tasks"


@pytest.mark.slow
def test_timings_are_recorded_in_the_output(observed_run):
    work, _ = observed_run
    attrs = dict(zarr.open_group(str(work / "out.zarr"), mode="r").attrs)
    t = attrs["timings"]
    assert t["tasks_run"] == attrs["plan"]["n_tasks"] == -(-N // 512)
    for key in ("execute_seconds", "total_seconds", "cluster_start_seconds", "compute_seconds_total",
                "pairs_per_second"):
        assert t[key] > 0, (key, t)
    json.dumps(t)  # plain data


def test_performance_report_without_bokeh_is_a_one_line_error(tmp_path, monkeypatch):
    """With bokeh unavailable the flag is refused before anything is written (exit 2, one line)."""
    np.save(tmp_path / "points.npy", np.zeros((10, 2)))
    code = ("import sys; sys.modules['bokeh'] = None; from pipeline.cli import main; "
            "sys.exit(main(['run', '--points', 'points.npy', '--out', 'out.zarr', '--performance-report', 'r.html']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "bokeh" in proc.stderr
    assert not (tmp_path / "out.zarr").exists()
