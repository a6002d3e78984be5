"""Zarr (and .npy) in and out: reading inputs, the output group's layout, resume state, provenance.

Inputs: a zarr array, a zarr group holding an array ``points`` (and optionally ``weights``), or a ``.npy``
file; local paths or fsspec URLs (``s3://...``).  Any chunking.

Output: a zarr v3 group that ``xarray.open_zarr`` reads:

* ``gradient`` (N, D), dimensions ("point", "dim"), one chunk of ``rows_per_task`` rows per task;
* ``value`` (N,), dimension ("point",);
* ``task_done`` (n_tasks,), dimension ("task",), uint8: 1 once a task's chunks are written (resume state:
  a chunk that merely exists proves nothing, since zarr skips writing chunks equal to the fill value);
* attributes: kernel and parameters, dtype, mode, N, M, D, input locations and fingerprints, version,
  plan, timings, and ``complete`` (set last, after every task has written its chunks).

Each task writes whole chunks that no other task touches, so concurrent writers never overlap.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import zarr

from .errors import InputError, RunEnded, user_fixable
from .inputs import check_finite
from .plan import READ_BLOCK_ROWS

FORMAT_VERSION = 1
READ_ROWS = READ_BLOCK_ROWS  # rows read at a time when loading and checking an input


def _quiet_zarr():
    warnings.filterwarnings("ignore", message=".*Consolidated metadata.*", category=UserWarning)
    # The run's lease file sits beside the arrays while the run goes on (pipeline.lease).
    warnings.filterwarnings("ignore", message=r".*\.kgrad-lease\.json.*", category=UserWarning)


_quiet_zarr()


@dataclass(frozen=True)
class InputRef:
    """Where one input array lives: ``location`` plus, for a group, the array's name inside it."""

    location: str
    array: str | None = None  # None: the location is the array itself (zarr array or .npy)
    storage_options: tuple = ()

    def describe(self) -> str:
        return self.location if self.array is None else f"{self.location}[{self.array}]"


def _fs(location: str, storage_options: tuple = ()):
    try:
        fs, path = fsspec.core.url_to_fs(location, **dict(storage_options))
    except (ImportError, ValueError, TypeError) as exc:  # no s3fs/gcsfs/adlfs, unknown protocol or option
        raise InputError(f"{location!r} cannot be opened ({type(exc).__name__}: {exc}); install the "
                         f"filesystem's package (e.g. s3fs) and check storage_options") from exc
    return fs, path


def _normalise(location: str) -> str:
    location = os.fspath(location)
    if "://" in location and not location.startswith("file://"):
        return location.rstrip("/")
    return os.path.realpath(location.removeprefix("file://"))


def absolute(location: str) -> str:
    """A local path made absolute (workers may run elsewhere); URLs unchanged."""
    location = os.fspath(location)
    if "://" in location and not location.startswith("file://"):
        return location
    return os.path.abspath(location.removeprefix("file://"))


def overlaps(out: str, location: str) -> bool:
    """True if writing ``out`` could touch ``location``: the same path, or one inside the other."""
    a, b = _normalise(out), _normalise(location)
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def exists(location: str, storage_options: tuple = ()) -> bool:
    fs, path = _fs(location, storage_options)
    try:
        return fs.exists(path)
    except Exception as exc:  # credentials, endpoint, permissions: botocore & co. raise their own types
        if not user_fixable(exc):
            raise
        raise InputError(f"{location!r} could not be reached ({type(exc).__name__}: {exc}); check the URL, "
                         f"the credentials and storage_options (e.g. client_kwargs.endpoint_url)") from exc


def _store(location: str, storage_options: tuple = (), read_only: bool = False):
    """A zarr store for a local path or an fsspec URL (``s3://bucket/path``, ``memory://...``)."""
    if "://" in location and not location.startswith("file://"):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(location, storage_options=dict(storage_options), read_only=read_only)
    return location.removeprefix("file://")


def _open_zarr(location: str, storage_options: tuple, mode: str = "r"):
    return zarr.open(store=_store(location, storage_options, mode == "r"), mode=mode)


def resolve_input(location: str, role: str, storage_options: tuple = ()) -> InputRef:
    """Find the array behind ``location`` (``role`` names it in errors: points, sources, weights)."""
    location = os.fspath(location)
    if not exists(location, storage_options):
        raise InputError(f"{role}: {location!r} does not exist; give a zarr array, a zarr group with an "
                         f"array 'points', or a .npy file")
    if location.endswith(".npy"):
        return InputRef(location, None, storage_options)
    check_input_format(location, role, storage_options)
    try:
        node = _open_zarr(location, storage_options)
    except Exception as exc:
        if not user_fixable(exc):
            raise
        raise InputError(f"{role}: {location!r} could not be read as a zarr array or group "
                         f"({type(exc).__name__}: {exc}); is it a .npy file or a corrupt store?") from exc
    if isinstance(node, zarr.Array):
        return InputRef(location, None, storage_options)
    wanted = "weights" if role == "weights" else "points"
    if wanted in node.array_keys():
        return InputRef(location, wanted, storage_options)
    raise InputError(f"{role}: zarr group {location!r} holds no array {wanted!r} "
                     f"(it holds: {', '.join(sorted(node.array_keys())) or 'nothing'})")


ACCEPTED_INPUTS = "a zarr array, a zarr group holding an array 'points' (and 'weights'), or a .npy file"
_ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup")  # zarr v3; v2 array, v2 group


def check_input_format(location: str, role: str, storage_options: tuple = ()) -> None:
    """Refuse, in one line naming the accepted formats, an existing input that is neither a .npy file nor
    a zarr store: a file (CSV, text, HDF5...) or a directory without zarr metadata."""
    fs, path = _fs(location, storage_options)
    try:
        is_file = fs.isfile(path)
        is_zarr = not is_file and any(fs.exists(f"{path.rstrip('/')}/{name}") for name in _ZARR_METADATA)
    except Exception:  # unreachable stores are reported by the zarr open that follows
        return
    if is_file:
        suffix = os.path.splitext(path)[1]
        hint = (f"; convert it with numpy, e.g. np.save('{os.path.splitext(os.path.basename(path))[0]}.npy', "
                f"np.loadtxt('{os.path.basename(path)}', delimiter=','))" if suffix in (".csv", ".txt", ".tsv")
                else "")
        raise InputError(f"{role}: {location!r} is a file but not a .npy file (formats accepted: "
                         f"{ACCEPTED_INPUTS}){hint}")
    if not is_zarr:
        raise InputError(f"{role}: {location!r} is a directory but not a zarr store (it has no "
                         f"{', '.join(_ZARR_METADATA)}); formats accepted: {ACCEPTED_INPUTS}")


def group_weights(ref: InputRef) -> InputRef | None:
    """The ``weights`` array next to ``points`` in a group input, if there is one."""
    if ref.array != "points":
        return None
    group = _open_zarr(ref.location, ref.storage_options)
    return InputRef(ref.location, "weights", ref.storage_options) if "weights" in group.array_keys() else None


def open_array(ref: InputRef):
    """A sliceable array (zarr array or memory-mapped .npy) for ``ref``."""
    if ref.array is None and ref.location.endswith(".npy"):
        fs, path = _fs(ref.location, ref.storage_options)
        if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
            return np.load(path, mmap_mode="r")
        with fs.open(path, "rb") as f:
            return np.load(f)
    node = _open_zarr(ref.location, ref.storage_options)
    return node if ref.array is None else node[ref.array]


def read_rows(ref: InputRef, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of an input as a 2-D array (a 1-D input is one column)."""
    array = open_array(ref)
    rows = np.asarray(array[start:stop])
    return rows[:, None] if rows.ndim == 1 else rows


def fingerprint(ref: InputRef) -> str:
    """The fingerprint :func:`load_input` gives, read again block by block without keeping the data (the
    client's last check that the inputs did not change during a run)."""
    array = open_array(ref)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(array.shape), np.dtype(array.dtype).str)).encode())
    for start in range(0, array.shape[0], READ_ROWS):
        digest.update(np.ascontiguousarray(array[start:start + READ_ROWS]).tobytes())
    return digest.hexdigest()


def load_input(ref: InputRef, role: str) -> tuple[np.ndarray, str]:
    """Read a whole input, check it, and return (array, fingerprint).

    Points and sources come back 2-D (N, D); weights 1-D.  The fingerprint (blake2b of shape, dtype and
    bytes) identifies the data for resume and provenance.
    """
    try:
        array = open_array(ref)
        shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    except InputError:
        raise
    except Exception as exc:
        if not user_fixable(exc):
            raise
        raise InputError(f"{role}: {ref.describe()} could not be read ({type(exc).__name__}: {exc})") from exc
    if dtype.kind not in "fiu":
        raise InputError(f"{role}: {ref.describe()} has dtype {dtype}; it must hold real numbers")
    expected = (1,) if role == "weights" else (1, 2)
    if len(shape) not in expected:
        allowed = "(M,)" if role == "weights" else "(N, D) or (N,)"
        raise InputError(f"{role}: {ref.describe()} has shape {shape}; it must be {allowed}")
    if 0 in shape:
        raise InputError(f"{role}: {ref.describe()} is empty (shape {shape}); it needs at least one row")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((shape, dtype.str)).encode())
    data = np.empty(shape, dtype=dtype)  # filled block by block: peak = the array + one block
    try:
        for start in range(0, shape[0], READ_ROWS):
            block = np.ascontiguousarray(array[start:start + READ_ROWS])
            check_finite(block, f"{role} ({ref.describe()})", offset=start)
            digest.update(block.tobytes())
            data[start:start + len(block)] = block
            del block
    except InputError:
        raise
    except Exception as exc:
        if not user_fixable(exc):
            raise
        raise InputError(f"{role}: {ref.describe()} could not be read ({type(exc).__name__}: {exc}); "
                         f"the store may be corrupt") from exc
    if role != "weights" and data.ndim == 1:
        data = data[:, None]
    return data, digest.hexdigest()


# ----------------------------------------------------------------------------------------- output


def create_output(location: str, *, n_points: int, dim: int, dtype: str, rows_per_task: int,
                  n_tasks: int, attributes: dict, storage_options: tuple = ()) -> None:
    """Create the output group (``complete`` false) with empty arrays sized for the plan.

    The group's ``zarr.json`` carries kgrad's marker from its first write, so a group killed while
    being created is still recognised as kgrad's (:func:`check_replaceable`).  Nothing else at the
    location is touched: the run's lease file stays where it is."""
    group = zarr.create_group(store=_store(location, storage_options),
                              attributes={"kgrad_output": True, "complete": False,
                                          "format_version": FORMAT_VERSION})
    group.create_array("gradient", shape=(n_points, dim), chunks=(rows_per_task, dim), dtype=dtype,
                       dimension_names=("point", "dim"), fill_value=np.nan,
                       attributes={"long_name": "sum_i w_i grad_q k(q, x_i)",
                                   "units": "kernel units per point unit"})
    group.create_array("value", shape=(n_points,), chunks=(rows_per_task,), dtype=dtype,
                       dimension_names=("point",), fill_value=np.nan,
                       attributes={"long_name": "sum_i w_i k(q, x_i)", "units": "kernel units"})
    group.create_array("task_done", shape=(n_tasks,), chunks=(1,), dtype="uint8",
                       dimension_names=("task",), fill_value=0,
                       attributes={"long_name": "1 once the task's chunks are written"})
    # Run attributes last and in one write: an output with a run fingerprint always has its arrays.
    group.update_attributes({**attributes, "kgrad_output": True, "complete": False,
                             "format_version": FORMAT_VERSION})


# What kgrad writes at an output location: the group's metadata, its three arrays (any files under them),
# and the run's lease.  Anything else there is somebody else's, and kgrad never deletes it.
OUTPUT_ARRAYS = ("gradient", "value", "task_done")
LEASE_FILE = ".kgrad-lease.json"


def _is_kgrad_metadata(raw: bytes) -> bool:
    import json

    try:
        meta = json.loads(raw)
    except ValueError:
        return False
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return (isinstance(attrs, dict) and meta.get("node_type") == "group"
            and (attrs.get("kgrad_output") is True or "run_fingerprint" in attrs))


def output_kind(location: str, storage_options: tuple = ()) -> str:
    """What is at an output location: ``"absent"``, ``"empty"`` (an empty directory, or only a lease),
    or ``"kgrad"`` (a kgrad output group, finished, interrupted or half made, holding nothing else).

    Raises :class:`InputError` for anything else (a file, a foreign directory or group, a kgrad output
    with foreign files inside), naming what is there: ``--overwrite`` must never delete it."""
    fs, path = _fs(location, storage_options)
    try:
        if not fs.exists(path):
            return "absent"
        if fs.isfile(path):
            raise InputError(f"--out {location!r} is a file, not a kgrad output; kgrad never replaces it: "
                             f"choose another --out, or move the file away yourself")
        files = [f[len(path.rstrip('/')) + 1:] for f in fs.find(path, withdirs=False)]
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"--out {location!r} could not be listed ({exc}); check the path and "
                         f"its permissions") from exc
    files = [f for f in files if f and f != LEASE_FILE]
    if not files:
        return "empty"
    if "zarr.json" not in files or not _is_kgrad_metadata(fs.cat_file(path.rstrip("/") + "/zarr.json")):
        shown = ", ".join(sorted(files)[:3]) + (", ..." if len(files) > 3 else "")
        raise InputError(f"--out {location!r} holds files that are not a kgrad output ({shown}); kgrad "
                         f"never deletes them, even with --overwrite: choose another --out")
    foreign = sorted(f for f in files if f != "zarr.json" and f.split("/", 1)[0] not in OUTPUT_ARRAYS)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"--out {location!r} is a kgrad output but also holds files kgrad did not write "
                         f"({shown}); kgrad never deletes them: move them out, or choose another --out")
    return "kgrad"


def remove_output(location: str, storage_options: tuple = ()) -> None:
    """Delete a kgrad output's own contents (checked by :func:`output_kind`), keeping the lease.

    The arrays go first and the group's ``zarr.json`` last, so an output removed halfway is still
    recognised as kgrad's and the next ``--overwrite`` finishes the job."""
    if output_kind(location, storage_options) != "kgrad":
        return
    fs, path = _fs(location, storage_options)
    root = path.rstrip("/")
    for name in OUTPUT_ARRAYS:
        if fs.exists(f"{root}/{name}"):
            fs.rm(f"{root}/{name}", recursive=True)
    fs.rm(f"{root}/zarr.json")


def half_created(location: str, storage_options: tuple = ()) -> bool:
    """True for an output that a killed run left while creating it: kgrad's marker but no run
    attributes yet, and no task done.  Safe to create afresh."""
    try:
        group = open_output(location, storage_options)
    except InputError:
        return False
    if "run_fingerprint" in group.attrs:
        return False
    return "task_done" not in group.array_keys() or not np.asarray(group["task_done"][:]).any()


def open_output(location: str, storage_options: tuple = (), mode: str = "r"):
    try:
        return zarr.open_group(store=_store(location, storage_options, mode == "r"), mode=mode)
    except Exception as exc:
        if not user_fixable(exc):
            raise
        raise InputError(f"output {location!r} is not a kgrad output group ({type(exc).__name__}: {exc})") \
            from exc


def rows_digest(rows: np.ndarray) -> str:
    """blake2b of a block of input rows as stored (the client and the workers hash the same bytes)."""
    return hashlib.blake2b(np.ascontiguousarray(rows).tobytes(), digest_size=16).hexdigest()


def write_task(location: str, start: int, stop: int, index: int, gradient: np.ndarray, value: np.ndarray,
               storage_options: tuple = (), run_fingerprint: str | None = None,
               before_done: Callable[[], None] | None = None) -> None:
    """Write one task's rows (whole chunks), then mark it done.  Rewriting gives the same bytes.

    With ``run_fingerprint``, refuse to write into an output that now belongs to another run (a task of
    a killed client finishing after ``--overwrite`` started a new run at the same place).  ``before_done``
    is called after the chunks are written and right before the task is marked done; it raises to leave
    the task not done (the worker checks there that its run still holds the output's lease)."""
    group = open_output(location, storage_options, mode="r+")
    if run_fingerprint is not None and group.attrs.get("run_fingerprint") != run_fingerprint:
        raise RunEnded(f"output {location!r} now belongs to another run; this task's results are dropped")
    group["gradient"][start:stop] = gradient
    group["value"][start:stop] = value
    if before_done is not None:
        before_done()
    group["task_done"][index:index + 1] = np.ones(1, np.uint8)


def done_tasks(location: str, storage_options: tuple = ()) -> np.ndarray:
    group = open_output(location, storage_options)
    return np.asarray(group["task_done"][:]).astype(bool)


def finish_output(location: str, attributes: dict, storage_options: tuple = ()) -> None:
    """Record final attributes and the completion flag, last, then consolidate metadata once."""
    group = open_output(location, storage_options, mode="r+")
    group.update_attributes({**attributes, "complete": True})
    zarr.consolidate_metadata(_store(location, storage_options))
