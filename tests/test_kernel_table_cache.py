"""The kernel tail tables kept in the user's cache (pipeline.pruning.profile_table): a table decides a
``--tolerance`` run's pruning and the error bound it reports, so a table is read only from a private folder,
only from a file of ours that nobody else can write, and only if its SHA-256 matches; anything else is
computed again (and the result is the true table, not the file's)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipeline.cache import load_checked, store_checked
from pipeline.kernels import make_spec
from pipeline.pruning import TABLE_MAX, TABLE_MIN, profile_table, table_location

RADII = np.concatenate([[0.0], np.geomspace(TABLE_MIN, TABLE_MAX, 999)])  # a short table: same code path


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.setenv("KGRAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KGRAD_NO_CACHE", raising=False)
    return make_spec("matern32", 3, lengthscale=0.5, variance=2.0)


def _true(spec):
    f, df = profile_table(spec, RADII)  # no table kept yet: computed
    r = RADII * np.sqrt(3.0)
    np.testing.assert_allclose(f, 2.0 * (1 + r) * np.exp(-r), rtol=1e-12, atol=1e-300)
    return f, df


def _forge(spec, scale=1e-3):
    """A table of ours with every value scaled down: read, it would shrink the run's bound."""
    folder, name = table_location(spec, RADII)
    f, df = _true(spec)
    store_checked(folder, name, np.stack([f * scale, df * scale]).tobytes())
    return folder, name, f


def test_a_kept_table_is_read_back(spec):
    folder, name, f = _forge(spec)
    read, _ = profile_table(spec, RADII)
    np.testing.assert_array_equal(read, f * 1e-3)  # what a private folder holds is used: the key is exact
    assert load_checked(folder, name) is not None


@pytest.mark.parametrize("attack", ["folder_writable_by_others", "file_writable_by_group", "bytes_changed",
                                    "truncated", "empty", "symlink"])
def test_a_table_anyone_else_could_have_written_is_computed_again(spec, attack, tmp_path):
    folder, name, f = _forge(spec)
    path = os.path.join(folder, name)
    if attack == "folder_writable_by_others":
        os.chmod(folder, 0o777)
    elif attack == "file_writable_by_group":
        os.chmod(path, 0o664)
    elif attack == "bytes_changed":
        raw = bytearray(open(path, "rb").read())
        raw[100] ^= 0x40
        open(path, "wb").write(bytes(raw))
    elif attack == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    elif attack == "empty":
        os.truncate(path, 0)
    else:  # a link to a file elsewhere (a copy of the forged table, checksum and all)
        elsewhere = tmp_path / "elsewhere.f64"
        elsewhere.write_bytes(open(path, "rb").read())
        os.unlink(path)
        os.symlink(elsewhere, path)
    assert load_checked(folder, name) is None
    read, _ = profile_table(spec, RADII)
    np.testing.assert_array_equal(read, f)


def test_nothing_is_kept_without_a_cache(spec, monkeypatch):
    monkeypatch.setenv("KGRAD_NO_CACHE", "1")
    assert table_location(spec, RADII) is None
    _true(spec)


def test_the_key_changes_with_the_kernel_and_its_parameters(spec):
    names = {table_location(s, RADII)[1] for s in (
        spec, make_spec("matern32", 3, lengthscale=0.5, variance=3.0), make_spec("matern52", 3, variance=2.0),
        make_spec("rational_quadratic", 3, variance=2.0, alpha=1.0),
        make_spec("rational_quadratic", 3, variance=2.0, alpha=2.0))}
    assert len(names) == 5
    assert table_location(make_spec("matern32", 2, lengthscale=7.0, variance=2.0), RADII)[1] in names
    assert table_location(spec, RADII[:-1])[1] not in names
