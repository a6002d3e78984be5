#!/usr/bin/env bash
# kgrad's GPU benchmark subset, as one short script for a machine with one NVIDIA GPU.
#
#   OUT=/some/dir bash benchmarks/gpu.sh
#
# Runs `benchmarks/run.py --gpu`: the fused exp+sum ceiling on the GPU; kgrad in-process
# (pipeline.kernel_gradients) and kgrad end to end (`python -m pipeline run`, local cluster with ONE
# worker on the GPU, zarr in and out, start-up included; a second run with the compilation cache warm,
# and one with larger tiles) for N = 10^6 points, M = N sources, D = 3, RBF, float32, value + gradient;
# KeOps too if pykeops finds CUDA.  The tables set these against KeOps' published figure for a Gaussian
# kernel sum, N = 10^6, D = 3: 1.38 s on an RTX 2080 Ti.
#
# Installs nothing and reaches no network.  Needs an interpreter with jax (CUDA build), numpy, dask,
# distributed, zarr, psutil and matplotlib:
#   PYTHON=/path/to/python   default: .venv/bin/python if it exists, else python3
#   GPU_N=1000000            points (default 10^6)
#   GPU_DEADLINE=420         start no new step after this many seconds (the whole run stays < 10 min)
# Writes into $OUT (default benchmarks/results/gpu): results.json, BENCHMARKS.md, throughput.png,
# nvidia-smi.txt, run.log.  Exit 3: JAX has no GPU backend here; 1: a measurement failed (see results.json).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false          # in-process run and the dask worker share the GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # `pipeline` importable without `pip install -e .`
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
if ! "$PYTHON" -c 'import jax, sys; print(jax.devices()); sys.exit(jax.default_backend() != "gpu")'; then
    echo "gpu.sh: JAX under $PYTHON has no GPU backend (needs a CUDA jaxlib); nothing run" >&2
    exit 3
fi
timeout 580 "$PYTHON" benchmarks/run.py --gpu --gpu-n "${GPU_N:-1000000}" \
    --gpu-deadline "${GPU_DEADLINE:-420}" --out "$OUT" 2>&1 | tee "$OUT/run.log"
