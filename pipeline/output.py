"""The output group: its layout, its run attributes, its resume state, and what kgrad may delete.

A zarr v3 group that ``xarray.open_zarr`` reads:

* ``gradient`` (N, D), dimensions ("point", "dim"), one chunk of ``rows_per_task`` rows per task;
* ``value`` (N,), dimension ("point",);
* ``task_done`` (n_tasks,), dimension ("task",), uint8: 1 once a task's chunks are written (resume state:
  a chunk that merely exists proves nothing, since zarr skips writing chunks equal to the fill value);
* attributes (:class:`RunRecord`): kernel and parameters, dtype, mode, N, M, D, input locations and
  fingerprints, version, plan, timings, and ``complete``, set last, after every task has written.

Each task writes whole chunks that no other task touches, so concurrent writers never overlap.  While a
run goes on the group also holds its lease file (:mod:`pipeline.lease`).

A run also keeps a scratch group ``order/`` while it runs (:class:`SpatialCopy`): the points (and what its
method's tasks read besides: sorted sources, weights, a tile index) in the run's spatial order, and the
results in that order with their own ``task_done``.  The client writes the sorted copy, the tasks write the sorted results, and the client puts
them back in input order into ``gradient`` and ``value`` at the end and deletes ``order/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zarr

from . import fenced
from .errors import InputError, user_fixable
from .fenced import ID_KEY, PREVIOUS_KEY, TRASH
from .spatial import in_input_order
from .store import _fs, _store, exists

FORMAT_VERSION = 1
# What kgrad writes at an output location: the group's metadata, its three arrays (their metadata and
# chunk files), and the run's lease (with the lease's own short-lived temporary files).  Anything else
# there is somebody else's, and kgrad never deletes it.
ARRAYS = ("gradient", "value", "task_done")
LEASE_FILE = ".kgrad-lease.json"
# The sorted copy is scratch, written by the client and the tasks and read back by both: compressed with
# lz4 after a bit shuffle (numcodecs' blosc, which zarr itself depends on), not zarr's default zstd.  Measured
# on 10^7 x 2 float64 coordinates: written in 1.0 s (zstd: 3.0 s, none: 1.0 s), read in 0.33 s (1.2 s,
# 0.38 s), 69 MB (82 MB, 160 MB).  The output's own arrays keep zarr's defaults.
COPY_COMPRESSORS = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),)
GRID_CHUNK = {1: (1 << 16,), 2: (256, 256), 3: (16, 64, 64)}  # chunks of the far field's node sums (OUT/order/grid)
ORDER = "order"  # a run's scratch group while it runs (pipeline.methods.in_order)
ORDER_ARRAYS = ("index", "source_index", "points", "sources", "weights", "tiles", "grid", "gradient", "value",
                "pairs", "task_done")
# zarr writes each file as "<name>.<32 hex>.partial" first and renames it: a killed writer can leave one.
_META = r"zarr(\.json|\.[0-9a-f]{32}\.partial)"
_CHUNK = r"c(/\d+)+(\.[0-9a-f]{32}\.partial)?"
_OWN_FILE = re.compile(r"^(%s|(%s)/(%s|%s)|%s/%s|%s/(%s)/(%s|%s))$"
                       % (_META, "|".join(ARRAYS), _META, _CHUNK, ORDER, _META, ORDER, "|".join(ORDER_ARRAYS),
                          _META, _CHUNK))
_ROOT_PARTIAL = re.compile(r"^zarr\.[0-9a-f]{32}\.partial$")
_TRASH = re.compile(r"^%s[0-9a-f]{32}$" % re.escape(TRASH))  # a directory being deleted (pipeline/fenced.py)
_IN_TRASH = re.compile(r"^%s[0-9a-f]{32}/" % re.escape(TRASH))
# Exactly the lease files kgrad writes (pipeline/lease.py): the lease, its temporary "<lease>.<8 hex>.tmp"
# and a stale lease moved aside, "<lease>.stale-<8 hex>".  A user's ".kgrad-lease.json.notes" is not kgrad's.
LEASE_NAMES = re.compile(r"^%s(\.[0-9a-f]{8}\.tmp|\.stale-[0-9a-f]{8})?$" % re.escape(LEASE_FILE))


@dataclass(frozen=True)
class RunRecord:
    """A run's attributes as its output records them (what ``kgrad inspect`` and ``kgrad plot`` show)."""

    run_fingerprint: str
    complete: bool
    kernel: str
    kernel_description: str
    formulation: str
    dtype: str
    mode: str
    n_points: int
    n_sources: int
    dim: int
    inputs: dict = field(default_factory=dict)  # role -> {location, array, fingerprint[, shape]} or None
    kgrad_version: str = ""
    plan: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    method: str = ""  # the computation method (pipeline.methods) that made it

    @classmethod
    def from_attributes(cls, attrs: dict) -> "RunRecord":
        return cls(run_fingerprint=attrs["run_fingerprint"], complete=bool(attrs.get("complete")),
                   kernel=attrs.get("kernel", "?"), kernel_description=attrs.get("kernel_description", "?"),
                   formulation=attrs.get("formulation", "?"), dtype=attrs.get("dtype", "?"),
                   mode=attrs.get("mode", "?"), n_points=attrs.get("N"), n_sources=attrs.get("M"),
                   dim=attrs.get("D"), inputs=attrs.get("inputs") or {}, kgrad_version=attrs.get("kgrad_version", ""),
                   plan=attrs.get("plan") or {}, timings=attrs.get("timings") or {}, method=attrs.get("method", ""))


def _is_kgrad_metadata(raw: bytes) -> bool:
    try:
        meta = json.loads(raw)
    except ValueError:
        return False
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return (isinstance(attrs, dict) and meta.get("node_type") == "group"
            and (attrs.get("kgrad_output") is True or "run_fingerprint" in attrs))


@dataclass(frozen=True)
class OutputGroup:
    """An output location (a local path or an fsspec URL) and what kgrad does there."""

    location: str
    storage_options: tuple = ()

    # ---- what is there

    def exists(self) -> bool:
        return exists(self.location, self.storage_options)

    def kind(self) -> str:
        """``"absent"``, ``"empty"`` (an empty directory, or only a lease), or ``"kgrad"`` (a kgrad output,
        finished, interrupted or half made, holding nothing else).

        Raises :class:`InputError` for anything else (a file, a foreign directory or group, a kgrad output
        with foreign files inside), naming what is there: ``--overwrite`` must never delete it."""
        fs, path = _fs(self.location, self.storage_options)
        where = self.location
        try:
            if not fs.exists(path):
                return "absent"
            if fs.isfile(path):
                raise InputError(f"--out {where!r} is a file, not a kgrad output; kgrad never replaces it: "
                                 f"choose another --out, or move the file away yourself")
            files = [f[len(path.rstrip('/')) + 1:] for f in fs.find(path, withdirs=False)]
        except InputError:
            raise
        except OSError as exc:
            raise InputError(f"--out {where!r} could not be listed ({exc}); check the path and "
                             f"its permissions") from exc
        files = [f for f in files if f and not LEASE_NAMES.match(f)]
        if not files:
            return "empty"
        if "zarr.json" not in files or not _is_kgrad_metadata(fs.cat_file(path.rstrip("/") + "/zarr.json")):
            shown = ", ".join(sorted(files)[:3]) + (", ..." if len(files) > 3 else "")
            raise InputError(f"--out {where!r} holds files that are not a kgrad output ({shown}); kgrad "
                             f"never deletes them, even with --overwrite: choose another --out")
        foreign = sorted(f for f in files if not (_OWN_FILE.match(f) or _IN_TRASH.match(f)))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise InputError(f"--out {where!r} is a kgrad output but also holds files kgrad did not write "
                             f"({shown}); kgrad never deletes them: move them out, or choose another --out")
        return "kgrad"

    def open(self, mode: str = "r") -> zarr.Group:
        try:
            return zarr.open_group(store=_store(self.location, self.storage_options, mode == "r"), mode=mode)
        except Exception as exc:
            if not user_fixable(exc):
                raise
            raise InputError(f"output {self.location!r} is not a kgrad output group "
                             f"({type(exc).__name__}: {exc})") from exc

    def attributes(self) -> dict:
        return dict(self.open().attrs)

    def record(self) -> RunRecord:
        """The run attributes, typed; :class:`InputError` if this is not a finished-or-resumable output."""
        group = self.open()
        attrs = dict(group.attrs)
        if "run_fingerprint" not in attrs or not set(ARRAYS) <= set(group.array_keys()):
            raise InputError(f"{self.location!r} is a zarr group but not a kgrad output (no run attributes)")
        return RunRecord.from_attributes(attrs)

    def half_created(self) -> bool:
        """True for an output that a killed run left while creating or removing it: kgrad's marker but no
        run attributes (written last on creation, first gone on removal), so no task in it can be trusted.
        Safe to create afresh."""
        try:
            group = self.open()
        except InputError:
            return False
        return "run_fingerprint" not in group.attrs

    def done_tasks(self) -> np.ndarray:
        return np.asarray(self.open()["task_done"][:]).astype(bool)

    # ---- what a run does there

    def create(self, *, n_points: int, dim: int, dtype: str, rows_per_task: int, n_tasks: int,
               attributes: dict) -> None:
        """Create the group (``complete`` false) with empty arrays sized for the plan.

        ``zarr.json`` carries kgrad's marker from its first write, so a group killed while being created
        is still recognised as kgrad's (:meth:`kind`).  The run's lease file stays where it is."""
        output_id = fenced.new_id()  # every write of the run checks it (pipeline/fenced.py)
        store = _store(self.location, self.storage_options)
        # The group names the new id before any array exists: a run killed while creating them leaves a marker
        # that names the ids its arrays may carry, so the next run can remove them.
        if self.kind() == "kgrad":  # the bare marker that remove() leaves: build on it (never replace it)
            group = zarr.open_group(store=store, mode="r+", use_consolidated=False)
            group.update_attributes({ID_KEY: output_id})
        else:
            group = zarr.create_group(store=store, attributes={"kgrad_output": True, "complete": False,
                                                               "format_version": FORMAT_VERSION, ID_KEY: output_id})
        group.create_array("gradient", shape=(n_points, dim), chunks=(rows_per_task, dim), dtype=dtype,
                           dimension_names=("point", "dim"), fill_value=np.nan,
                           attributes={"long_name": "sum_i w_i grad_q k(q, x_i)",
                                       "units": "kernel units per point unit", ID_KEY: output_id})
        group.create_array("value", shape=(n_points,), chunks=(rows_per_task,), dtype=dtype,
                           dimension_names=("point",), fill_value=np.nan,
                           attributes={"long_name": "sum_i w_i k(q, x_i)", "units": "kernel units",
                                       ID_KEY: output_id})
        group.create_array("task_done", shape=(n_tasks,), chunks=(1,), dtype="uint8",
                           dimension_names=("task",), fill_value=0,
                           attributes={"long_name": "1 once the task's chunks are written", ID_KEY: output_id})
        # Run attributes last and in one write: an output with a run fingerprint always has its arrays.
        self.update({**attributes, "kgrad_output": True, "complete": False, "format_version": FORMAT_VERSION,
                     ID_KEY: output_id, PREVIOUS_KEY: []}, output_id)
        return output_id

    def take_over(self, accept, new_id: str) -> None:
        """Make a resumed output this run's: its arrays (and the sorted copy's) re-stamped from one of the
        ids ``accept`` to ``new_id``, so that nothing of the runs before it can write there any more.  The
        group names the new id first and keeps the old ones beside it until every array is re-stamped, so
        a take-over cut short is taken over again."""
        where = (self.location, self.storage_options)
        accept = frozenset(accept)
        self.update({ID_KEY: new_id, PREVIOUS_KEY: sorted(accept)}, new_id, accept=accept)
        fenced.restamp(*where, ARRAYS, accept, new_id)
        copy = SpatialCopy(self)
        names = copy.array_names()
        if names:
            fenced.restamp(*where, tuple(f"{ORDER}/{n}" for n in names), accept, new_id)
            fenced.update_group(copy.location, self.storage_options, new_id, {ID_KEY: new_id}, names, accept=accept)
        self.update({PREVIOUS_KEY: []}, new_id)

    def remove(self, accept=frozenset()) -> None:
        """Delete a kgrad output's own contents (checked by :meth:`kind`), keeping the lease, and only while
        its arrays carry one of the ids ``accept`` (those the run saw when it took the lease; none: arrays
        without ids, as a half-made output has): a run frozen past its lease never removes a newer output.

        First ``zarr.json`` becomes kgrad's bare marker (no run attributes, not complete), then the arrays
        and the ``order/`` group go (each renamed aside, checked, deleted); the marker stays, and
        :meth:`create` builds on it: an output removed halfway is still recognised as kgrad's, and is
        never mistaken for a complete one."""
        if self.kind() != "kgrad":
            return
        accept = frozenset(accept) or frozenset({None})
        where = (self.location, self.storage_options)
        marker = {"zarr_format": 3, "node_type": "group",  # it names the ids the arrays left may carry
                  "attributes": {"kgrad_output": True, "complete": False, "format_version": FORMAT_VERSION,
                                 PREVIOUS_KEY: sorted(i for i in accept if i)}}
        fenced.replace_group_json(*where, json.dumps(marker).encode(), ARRAYS, accept)
        fs, path = _fs(self.location, self.storage_options)
        root = path.rstrip("/")
        for name in fs.ls(root, detail=False):  # leftovers: a lease's temporary files, zarr's, kgrad's trash
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if (base != LEASE_FILE and LEASE_NAMES.match(base)) or _ROOT_PARTIAL.match(base) or _TRASH.match(base):
                fs.rm(name, recursive=True)
        for name in ARRAYS:
            fenced.remove_tree(*where, name, None, accept)
        fenced.remove_tree(*where, ORDER, "task_done", accept | {None})

    def output_id(self) -> str | None:
        """The id this output's arrays carry (:mod:`pipeline.fenced`): a run writes only into its own."""
        return self.attributes().get(ID_KEY)

    def write_task(self, start: int, stop: int, index: int, gradient: np.ndarray, value: np.ndarray,
                   output_id: str | None = None, before_done: Callable[[], None] | None = None) -> None:
        """Write one task's rows (whole chunks), then mark it done.  Rewriting gives the same bytes.

        Every write goes only into arrays that carry ``output_id`` (:func:`pipeline.fenced.write_rows`):
        an output that another run has taken over and replaced is never written.  ``before_done`` is
        called after the chunks are written and right before the task is marked done; it raises to leave
        the task not done (the worker checks there that its run still holds the lease).  ``output_id``
        None: the output's current id (a caller that owns the output outright: tests, tools; a run's tasks
        always pass their run's)."""
        output_id = output_id or self.output_id()
        where = (self.location, self.storage_options)
        fenced.write_rows(*where, "gradient", output_id, start, gradient)
        fenced.write_rows(*where, "value", output_id, start, value)
        if before_done is not None:
            before_done()
        fenced.write_rows(*where, "task_done", output_id, index, np.ones(1, np.uint8))

    def mark_all_done(self, output_id: str | None = None) -> None:
        output_id = output_id or self.output_id()
        n_tasks = self.open()["task_done"].shape[0]
        fenced.write_rows(self.location, self.storage_options, "task_done", output_id, 0, np.ones(n_tasks, np.uint8))

    def update(self, attributes: dict, output_id: str, accept=()) -> None:
        """Update the run attributes, only while the arrays are ``output_id``'s (or, during a take-over, one
        of ``accept``)."""
        fenced.update_group(self.location, self.storage_options, output_id, attributes, ARRAYS, accept=accept)

    def finish(self, attributes: dict, output_id: str | None = None) -> None:
        """Record final attributes and the completion flag, last; only while the arrays are ``output_id``'s
        (None: the output's current id, as for :meth:`write_task`)."""
        output_id = output_id or self.output_id()
        fenced.update_group(self.location, self.storage_options, output_id, {**attributes, "complete": True},
                            ARRAYS)


@dataclass(frozen=True)
class SpatialCopy:
    """A run's scratch group ``OUT/order/`` (see the module docstring and :mod:`pipeline.methods.in_order`).

    Arrays: ``index`` (N,) int64, the input row of each point in spatial order; ``points`` (N, D) float64 in
    that order; with separate sources ``source_index`` (M,) and ``sources`` (M, D); ``weights`` (M,) float64
    in the sources' order (absent: unit weights, or the tasks read the inputs' own); ``grid``, the far-field
    method's node sums (flat, float64); ``tiles`` (T, 2 D + 2), the pruned method's tile index
    (:meth:`pipeline.pruning.TileIndex.as_array`); ``gradient``, ``value`` (sorted results), ``pairs`` (per
    task, pairs computed) and ``task_done``.  ``ready`` and the run fingerprint are set once the copy is whole."""

    output: OutputGroup

    @property
    def location(self) -> str:
        return self.output.location.rstrip("/") + "/" + ORDER

    def _open(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(store=_store(self.location, self.output.storage_options, mode == "r"), mode=mode)

    def attributes(self) -> dict:
        """The copy's attributes ({} if there is no copy)."""
        fs, path = _fs(self.location, self.output.storage_options)
        if not fs.exists(path.rstrip("/") + "/zarr.json"):
            return {}
        return dict(self._open().attrs)

    def ready(self, run_fingerprint: str) -> bool:
        """The copy is whole and was made for this run."""
        attrs = self.attributes()
        return attrs.get("ready") is True and attrs.get("run_fingerprint") == run_fingerprint

    def array_names(self) -> tuple[str, ...]:
        """The copy's arrays that are there (none: no copy)."""
        fs, path = _fs(self.location, self.output.storage_options)
        return tuple(n for n in ORDER_ARRAYS if fs.exists(f"{path.rstrip('/')}/{n}/zarr.json"))

    def create(self, *, run_id: str, run_fingerprint: str, point_index: np.ndarray, points: np.ndarray,
               source_index: np.ndarray | None, sources: np.ndarray | None, weights: np.ndarray | None,
               tiles: np.ndarray | None, dtype: str, rows_per_task: int, n_tasks: int, source_chunk: int,
               grid: np.ndarray | None = None) -> str:
        """Write the sorted copy, for the run ``run_id`` (its arrays carry it: every write into them, the
        client's and the tasks', is fenced by it); return the new ``copy_id`` (the workers' caches key).
        Any earlier copy is removed first, only if it is this run's (or carries no id); ``ready`` goes last."""
        import uuid

        where = (self.output.location, self.output.storage_options)
        fenced.remove_tree(*where, ORDER, "task_done", {run_id, None})
        copy_id = uuid.uuid4().hex
        group = zarr.create_group(store=_store(self.location, self.output.storage_options),
                                  attributes={"ready": False, "run_fingerprint": run_fingerprint,
                                              "copy_id": copy_id, ID_KEY: run_id})
        n, dim = points.shape
        mine = {ID_KEY: run_id}
        names = []

        def add(name, shape, chunks, dtype, data=None, **extra):
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, attributes=mine,
                               compressors=COPY_COMPRESSORS, **extra)
            names.append(name)
            if data is not None:
                fenced.write_rows(*where, f"{ORDER}/{name}", run_id, 0, data)

        def put(name, data, chunks):
            add(name, data.shape, chunks, data.dtype, data)

        put("index", np.asarray(point_index, np.int64), (source_chunk,))
        put("points", np.asarray(points, np.float64), (source_chunk, dim))
        if sources is not None:
            put("source_index", np.asarray(source_index, np.int64), (source_chunk,))
            put("sources", np.asarray(sources, np.float64), (source_chunk, dim))
        if weights is not None:
            put("weights", np.asarray(weights, np.float64), (source_chunk,))
        if tiles is not None:
            put("tiles", np.asarray(tiles, np.float64), (max(1, len(tiles)), tiles.shape[1]))
        if grid is not None:  # the far field's node sums (D-dimensional): tasks read the box their stencils need
            put("grid", np.asarray(grid, np.float64), GRID_CHUNK[grid.ndim])
        add("gradient", (n, dim), (rows_per_task, dim), dtype, fill_value=np.nan)
        add("value", (n,), (rows_per_task,), dtype, fill_value=np.nan)
        add("pairs", (n_tasks,), (1,), "int64", fill_value=0)
        add("task_done", (n_tasks,), (1,), "uint8", fill_value=0)
        fenced.update_group(self.location, self.output.storage_options, run_id, {"ready": True}, tuple(names))
        return copy_id

    def done_tasks(self) -> np.ndarray:
        return np.asarray(self._open()["task_done"][:]).astype(bool)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray | None:
        """Rows ``[start, stop)`` of one array (None if the run has no such array)."""
        group = self._open()
        if name not in group.array_keys():
            return None
        return np.asarray(group[name][start:stop])

    def arrays(self, *names: str) -> dict:
        """The arrays ``names``, opened once for many reads (a name the run has no array for maps to None)."""
        group = self._open()
        found = {}
        for name in names:
            try:
                member = group[name]
            except KeyError:
                member = None
            found[name] = member if isinstance(member, zarr.Array) else None
        return found

    def read_box(self, name: str, lower, upper) -> np.ndarray:
        """The box ``[lower_d, upper_d)`` along every axis of one array."""
        return np.asarray(self._open()[name][tuple(slice(int(a), int(b)) for a, b in zip(lower, upper))])

    def write_task(self, start: int, stop: int, index: int, gradient: np.ndarray, value: np.ndarray, pairs: int,
                   run_id: str, before_done: Callable[[], None] | None = None) -> None:
        """One task's sorted results (whole chunks), its pair count, then its done mark; only into the arrays
        of the run ``run_id`` (:func:`pipeline.fenced.write_rows`)."""
        where = (self.output.location, self.output.storage_options)
        fenced.write_rows(*where, f"{ORDER}/gradient", run_id, start, gradient)
        fenced.write_rows(*where, f"{ORDER}/value", run_id, start, value)
        fenced.write_rows(*where, f"{ORDER}/pairs", run_id, index, np.array([pairs], np.int64))
        if before_done is not None:
            before_done()
        fenced.write_rows(*where, f"{ORDER}/task_done", run_id, index, np.ones(1, np.uint8))

    def unsort_into_output(self, output_id: str) -> int:
        """Put the sorted results back in input order into the output's ``gradient`` and ``value`` (read
        whole: the client holds N (D + 1) values of the output dtype and the permutation); return the pairs
        computed.  The caller then marks the output's tasks done."""
        group = self._open()
        order = np.asarray(group["index"][:])
        where = (self.output.location, self.output.storage_options)
        for name in ("gradient", "value"):
            fenced.write_rows(*where, name, output_id, 0, in_input_order(np.asarray(group[name][:]), order))
        return int(np.asarray(group["pairs"][:]).sum())

    def remove(self, run_id: str) -> None:
        """Delete the copy, only while it is the run ``run_id``'s."""
        fenced.remove_tree(self.output.location, self.output.storage_options, ORDER, "task_done", {run_id})
