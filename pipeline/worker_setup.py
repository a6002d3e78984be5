"""What each of kgrad's local workers runs as it starts (distributed's worker preload,
:data:`pipeline.cluster.WORKER_PRELOAD`).

Ctrl-C in a terminal reaches the whole process group.  The client handles it (cancels the run, closes the
cluster); the local workers ignore it, or each would print its own KeyboardInterrupt traceback.  A worker
started while the client runs in its main thread inherits an ignored SIGINT (:func:`pipeline.cluster.local_cluster`);
one started from a background thread (:class:`pipeline.cluster.StartingCluster`) cannot, so every local
worker also ignores it here.  The modules its tasks need are imported here too, while the client plans.
"""

from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    from . import worker as _tasks  # noqa: F401  (kgrad's task code, imported before the first task)
