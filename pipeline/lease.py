"""One run owns an output at a time: a lease file inside the output location.

``kgrad run`` takes the lease before it creates, removes or resumes an output, refreshes it while the
run goes on (a heartbeat every few seconds), and deletes it on every way out.  Each task checks the lease
right before it marks its chunk done, so nothing of a run is written after its client has gone:

* another run holding a live lease -> the second run exits 2 naming the owner (pid, host, start);
* a lease whose owner is dead (same host: its pid is gone or reused; any host: no heartbeat for
  ``stale_after`` seconds) is stale: the next run takes it over, so a killed run never leaves an output
  stuck;
* a task whose run no longer holds the lease (ended, interrupted, taken over) drops its results.

Liveness on the same host is judged by pid (and its start time): containers that share a hostname but
not a pid namespace must not share an output directory.  On a local or shared POSIX filesystem taking the
lease is atomic (``link`` of a finished file, which fails
if the lease exists; a stale lease is first renamed away, which only one taker can do).  On object stores
(``s3://``) there is no atomic create: the lease is written and read back, which catches all but runs
started within the same fraction of a second.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from . import store
from .output import LEASE_FILE
from .errors import InputError, RunEnded

HEARTBEAT_SECONDS = 5.0  # how often the owner refreshes its lease
STALE_AFTER_SECONDS = 60.0  # a lease not refreshed for this long is stale (owner frozen or on a lost host)
# Workers on other hosts judge the heartbeat with their own clocks: they allow for skew, and refuse only a
# lease silent for this long (the same host always knows at once whether the owner's pid is alive).
WORKER_STALE_AFTER_SECONDS = 600.0


def _path(location: str) -> str:
    return location.rstrip("/") + "/" + LEASE_FILE


def _is_local(location: str) -> bool:
    return "://" not in location or location.startswith("file://")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a reused pid from the owner), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _process_start(pid) in (None, started)


def describe(record: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"run {record.get('token', '?')[:8]} (pid {record.get('pid')} on {record.get('host')}, since {since})"


def is_live(record: dict | None, now: float | None = None, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether a lease record still belongs to a running owner."""
    if not record:
        return False
    now = time.time() if now is None else now
    if now - float(record.get("heartbeat", 0)) > stale_after:
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        return _alive_here(record["pid"], record.get("pid_start"))
    return True


def read(location: str, storage_options: tuple = ()) -> dict | None:
    """The lease record at an output location, or None if there is none (or it is unreadable)."""
    fs, path = store._fs(_path(location), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None


def check_owner(location: str, token: str, storage_options: tuple = ()) -> None:
    """Raise :class:`RunEnded` unless the run ``token`` holds a live lease on ``location`` (workers call
    this right before marking a task done)."""
    record = read(location, storage_options)
    if record is None or record.get("token") != token:
        owner = "no run" if record is None else describe(record)
        raise RunEnded(f"the run that submitted this task no longer owns {location!r} (now: {owner}); "
                       f"its results are dropped")
    if not is_live(record, stale_after=WORKER_STALE_AFTER_SECONDS):
        raise RunEnded(f"the run that submitted this task has ended ({describe(record)}); "
                       f"its results are dropped")


@dataclass
class Lease:
    """A held lease: refresh it with :meth:`start_heartbeat`, give it back with :meth:`release`."""

    location: str
    storage_options: tuple
    record: dict
    created_dir: str | None  # the outermost directory taking the lease created (removed again if empty)
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.record["token"]

    def _write(self) -> None:
        fs, path = store._fs(_path(self.location), self.storage_options)
        data = json.dumps(self.record).encode()
        if _is_local(self.location):  # replace atomically: a reader never sees half a record
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)

    def refresh(self) -> None:
        self.record["heartbeat"] = time.time()
        self._write()

    def start_heartbeat(self, interval: float = HEARTBEAT_SECONDS) -> None:
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(interval):
                try:
                    current = read(self.location, self.storage_options)
                    if current is None or current.get("token") != self.token:
                        return  # taken over (we were frozen past the stale limit): never write over it
                    self.refresh()
                except OSError:
                    pass  # a transient store error: try again at the next beat

        self._thread = threading.Thread(target=beat, name="kgrad-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Delete the lease (if still ours), and the output directory if taking the lease made it and it
        is empty.  Safe to call twice."""
        if self._stop is not None:
            self._stop.set()
        fs, path = store._fs(_path(self.location), self.storage_options)
        try:
            current = read(self.location, self.storage_options)
            if current is not None and current.get("token") == self.token:
                fs.rm_file(path)
            if self.created_dir and _is_local(self.location):
                directory = os.path.abspath(self.location.removeprefix("file://"))
                top = os.path.abspath(self.created_dir)
                while True:  # the directories taking the lease made, innermost first, while empty
                    try:
                        os.rmdir(directory)
                    except OSError:
                        break  # the run wrote an output there (or somebody else wrote): keep it
                    if directory == top:
                        break
                    directory = os.path.dirname(directory)
        except OSError:
            pass


def _first_missing(fs, root: str) -> str | None:
    """The outermost directory of ``root`` (itself included) that does not exist yet, or None."""
    missing = None
    path = root.rstrip("/")
    while path and not fs.exists(path):
        missing = path
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent == path:
            break
        path = parent
    return missing


def _move_aside(path: str, stale: dict, token: str) -> bool:
    """Move the stale lease ``stale`` out of the way; False if the file there was no longer that lease.

    Of several takers only one rename succeeds; and a taker that read the stale record before another
    replaced it with a live lease puts that live lease back instead of deleting it."""
    aside = f"{path}.stale-{token[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        with open(aside) as f:
            moved = json.load(f)
    except (OSError, ValueError):
        moved = None
    if moved is not None and moved.get("token") != stale.get("token"):
        try:
            os.link(aside, path)  # a live lease taken over meanwhile: give it back
        except FileExistsError:
            pass
        os.unlink(aside)
        return False
    os.unlink(aside)
    return True


def acquire(location: str, storage_options: tuple = (), stale_after: float = STALE_AFTER_SECONDS) -> Lease:
    """Take the lease on an output location (creating its directory if needed), or raise
    :class:`InputError` naming the run that holds it."""
    now = time.time()
    pid = os.getpid()
    record = {"token": uuid.uuid4().hex, "pid": pid, "pid_start": _process_start(pid),
              "host": socket.gethostname(), "started": now, "heartbeat": now}
    fs, root = store._fs(location, storage_options)
    created = _first_missing(fs, root)
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {location!r} cannot be created ({exc}); check the path and its "
                         f"permissions") from None
    lease = Lease(location, storage_options, record, created)
    path = store._fs(_path(location), storage_options)[1]
    for _ in range(3):
        current = read(location, storage_options)
        if current is not None and is_live(current, stale_after=stale_after):
            raise InputError(f"output {location!r} is being written by another kgrad {describe(current)}; "
                             f"wait for it to finish (a dead run's lease expires after {stale_after:.0f} s)")
        if _is_local(location):
            if current is not None and not _move_aside(path, current, record["token"]):
                continue
            tmp = f"{path}.{record['token'][:8]}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f)
            try:
                os.link(tmp, path)  # fails if another run created the lease meanwhile
            except FileExistsError:
                continue
            finally:
                os.unlink(tmp)
            return lease
        lease._write()
        time.sleep(0.2)
        mine = read(location, storage_options)
        if mine is not None and mine.get("token") == record["token"]:
            return lease
    current = read(location, storage_options)
    raise InputError(f"output {location!r} is being written by another kgrad "
                     f"{describe(current) if current else 'run'}; wait for it to finish")
