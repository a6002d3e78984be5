#!/usr/bin/env bash
# Stop a cluster started by cluster/start-local-cluster.sh: workers first, then the scheduler.
#
# Usage:
#     cluster/stop-local-cluster.sh STATE_DIR
#
# Each of worker.pid and scheduler.pid in STATE_DIR names a process that start-local-cluster.sh started
# as the leader of its own process group.  The whole group gets SIGTERM, then SIGKILL if anything in it
# is still alive after STOP_TIMEOUT seconds (default 10).  Exits 0 when nothing of either group is left
# (also when it was already stopped), 1 if something survived SIGKILL.  The pid files are removed.
set -uo pipefail

if [ $# -ne 1 ]; then
    sed -n '2,5p' "$0" >&2
    exit 2
fi
STATE_DIR=$1
STOP_TIMEOUT=${STOP_TIMEOUT:-10}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

stop_group() {  # stop_group PIDFILE
    local pidfile=$1 pgid
    [ -s "$pidfile" ] || return 0
    pgid=$(cat "$pidfile")
    case $pgid in ''|*[!0-9]*) echo "stop-local-cluster: $pidfile holds no pid" >&2; return 1;; esac
    if [ -r "/proc/$pgid/cmdline" ] && ! tr '\0' ' ' <"/proc/$pgid/cmdline" | grep -q dask; then
        echo "stop-local-cluster: pid $pgid is no longer a dask process; not signalling it" >&2
        rm -f "$pidfile"
        return 0
    fi
    if group_alive "$pgid"; then
        kill -TERM -- "-$pgid" 2>/dev/null
        local deadline=$((SECONDS + STOP_TIMEOUT))
        while group_alive "$pgid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        if group_alive "$pgid"; then
            kill -KILL -- "-$pgid" 2>/dev/null
            for _ in $(seq 50); do group_alive "$pgid" || break; sleep 0.1; done
        fi
    fi
    if group_alive "$pgid"; then
        echo "stop-local-cluster: process group $pgid ($pidfile) survived SIGKILL" >&2
        return 1
    fi
    rm -f "$pidfile"
}

status=0
stop_group "$STATE_DIR/worker.pid" || status=1
stop_group "$STATE_DIR/scheduler.pid" || status=1
[ $status -ne 0 ] || rm -f "$STATE_DIR/scheduler.json"
exit $status
