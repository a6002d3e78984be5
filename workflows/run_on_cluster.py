"""Run a kgrad job on your own dask cluster: copy this script and edit the CONFIG below.

    python workflows/run_on_cluster.py tcp://scheduler-host:8786
    python workflows/run_on_cluster.py /shared/scheduler.json          # a dask scheduler file
    python workflows/run_on_cluster.py local                           # a local cluster on this machine

The workers read the inputs and write the output themselves, so every path here must be visible to
every worker (a shared filesystem, or an object-store URL such as s3://bucket/points.zarr together with
``storage_options``).  Interrupted?  Run the same command with ``--resume``: finished chunks are kept.
"""

import argparse
import sys

import numpy as np
import zarr

from pipeline.errors import InputError
from pipeline.workflow import RunConfig, prepare, run_prepared

CONFIG = RunConfig(
    points="demo-data/blobs.zarr",  # zarr array / group with 'points' (+ 'weights') / .npy / URL
    kernel="matern52",
    lengthscale=0.5,
    variance=1.0,
    dtype="float32",
    out="out/cluster-run.zarr",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the CONFIG job on a dask cluster.")
    parser.add_argument("scheduler", nargs="?", default="local",
                        help="scheduler address, scheduler file, or 'local'")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    config = CONFIG.replace(scheduler=args.scheduler, resume=args.resume, overwrite=args.overwrite)
    try:
        prepared = prepare(config)  # validates every input and plans; writes nothing
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"plan: {prepared.plan.n_tasks} tasks, {prepared.plan.task_memory_bytes / 2**20:.0f} MiB per task")
    run_prepared(prepared)
    gradient = zarr.open_group(config.out, mode="r")["gradient"][:]  # or xarray.open_zarr(config.out)
    norms = np.linalg.norm(gradient, axis=1)
    print(f"{config.out}: |gradient| median {np.median(norms):.4g}, max {norms.max():.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
