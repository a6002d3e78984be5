#!/usr/bin/env bash
# Start one dask worker per GPU on this machine for kgrad, attached to an existing scheduler; runs in the
# foreground until Ctrl-C / SIGTERM, which stops every worker it started.
#
# Usage:
#     cluster/gpu_workers.sh SCHEDULER          # tcp://host:8786, tls://host:8786 or a scheduler file
#     kgrad run --points P --out OUT --scheduler SCHEDULER      # from anywhere that reaches the scheduler
#
# Each worker: one process (under a nanny) and one thread, sees exactly one GPU, advertises the dask
# resource GPU=1, and starts with
#     XLA_PYTHON_CLIENT_PREALLOCATE=false   JAX takes GPU memory as needed, not 75% of it up front
#     and the worker environment of `python -m pipeline.cluster env` (MALLOC_TRIM_THRESHOLD_ and
#     MALLOC_MMAP_THRESHOLD_ at 268435456, one OpenMP/OpenBLAS thread; see pipeline/cluster.py)
# The workers need JAX with CUDA (pip install 'kgrad[gpu]', i.e. jax[cuda12]) in their Python.
#
# Environment:
#     GPUS            comma-separated GPU indices (default: every GPU that `nvidia-smi -L` lists)
#     USE_DASK_CUDA   auto (default: `dask cuda worker` if dask-cuda is installed), 1, or 0 (one plain
#                     `dask worker` per GPU with CUDA_VISIBLE_DEVICES set to that GPU; no dask-cuda needed)
#     MEMORY_LIMIT    host memory per worker (default auto: the machine's memory / number of GPUs)
#     TLS_DIR         certificates from cluster/make-tls-certs.sh: workers use TLS (worker.pem/worker.key)
#     LOCAL_DIRECTORY workers' scratch directory (default: dask's)
#     PYTHON, DASK    interpreter (with kgrad's dependencies) / dask command (default: this repo's
#                     .venv if present, else PATH)
#     DRY_RUN=1       print the commands instead of running them
set -euo pipefail

if [ $# -ne 1 ]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
SCHEDULER=$1
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${DASK:-}" ]; then
    if [ -x "$(dirname "$PYTHON")/dask" ]; then DASK="$(dirname "$PYTHON")/dask"; else DASK=dask; fi
fi

if [ -z "${GPUS:-}" ]; then
    command -v nvidia-smi >/dev/null || { echo "gpu_workers: nvidia-smi not found; set GPUS=0,1,..." >&2; exit 1; }
    GPUS=$(nvidia-smi -L | sed -n 's/^GPU \([0-9][0-9]*\):.*/\1/p' | paste -sd, -)
fi
[ -n "$GPUS" ] || { echo "gpu_workers: no GPUs found" >&2; exit 1; }
case $GPUS in *[!0-9,]*) echo "gpu_workers: GPUS=$GPUS must be indices like 0,1,2" >&2; exit 2;; esac
IFS=, read -r -a GPU_LIST <<<"$GPUS"
NGPUS=${#GPU_LIST[@]}

if [ -f "$SCHEDULER" ]; then
    TARGET=(--scheduler-file "$SCHEDULER")
else
    TARGET=("$SCHEDULER")
fi
if [ -z "${MEMORY_LIMIT:-}" ]; then  # each `dask worker` would otherwise count the whole machine as its own
    MEMORY_LIMIT=$(awk -v n="$NGPUS" '/^MemTotal:/ {printf "%.0f", $2 * 1024 / n}' /proc/meminfo)
fi
COMMON=(--nthreads 1 --resources GPU=1 --death-timeout 120 --memory-limit "$MEMORY_LIMIT")
[ -z "${LOCAL_DIRECTORY:-}" ] || COMMON+=(--local-directory "$LOCAL_DIRECTORY")
if [ -n "${TLS_DIR:-}" ]; then
    for f in ca.pem worker.pem worker.key; do
        [ -r "$TLS_DIR/$f" ] || { echo "gpu_workers: $TLS_DIR/$f missing; see cluster/make-tls-certs.sh" >&2; exit 2; }
    done
    COMMON+=(--tls-ca-file "$TLS_DIR/ca.pem" --tls-cert "$TLS_DIR/worker.pem" --tls-key "$TLS_DIR/worker.key")
fi

export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The worker environment (MALLOC_*_THRESHOLD_, OMP/OPENBLAS threads), defined once in pipeline/cluster.py.
WORKER_ENV=$(cd "$HERE/.." && "$PYTHON" -m pipeline.cluster env --shell) || {
    echo "$(basename "$0"): '$PYTHON -m pipeline.cluster env --shell' failed;" \
         "set PYTHON to a python with kgrad's dependencies" >&2
    exit 1
}
eval "$WORKER_ENV"

use_dask_cuda=${USE_DASK_CUDA:-auto}
if [ "$use_dask_cuda" = auto ]; then
    if "$PYTHON" -c "import dask_cuda" 2>/dev/null; then use_dask_cuda=1; else use_dask_cuda=0; fi
fi

run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "$use_dask_cuda" = 1 ]; then
    # dask-cuda starts one worker per GPU in CUDA_VISIBLE_DEVICES and rotates that list per worker so that
    # each worker's own GPU comes first; JAX_CUDA_VISIBLE_DEVICES=0 keeps JAX on that GPU alone (it would
    # otherwise open a context on every visible GPU in every worker).
    export CUDA_VISIBLE_DEVICES=$GPUS JAX_CUDA_VISIBLE_DEVICES=0
    echo "gpu_workers: dask cuda worker on GPUs $GPUS -> $SCHEDULER" >&2
    run exec "$DASK" cuda worker "${TARGET[@]}" "${COMMON[@]}"
    exit 0
fi

PIDS=()
stop() {
    trap - INT TERM EXIT
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

host=$(hostname -s 2>/dev/null || hostname)
for gpu in "${GPU_LIST[@]}"; do
    echo "gpu_workers: worker gpu-$host-$gpu on GPU $gpu -> $SCHEDULER" >&2
    if [ "${DRY_RUN:-0}" = 1 ]; then
        run env CUDA_VISIBLE_DEVICES="$gpu" "$DASK" worker "${TARGET[@]}" --nworkers 1 --name "gpu-$host-$gpu" "${COMMON[@]}"
        continue
    fi
    # setsid: its own process group (nanny + worker process), stopped as a whole by stop()
    CUDA_VISIBLE_DEVICES=$gpu setsid "$DASK" worker "${TARGET[@]}" --nworkers 1 --name "gpu-$host-$gpu" \
        "${COMMON[@]}" </dev/null &
    PIDS+=("$!")
done
[ "${DRY_RUN:-0}" = 1 ] && exit 0
echo "gpu_workers: $NGPUS workers started (pids ${PIDS[*]}); Ctrl-C stops them" >&2
# Return as soon as any worker exits (then stop the others), so a supervisor sees the failure.
wait -n
status=$?
echo "gpu_workers: a worker exited with status $status; stopping the others" >&2
exit "$status"
