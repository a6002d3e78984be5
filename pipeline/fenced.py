"""Writes into an output that a run which has lost it can never make, whatever the timing.

Every array of an output carries the id of the output it belongs to (attribute :data:`ID_KEY`, a fresh
uuid each time an output, or a pruned run's scratch group ``order/``, is created).  A run writes only into
arrays with its own id.  Checking the id and then writing by path leaves a gap: a run frozen between the
two (SIGSTOP, a suspended laptop, a stalled NFS client) while another run takes the output over, removes
it and writes its own, would write into the newcomer's arrays when it wakes.  So on a POSIX file system
the check and the write go through one open directory of the array (``dirfd``):

1. open the array's directory, read its ``zarr.json`` through that descriptor, and check the id;
2. encode the chunks in memory with zarr itself (the array's own metadata, codecs and chunk keys);
3. write each chunk file to a temporary name and rename it into place, both relative to the descriptor.

A run that replaces an output deletes the old array directories and creates new ones (new inodes).  A
writer that checked the old directory and froze then writes into the deleted directory: creating a file
there fails, and nothing reaches the new output.  The group's own ``zarr.json`` (attributes, the
completion flag) is written the same way: a temporary file made inside the run's own ``task_done``
directory, renamed onto the group's ``zarr.json``.  A writer whose arrays are gone cannot create it.

On object stores (``s3://``) there is no descriptor to hold: the id is checked right before each write,
which narrows the gap to the milliseconds between the check and the request.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import warnings
from pathlib import PurePosixPath

import numpy as np
import zarr
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from .errors import RunEnded
from .store import _store

ID_KEY = "kgrad_output_id"  # each array's attribute: the id of the output (or sorted copy) it belongs to


def new_id() -> str:
    return uuid.uuid4().hex


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def _local(location: str) -> str:
    return location.removeprefix("file://")


def _lost(location: str, array: str, found) -> RunEnded:
    return RunEnded(f"{location.rstrip('/')}/{array} now belongs to another run (its id is {str(found)[:8]}); "
                    f"this run's results are dropped")


# ------------------------------------------------------------------------------------------ POSIX: via a descriptor


def _read_at(fd: int, name: str) -> bytes:
    handle = os.open(name, os.O_RDONLY, dir_fd=fd)
    with os.fdopen(handle, "rb") as f:
        return f.read()


def _put_at(fd: int, key: str, data: bytes, target_fd: int | None = None, target: str | None = None) -> None:
    """Write ``data`` to ``key`` (relative to ``fd``), or to ``target`` relative to ``target_fd``: a temporary
    file beside ``key`` (named as zarr's local store names its own: the suffix replaced by ``.<32 hex>.partial``,
    so a leftover is recognised as kgrad's), then a rename."""
    parts = key.split("/")
    for depth in range(1, len(parts)):
        with contextlib.suppress(FileExistsError):
            os.mkdir("/".join(parts[:depth]), dir_fd=fd)
    temporary = str(PurePosixPath(key).with_suffix(f".{uuid.uuid4().hex}.partial"))
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.rename(temporary, target or key, src_dir_fd=fd, dst_dir_fd=fd if target_fd is None else target_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=fd)
        raise


@contextlib.contextmanager
def _array_dir(location: str, array: str, output_id: str):
    """The array's directory, open, once its ``zarr.json`` read through it carries ``output_id``; yields
    (descriptor, metadata bytes)."""
    path = os.path.join(_local(location), array)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise _lost(location, array, "gone") from None
    try:
        try:
            meta = _read_at(fd, "zarr.json")
        except FileNotFoundError:
            raise _lost(location, array, "gone") from None
        found = json.loads(meta).get("attributes", {}).get(ID_KEY)
        if found != output_id:
            raise _lost(location, array, found)
        yield fd, meta
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ encoding with zarr


def _encode(meta: bytes, start: int, data: np.ndarray) -> tuple[dict[str, bytes | None], zarr.Array]:
    """The chunk files of rows ``[start, start + len(data))`` (whole chunks) as zarr would store them, by
    key relative to the array; None for a chunk zarr would not store (equal to the fill value)."""
    memory = MemoryStore({"zarr.json": cpu.Buffer.from_bytes(meta)})
    array = zarr.open_array(store=memory, mode="r+")
    rows = array.chunks[0]
    stop = start + len(data)
    if start % rows or (stop % rows and stop != array.shape[0]):
        raise ValueError(f"rows {start}:{stop} are not whole chunks of {rows} rows")
    array[start:stop] = data
    stored = memory._store_dict
    keys = {}
    for index in range(start // rows, -(-stop // rows)):
        key = array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))
        keys[key] = stored[key].to_bytes() if key in stored else None
    return keys, array


def write_rows(location: str, storage_options: tuple, array: str, output_id: str, start: int,
               data: np.ndarray) -> None:
    """Write rows ``[start, start + len(data))`` (whole chunks) of ``array`` (a path inside the group at
    ``location``, e.g. ``gradient`` or ``order/value``), only while it carries ``output_id``.  Raises
    :class:`RunEnded` when it does not (another run took the output over)."""
    if not is_local(location):
        group = zarr.open_group(store=_store(location, storage_options), mode="r+")
        target = group[array]
        found = target.attrs.get(ID_KEY)
        if found != output_id:
            raise _lost(location, array, found)
        target[start:start + len(data)] = data
        return
    with _array_dir(location, array, output_id) as (fd, meta):
        chunks, _ = _encode(meta, start, np.asarray(data))
        for key, raw in chunks.items():
            if raw is None:  # equal to the fill value: zarr keeps no file for it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(key, dir_fd=fd)
            else:
                _put_at(fd, key, raw)


def update_group(location: str, storage_options: tuple, output_id: str, attributes: dict,
                 arrays: tuple[str, ...]) -> None:
    """Update the group's attributes, with its arrays' metadata inlined (consolidated, as
    ``zarr.consolidate_metadata`` does), only while its arrays carry ``output_id``.

    Consolidated from the first write on: readers (``xarray.open_zarr``, zarr) then never list the
    directory, so the run's lease file beside the arrays never makes them warn, during a run or after.

    The new ``zarr.json`` is made in memory with zarr, then written through the run's own last array
    (``arrays[-1]``): a temporary file inside that array's directory, renamed onto the group's."""
    if not is_local(location):
        store = _store(location, storage_options)
        group = zarr.open_group(store=store, mode="r+")
        for name in arrays:
            found = group[name].attrs.get(ID_KEY)
            if found != output_id:
                raise _lost(location, name, found)
        group.update_attributes(attributes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr notes that v3 has no consolidated metadata in its spec
            zarr.consolidate_metadata(store)
        return
    root = _local(location)
    with open(os.path.join(root, "zarr.json"), "rb") as f:
        memory = MemoryStore({"zarr.json": cpu.Buffer.from_bytes(f.read())})
    with _array_dir(location, arrays[-1], output_id) as (fd, _):
        for name in arrays:
            with _array_dir(location, name, output_id) as (_, meta):
                memory._store_dict[f"{name}/zarr.json"] = cpu.Buffer.from_bytes(meta)
        zarr.open_group(store=memory, mode="r+", use_consolidated=False).update_attributes(attributes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr notes that v3 has no consolidated metadata in its spec
            zarr.consolidate_metadata(memory)
        new = memory._store_dict["zarr.json"].to_bytes()
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _put_at(fd, "zarr.json", new, target_fd=root_fd, target="zarr.json")
        finally:
            os.close(root_fd)
