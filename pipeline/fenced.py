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
import errno
import itertools
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
from .store import _fs, _store

ID_KEY = "kgrad_output_id"  # each array's attribute, and the group's: the id of the run that writes there
PREVIOUS_KEY = "kgrad_previous_ids"  # the group's: ids its arrays may still carry while a take-over re-stamps them
TRASH = ".kgrad-trash-"  # a directory being removed: renamed to this prefix + 32 hex first


def new_id() -> str:
    return uuid.uuid4().hex


def is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def _local(location: str) -> str:
    return location.removeprefix("file://")


def accepted_ids(attributes: dict) -> frozenset:
    """The ids an output's arrays may carry, by its group attributes: the current one, and while a take-over
    re-stamps the arrays (:func:`restamp`) the ones before it."""
    return frozenset(i for i in (attributes.get(ID_KEY), *(attributes.get(PREVIOUS_KEY) or ())) if i)


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
def _opened(path: str, dir_fd: int | None = None, what: str = "", location: str = ""):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        raise _lost(location, what or path, "gone") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _checked(root_fd: int, array: str, ids, location: str) -> tuple[int, bytes]:
    """Open ``array`` relative to the group's directory and read its ``zarr.json`` through the new descriptor;
    raise :class:`RunEnded` unless its id is one of ``ids``.  The caller closes the descriptor."""
    try:
        fd = os.open(array, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
    except (FileNotFoundError, NotADirectoryError):
        raise _lost(location, array, "gone") from None
    try:
        meta = _read_at(fd, "zarr.json")
        found = json.loads(meta).get("attributes", {}).get(ID_KEY)
        if found not in ids:
            raise _lost(location, array, found)
    except FileNotFoundError:
        os.close(fd)
        raise _lost(location, array, "gone") from None
    except BaseException:
        os.close(fd)
        raise
    return fd, meta


@contextlib.contextmanager
def _array_dir(location: str, array: str, output_id: str):
    """The array's directory, open, once its ``zarr.json`` read through it carries ``output_id``; yields
    (descriptor, metadata bytes).  Opened relative to the group's directory, itself opened first."""
    with _opened(_local(location), location=location) as root_fd:
        fd, meta = _checked(root_fd, array, {output_id}, location)
        try:
            yield fd, meta
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ encoding with zarr


def _encode(meta: bytes, start: int, data: np.ndarray) -> dict[str, bytes | None]:
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
    across = [range(-(-size // chunk)) for size, chunk in zip(array.shape[1:], array.chunks[1:])]
    for index in range(start // rows, -(-stop // rows)):
        for rest in itertools.product(*across):  # every chunk of those rows (arrays chunked along other axes too)
            key = array.metadata.encode_chunk_key((index, *rest))
            keys[key] = stored[key].to_bytes() if key in stored else None
    return keys


BATCH_BYTES = 64 * 2**20  # rows encoded at a time when a write spans many chunks (bounds the copy in memory)


def write_rows(location: str, storage_options: tuple, array: str, output_id: str, start: int,
               data: np.ndarray) -> None:
    """Write rows ``[start, start + len(data))`` (whole chunks) of ``array`` (a path inside the group at
    ``location``, e.g. ``gradient`` or ``order/value``), only while it carries ``output_id``.  Raises
    :class:`RunEnded` when it does not (another run took the output over)."""
    data = np.asarray(data)
    if not is_local(location):
        group = zarr.open_group(store=_store(location, storage_options), mode="r+", use_consolidated=False)
        target = group[array]
        found = target.attrs.get(ID_KEY)
        if found != output_id:
            raise _lost(location, array, found)
        target[start:start + len(data)] = data
        return
    with _array_dir(location, array, output_id) as (fd, meta):
        rows = json.loads(meta)["chunk_grid"]["configuration"]["chunk_shape"][0]
        per_row = max(1, data[:1].nbytes)
        step = max(rows, BATCH_BYTES // per_row // rows * rows)
        try:
            for at in range(0, len(data), step):
                for key, raw in _encode(meta, start + at, data[at:at + step]).items():
                    if raw is None:  # equal to the fill value: zarr keeps no file for it
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(key, dir_fd=fd)
                    else:
                        _put_at(fd, key, raw)
        except OSError as exc:  # the directory it checked was deleted meanwhile (ESTALE: the same on NFS)
            if exc.errno in (errno.ENOENT, errno.ESTALE):
                raise _lost(location, array, "gone") from None
            raise


def _with_attributes(meta: bytes, attributes: dict) -> bytes:
    node = json.loads(meta)
    node["attributes"] = {**node.get("attributes", {}), **attributes}
    return json.dumps(node, indent=2).encode()


def update_group(location: str, storage_options: tuple, output_id: str, attributes: dict,
                 arrays: tuple[str, ...], accept=()) -> None:
    """Update the group's attributes, with its arrays' metadata inlined (consolidated, as
    ``zarr.consolidate_metadata`` does), only while its arrays carry ``output_id`` (or an id in ``accept``,
    during a take-over) and the group itself names no other run.

    Consolidated from the first write on: readers (``xarray.open_zarr``, zarr) then never list the
    directory, so the run's lease file beside the arrays never makes them warn, during a run or after.
    The new ``zarr.json`` is made in memory with zarr, then written through the run's own last array
    (``arrays[-1]``): a temporary file inside that array's directory, renamed onto the group's, both
    relative to descriptors opened and checked first."""
    ids = {output_id, *accept}
    if not is_local(location):
        store = _store(location, storage_options)
        group = zarr.open_group(store=store, mode="r+", use_consolidated=False)
        for name in arrays:
            found = group[name].attrs.get(ID_KEY)
            if found not in ids:
                raise _lost(location, name, found)
        group.update_attributes(attributes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr notes that v3 has no consolidated metadata in its spec
            zarr.consolidate_metadata(store)
        return
    with _opened(_local(location), location=location) as root_fd:
        root_meta = _read_at(root_fd, "zarr.json")
        named = json.loads(root_meta).get("attributes", {}).get(ID_KEY)
        if named not in (None, *ids):
            raise _lost(location, ".", named)
        memory = MemoryStore({"zarr.json": cpu.Buffer.from_bytes(root_meta)})
        opened = []
        try:
            for name in arrays:
                fd, meta = _checked(root_fd, name, ids, location)
                opened.append(fd)
                memory._store_dict[f"{name}/zarr.json"] = cpu.Buffer.from_bytes(meta)
            zarr.open_group(store=memory, mode="r+", use_consolidated=False).update_attributes(attributes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zarr notes that v3 has no consolidated metadata in its spec
                zarr.consolidate_metadata(memory)
            _put_at(opened[-1], "zarr.json", memory._store_dict["zarr.json"].to_bytes(), target_fd=root_fd,
                    target="zarr.json")
        finally:
            for fd in opened:
                os.close(fd)


def restamp(location: str, storage_options: tuple, arrays: tuple[str, ...], accept, new_id: str) -> None:
    """Give each of ``arrays`` the id ``new_id``, from one of ``accept`` (a take-over: a resumed output
    becomes the new run's, so that writers of the runs before it are fenced out from now on).  An array
    that already carries ``new_id`` is left as it is (a re-stamp cut short and done again)."""
    ids = {new_id, *accept}
    if not is_local(location):
        group = zarr.open_group(store=_store(location, storage_options), mode="r+", use_consolidated=False)
        for name in arrays:
            found = group[name].attrs.get(ID_KEY)
            if found not in ids:
                raise _lost(location, name, found)
            group[name].attrs[ID_KEY] = new_id
        return
    with _opened(_local(location), location=location) as root_fd:
        for name in arrays:
            fd, meta = _checked(root_fd, name, ids, location)
            try:
                _put_at(fd, "zarr.json", _with_attributes(meta, {ID_KEY: new_id}))
            finally:
                os.close(fd)


def _group_names_only(root_fd: int, accept) -> bool:
    """The group's ``zarr.json`` names no run but those in ``accept`` (its id, and the ids a removal or a
    take-over keeps beside it): an array directory there without metadata yet is that output's, cut short
    while being created.  A newer run names its own id in the group before it creates any array."""
    try:
        attributes = json.loads(_read_at(root_fd, "zarr.json")).get("attributes", {})
    except FileNotFoundError:
        return False
    return accepted_ids(attributes) <= set(accept)


def remove_tree(location: str, storage_options: tuple, name: str, check: str | None, accept) -> None:
    """Delete the directory ``name`` of the group at ``location`` (an array, or the ``order`` group), if it
    is there, only while its array ``check`` (a path inside it; None: ``name`` itself) carries one of
    ``accept`` (None in it: an array without an id, as a half-made output has).  An array directory without
    metadata (a run killed while zarr created it) goes when the group names no run outside ``accept``.

    The directory is opened and checked, renamed to a trash name relative to the group's descriptor, and
    deleted only if the renamed directory is the one checked (same inode); otherwise it is put back."""
    import shutil

    if not is_local(location):
        fs, path = _fs(f"{location.rstrip('/')}/{name}", storage_options)
        if fs.exists(path):
            group = zarr.open_group(store=_store(location, storage_options), mode="r", use_consolidated=False)
            found = group[check or name].attrs.get(ID_KEY)
            if found not in accept:
                raise _lost(location, check or name, found)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return
    root = _local(location)
    with _opened(root, location=location) as root_fd:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
        except (FileNotFoundError, NotADirectoryError):
            return
        trash = None
        try:
            if check is not None:
                try:
                    inner, _ = _checked(fd, check, accept, location)
                    os.close(inner)
                except RunEnded:
                    if None not in accept or os.path.exists(os.path.join(root, name, check, "zarr.json")):
                        raise  # (a group cut short before ``check`` was made, and no id asked for: remove it)
            else:
                try:
                    found = json.loads(_read_at(fd, "zarr.json")).get("attributes", {}).get(ID_KEY)
                    mine = found in accept
                except FileNotFoundError:  # an array cut short before its metadata (a run killed creating it)
                    found, mine = "none yet", None in accept or _group_names_only(root_fd, accept)
                if not mine:
                    raise _lost(location, name, found)
            trash = f"{TRASH}{uuid.uuid4().hex}"
            os.rename(name, trash, src_dir_fd=root_fd, dst_dir_fd=root_fd)
            moved = os.stat(trash, dir_fd=root_fd, follow_symlinks=False)
            mine = os.fstat(fd)
            if (moved.st_ino, moved.st_dev) != (mine.st_ino, mine.st_dev):  # replaced between check and rename
                with contextlib.suppress(OSError):
                    os.rename(trash, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
                raise _lost(location, name, "replaced")
        finally:
            os.close(fd)
        shutil.rmtree(os.path.join(root, trash))


def replace_group_json(location: str, storage_options: tuple, data: bytes, arrays: tuple[str, ...], accept) -> None:
    """Replace the group's ``zarr.json`` with ``data`` (e.g. kgrad's bare marker, first step of a removal),
    only while its arrays carry one of ``accept``: written through the first of ``arrays`` there.  A group
    with none of them left is written by path (a temporary file renamed into place)."""
    if not is_local(location):
        fs, path = _fs(location, storage_options)
        fs.pipe_file(f"{path.rstrip('/')}/zarr.json", data)
        return
    with _opened(_local(location), location=location) as root_fd:
        for name in arrays:
            try:
                fd, _ = _checked(root_fd, name, accept, location)
            except RunEnded as exc:
                if "is gone" in str(exc) or "(its id is gone)" in str(exc):
                    continue
                raise
            try:
                _put_at(fd, "zarr.json", data, target_fd=root_fd, target="zarr.json")
            finally:
                os.close(fd)
            return
        _put_at(root_fd, "zarr.json", data)
