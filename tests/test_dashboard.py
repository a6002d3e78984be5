"""The dashboard link is printed only when it serves the dashboard: not for a scheduler without bokeh
(its page says bokeh is needed), not for one started with --no-dashboard (404)."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.register_assert_rewrite("cluster_fixtures")
from cluster_fixtures import REPO, kgrad, kgrad_env  # noqa: E402

from pipeline.dashboard import serves_dashboard  # noqa: E402

pytest_plugins = ["cluster_fixtures"]

LINK = re.compile(r"dashboard (http://\S+)")


class _Pages(http.server.BaseHTTPRequestHandler):
    PAGES = {
        "/status": (200, b"<html><title>Dask: Status</title><div class='bk-root'></div></html>"),
        "/needs-bokeh": (200, b"<p>Dask needs bokeh>=3.1.0 for the dashboard.</p><p>Install with pip: "
                              b"<code>pip install \"bokeh>=3.1.0\"</code></p>"),
    }

    def do_GET(self):  # noqa: N802
        status, body = self.PAGES.get(self.path, (404, b"404: Not Found"))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def pages():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_serves_dashboard_only_for_a_real_page(pages):
    assert serves_dashboard(f"{pages}/status")
    assert not serves_dashboard(f"{pages}/needs-bokeh"), "distributed's page when bokeh is missing"
    assert not serves_dashboard(f"{pages}/nothing"), "404: a scheduler started with --no-dashboard"
    assert not serves_dashboard("http://127.0.0.1:1/status", timeout=2), "nothing listening"
    assert not serves_dashboard("not a url")


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    path = tmp_path_factory.mktemp("dashboard") / "points.npy"
    np.save(path, np.random.default_rng(3).normal(size=(200, 2)))
    return path


def _first_line(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()[0]


@pytest.mark.slow
def test_local_run_with_bokeh_prints_a_working_link(small_points, small_outputs):
    """`kgrad run --points P --workers 1 --no-progress`: the session's shared small run (cluster_fixtures)."""
    pytest.importorskip("bokeh")
    _, proc = small_outputs.run(small_points)
    line = _first_line(proc)
    assert LINK.search(line), line


@pytest.mark.slow
def test_local_run_without_bokeh_prints_no_link(points, tmp_path):
    """The scheduler (in the kgrad process) cannot import bokeh: distributed serves a 'needs bokeh' page."""
    code = "import sys; sys.modules['bokeh'] = None; from pipeline.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "run", "--points", str(points), "--out",
                           str(tmp_path / "out.zarr"), "--workers", "1", "--no-progress"],
                          cwd=REPO, env=kgrad_env(), capture_output=True, text=True, timeout=300)
    line = _first_line(proc)
    assert "1 task " in line and "dashboard" not in line, line


@pytest.mark.slow
def test_cluster_without_dashboard_prints_no_link(points, tmp_path, dask_cli_cluster):
    """cluster/start-local-cluster.sh starts its scheduler with --no-dashboard."""
    line = _first_line(kgrad(["run", "--points", points, "--out", tmp_path / "out.zarr", "--scheduler",
                              dask_cli_cluster.scheduler_file, "--no-progress"]))
    assert "2 workers" in line and "dashboard" not in line, line
