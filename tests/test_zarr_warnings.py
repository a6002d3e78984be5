"""An output kgrad writes opens without warnings in xarray and zarr, during a run (its lease file beside the
arrays, results half written) and after it: the group's metadata are consolidated from its first write on,
so readers never list the directory (zarr warns about any file there that is not part of the hierarchy)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import lease
from pipeline.output import OutputGroup


def _open_both(path) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = xr.open_zarr(str(path))
        assert ds["gradient"].dims == ("point", "dim") and ds["value"].dims == ("point",)
        ds.load()
        group = zarr.open_group(str(path), mode="r")
        assert set(group.array_keys()) == {"gradient", "value", "task_done"}
        dict(group.attrs)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.slow
def test_an_output_opens_without_warnings_during_and_after_a_run(tmp_path):
    path = tmp_path / "out.zarr"
    held = lease.acquire(str(path))  # the run's lease file sits inside the output
    try:
        output = OutputGroup(str(path))
        output.create(n_points=8, dim=2, dtype="float32", rows_per_task=4, n_tasks=2,
                      attributes={"run_fingerprint": "x"})
        assert _open_both(path) == []  # created, nothing written yet
        output.write_task(0, 4, 0, np.ones((4, 2), np.float32), np.ones(4, np.float32), output.output_id())
        assert (path / ".kgrad-lease.json").exists()
        assert _open_both(path) == []  # half written
        output.write_task(4, 8, 1, np.ones((4, 2), np.float32), np.ones(4, np.float32), output.output_id())
        output.finish({"timings": {}}, output.output_id())
        assert _open_both(path) == []  # complete, lease still there
    finally:
        held.release()
    assert _open_both(path) == []  # complete, lease gone
    assert zarr.open_group(str(path), mode="r").attrs["complete"] is True
