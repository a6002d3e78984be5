"""Where data live: inputs read from zarr, .npy or fsspec URLs, and the store helpers the output uses.

Inputs: a zarr array, a zarr group holding an array ``points`` (and optionally ``weights``), or a ``.npy``
file; local paths or fsspec URLs (``s3://...``); any chunking.  Each is read block by block, checked
(finite, real, the right shape) and fingerprinted (blake2b of shape, dtype and bytes) for resume and
provenance.  The output group itself is :mod:`pipeline.output`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import fsspec
import numpy as np
import zarr

from .errors import InputError, user_fixable
from .inputs import check_finite
from .plan import READ_BLOCK_ROWS

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
    """A local path made absolute, ``~`` expanded (workers may run elsewhere); URLs unchanged."""
    location = os.fspath(location)
    if "://" in location and not location.startswith("file://"):
        return location
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


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
