"""An input that is neither zarr nor .npy (a CSV file, a text file, a plain directory) is refused in one
line that says which formats are accepted, never with zarr's internals (GroupNotFoundError ...)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

from pipeline import InputError, store
from pipeline.workflow import RunConfig, prepare


def _resolve(path):
    return store.resolve_input(str(path), "points")


def test_csv_file_is_refused_naming_the_formats_and_a_conversion(tmp_path):
    (tmp_path / "x.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(InputError) as info:
        _resolve(tmp_path / "x.csv")
    message = str(info.value)
    for word in ("points:", "x.csv", "not a .npy file", "zarr array", "zarr group", ".npy file",
                 "np.save('x.npy', np.loadtxt('x.csv', delimiter=','))"):
        assert word in message, message
    assert "Error" not in message and "\n" not in message


def test_other_file_and_plain_directory_are_refused(tmp_path):
    (tmp_path / "points.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("not zarr")
    with pytest.raises(InputError, match=r"points\.h5' is a file but not a \.npy file \(formats accepted: a "
                                         r"zarr array"):
        _resolve(tmp_path / "points.h5")
    with pytest.raises(InputError, match=r"plain' is a directory but not a zarr store \(it has no zarr\.json"):
        _resolve(tmp_path / "plain")


def test_accepted_formats_still_resolve(tmp_path):
    data = np.arange(12.0).reshape(4, 3)
    np.save(tmp_path / "p.npy", data)
    zarr.create_array(str(tmp_path / "array.zarr"), data=data)
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("points", data=data)
    zarr.create_array(str(tmp_path / "v2.zarr"), data=data, zarr_format=2)
    assert _resolve(tmp_path / "p.npy").array is None
    assert _resolve(tmp_path / "array.zarr").array is None
    assert _resolve(tmp_path / "group.zarr").array == "points"
    assert _resolve(tmp_path / "v2.zarr").array is None


def test_weights_role_is_named(tmp_path):
    (tmp_path / "w.csv").write_text("1\n2\n")
    np.save(tmp_path / "p.npy", np.zeros((2, 1)))
    with pytest.raises(InputError, match=r"^weights: .*w\.csv' is a file but not a \.npy file"):
        prepare(RunConfig(points=str(tmp_path / "p.npy"), weights=str(tmp_path / "w.csv"),
                          out=str(tmp_path / "out.zarr")))


def test_cli_csv_points_one_line_exit_2(tmp_path):
    (tmp_path / "x.csv").write_text("1,2\n3,4\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--points", "x.csv", "--out", "o.zarr"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "formats accepted" in lines[0] and "GroupNotFound" not in lines[0], proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_plan_without_out(tmp_path):
    """`kgrad plan --points P` (no --out) plans; it used to fail comparing the inputs with a missing out."""
    np.save(tmp_path / "p.npy", np.random.default_rng(0).normal(size=(50, 2)))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--points", "p.npy", "--workers", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "output        (none given)" in proc.stdout
