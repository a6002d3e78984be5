"""Relative paths in a workflow file are relative to the file's directory (the file works from any current
directory); paths given as flags stay relative to the current directory."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from pipeline.workflow import load_workflow

WORKFLOW = """\
[inputs]
points = "data/points.npy"

[kernel]
lengthscale = 0.5

[run]
out = "results/out.zarr"
workers = 1
progress = false
"""


def kgrad(args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def project(tmp_path):
    """project/wf.toml with project/data/points.npy; the runs start from elsewhere/."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    np.save(root / "data" / "points.npy", np.random.default_rng(5).normal(size=(120, 2)))
    (root / "wf.toml").write_text(WORKFLOW)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return root, elsewhere


def test_load_workflow_resolves_against_the_file(tmp_path):
    wf = tmp_path / "sub" / "wf.toml"
    wf.parent.mkdir()
    wf.write_text("""\
[inputs]
points = "p.zarr"
sources = "../s.npy"
weights = "s3://bucket/w.zarr"
[run]
out = "out/o.zarr"
performance_report = "report.html"
cache_dir = "~/.cache/kgrad/jax"
scheduler = "cluster/scheduler.json"
security = {tls_ca_file = "certs/ca.pem", tls_client_cert = "/abs/client.pem", tls_client_key = "certs/client.key"}
""")
    config = load_workflow(str(wf))
    base = str(wf.parent)
    assert config.points == os.path.join(base, "p.zarr")
    assert config.sources == os.path.join(base, "../s.npy")
    assert config.weights == "s3://bucket/w.zarr", "URLs are left alone"
    assert config.out == os.path.join(base, "out/o.zarr")
    assert config.performance_report == os.path.join(base, "report.html")
    assert config.cache_dir == "~/.cache/kgrad/jax", "~ is the user's home, not relative"
    assert config.scheduler == os.path.join(base, "cluster/scheduler.json")
    assert config.security == {"tls_ca_file": os.path.join(base, "certs/ca.pem"),
                               "tls_client_cert": "/abs/client.pem",
                               "tls_client_key": os.path.join(base, "certs/client.key")}


@pytest.mark.parametrize("scheduler", ["local", "tcp://10.0.0.1:8786", "tls://host:8786", "127.0.0.1:8786"])
def test_scheduler_addresses_are_not_paths(tmp_path, scheduler):
    wf = tmp_path / "wf.toml"
    wf.write_text(f'[inputs]\npoints = "p.npy"\n[run]\nscheduler = "{scheduler}"\n')
    assert load_workflow(str(wf)).scheduler == scheduler


@pytest.mark.slow
def test_run_from_another_directory(project):
    root, elsewhere = project
    proc = kgrad(["run", root / "wf.toml"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    out = root / "results" / "out.zarr"
    assert f"wrote {out}" in proc.stderr
    attrs = zarr.open_group(str(out), mode="r").attrs
    assert attrs["complete"] is True
    assert attrs["inputs"]["points"]["location"] == str(root / "data" / "points.npy")
    assert list(elsewhere.iterdir()) == [], "nothing is written in the current directory"


def test_flags_stay_relative_to_the_current_directory(project, monkeypatch, capsys):
    """`kgrad plan` in process (pipeline.cli.main, the console script's code; test_run_from_another_directory
    runs the command itself), from another current directory."""
    from pipeline.cli import main

    root, elsewhere = project
    np.save(elsewhere / "mine.npy", np.zeros((10, 2)))
    monkeypatch.chdir(elsewhere)
    assert main(["plan", str(root / "wf.toml"), "--out", "mine.zarr"]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert f"{elsewhere / 'mine.zarr'}: create" in stdout
    assert "N=120 points" in stdout, "points from the file, relative to the file"
    assert main(["plan", str(root / "wf.toml"), "--points", "mine.npy"]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "N=10 points" in stdout
    assert f"{root / 'results' / 'out.zarr'}: create" in stdout
