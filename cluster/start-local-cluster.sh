#!/usr/bin/env bash
# Start a real dask cluster on loopback with the dask CLI: one scheduler and N worker processes
# (each under a nanny, one thread each), for kgrad runs with `--scheduler STATE_DIR/scheduler.json`.
# Every socket they listen on (scheduler, nannies, workers, and the HTTP servers that dask starts even
# with --no-dashboard) is bound to 127.0.0.1 (tests/test_loopback.py).
#
# Loopback is not authentication: any account on this host can reach those ports, and a dask client
# that reaches a scheduler runs code as its owner.  So the cluster speaks TLS only, with mutual
# authentication, on credentials made for it alone by cluster/make-tls-certs.sh into STATE_DIR/tls/
# (directory 700, every file 600: only the user who started it can read them).  A client without them
# is refused at the handshake (tests/test_local_cluster_security.py).  kgrad finds them by itself when
# given the scheduler file (STATE_DIR/tls/ beside it); other clients pass them as dask's Security.
#
# Usage:
#     cluster/start-local-cluster.sh STATE_DIR [NWORKERS]        # NWORKERS defaults to 2
#     kgrad run --points P --out OUT --scheduler STATE_DIR/scheduler.json
#     cluster/stop-local-cluster.sh STATE_DIR
#
# STATE_DIR (created if needed) receives:
#     scheduler.json    the scheduler file (address) that clients and workers read
#     scheduler.pid     pid of `dask scheduler` (also its process group: it runs in its own session)
#     worker.pid        pid of `dask worker` (its own session too; its nannies and worker processes
#                       are in that process group, so `kill -- -PID` reaches all of them)
#     tls/              the cluster's CA and the scheduler's, workers' and client's certificates and keys
#     scheduler.log, worker.log
#     worker-space/     the workers' local directory
#
# The script returns (exit 0) once NWORKERS workers are connected to the scheduler, and exits 1 (after
# stopping what it started) if they are not up within START_TIMEOUT seconds (default 60).
#
# Environment:
#     DASK              the dask command (default: `dask` next to PYTHON, else on PATH)
#     PYTHON            a python with kgrad's dependencies installed (default: the one next to this
#                       repo's .venv, else python3), used to print the worker environment and to wait
#                       for the workers
#     MEMORY_LIMIT      per worker process (default: auto)
#     START_TIMEOUT     seconds to wait for the workers (default 60)
#     ALLOWED_FAILURES  distributed.scheduler.allowed-failures (default 5, as kgrad's local cluster)
#
# Workers start with the environment of `python -m pipeline.cluster env` (pipeline/cluster.py):
# MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ at 256 MiB (the nanny passes the first on instead of
# its default 65536): with the defaults every multi-MB XLA temporary is mapped and unmapped again, and
# tiles run several times slower (see docs/design.md).  Workers exit by themselves if the
# scheduler is gone for 60 s (--death-timeout), so a crashed test run leaves nothing behind for long.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    sed -n '14,17p' "$0" >&2
    exit 2
fi
STATE_DIR=$1
NWORKERS=${2:-2}
case $NWORKERS in ''|*[!0-9]*|0) echo "start-local-cluster: NWORKERS=$NWORKERS must be a whole number >= 1" >&2; exit 2;; esac

HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${DASK:-}" ]; then
    if [ -x "$(dirname "$PYTHON")/dask" ]; then DASK="$(dirname "$PYTHON")/dask"; else DASK=dask; fi
fi
START_TIMEOUT=${START_TIMEOUT:-60}
MEMORY_LIMIT=${MEMORY_LIMIT:-auto}

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
SCHEDULER_FILE=$STATE_DIR/scheduler.json
if [ -s "$STATE_DIR/scheduler.pid" ] && kill -0 "$(cat "$STATE_DIR/scheduler.pid")" 2>/dev/null; then
    echo "start-local-cluster: a scheduler from $STATE_DIR is still running (pid $(cat "$STATE_DIR/scheduler.pid")); stop it first" >&2
    exit 2
fi
rm -f "$SCHEDULER_FILE" "$STATE_DIR/scheduler.pid" "$STATE_DIR/worker.pid"

# The worker environment (MALLOC_*_THRESHOLD_, OMP/OPENBLAS threads), defined once in pipeline/cluster.py.
WORKER_ENV=$(cd "$HERE/.." && "$PYTHON" -m pipeline.cluster env --shell) || {
    echo "$(basename "$0"): '$PYTHON -m pipeline.cluster env --shell' failed;" \
         "set PYTHON to a python with kgrad's dependencies" >&2
    exit 1
}
eval "$WORKER_ENV"

# Credentials for this cluster alone, readable only by this user (made anew at each start).
TLS=$STATE_DIR/tls
rm -rf "$TLS"
"$HERE/make-tls-certs.sh" "$TLS" >/dev/null || { echo "start-local-cluster: could not make TLS certificates in $TLS" >&2; exit 1; }
export DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=${ALLOWED_FAILURES:-5}

# setsid: each in its own session and process group (pid == pgid), so that stopping it stops all its
# children and a signal sent to the caller's group does not reach the cluster.  In a non-interactive
# shell a background job is not a group leader, so setsid does not fork and $! is the dask process.
setsid "$DASK" scheduler --protocol tls --host 127.0.0.1 --port 0 \
    --tls-ca-file "$TLS/ca.pem" --tls-cert "$TLS/scheduler.pem" --tls-key "$TLS/scheduler.key" --no-dashboard --dashboard-address 127.0.0.1:0 --scheduler-file "$SCHEDULER_FILE" \
    >"$STATE_DIR/scheduler.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/scheduler.pid"

stop_all() {
    "$HERE/stop-local-cluster.sh" "$STATE_DIR" >/dev/null 2>&1 || true
}

deadline=$((SECONDS + START_TIMEOUT))
while [ ! -s "$SCHEDULER_FILE" ]; do
    if ! kill -0 "$(cat "$STATE_DIR/scheduler.pid")" 2>/dev/null; then
        echo "start-local-cluster: the scheduler exited; see $STATE_DIR/scheduler.log:" >&2
        tail -n 20 "$STATE_DIR/scheduler.log" >&2
        stop_all; exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "start-local-cluster: no scheduler file after ${START_TIMEOUT}s" >&2
        stop_all; exit 1
    fi
    sleep 0.1
done

setsid "$DASK" worker --scheduler-file "$SCHEDULER_FILE" --nworkers "$NWORKERS" --nthreads 1 \
    --tls-ca-file "$TLS/ca.pem" --tls-cert "$TLS/worker.pem" --tls-key "$TLS/worker.key" \
    --host 127.0.0.1 --no-dashboard --dashboard-address 127.0.0.1:0 --memory-limit "$MEMORY_LIMIT" --death-timeout 60 \
    --local-directory "$STATE_DIR/worker-space" >"$STATE_DIR/worker.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/worker.pid"

left=$((deadline - SECONDS)); [ $left -gt 1 ] || left=1
if ! "$PYTHON" - "$SCHEDULER_FILE" "$NWORKERS" "$left" "$TLS" <<'EOF'
import sys
from distributed import Client
from distributed.security import Security

scheduler_file, n, timeout, tls = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
security = Security(tls_ca_file=f"{tls}/ca.pem", tls_client_cert=f"{tls}/client.pem",
                    tls_client_key=f"{tls}/client.key", require_encryption=True)
with Client(scheduler_file=scheduler_file, timeout=timeout, security=security) as client:
    client.wait_for_workers(n, timeout=timeout)
EOF
then
    echo "start-local-cluster: $NWORKERS workers did not connect within ${START_TIMEOUT}s; see $STATE_DIR/worker.log:" >&2
    tail -n 20 "$STATE_DIR/worker.log" >&2
    stop_all; exit 1
fi
echo "start-local-cluster: scheduler $(cat "$STATE_DIR/scheduler.pid"), $NWORKERS workers under $(cat "$STATE_DIR/worker.pid"); scheduler file $SCHEDULER_FILE (TLS; credentials in $TLS)"
