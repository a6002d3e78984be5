#!/usr/bin/env python
"""A dask cluster on SLURM for kgrad (dask-jobqueue's SLURMCluster): the scheduler runs here (a login
node, or inside a small batch job), each SLURM job runs one dask worker.

    python cluster/slurm_cluster.py --jobs 8 --cpus 16 --memory 64GiB --walltime 02:00:00 \\
        --queue compute --account myproject                                  # serve until Ctrl-C
    kgrad run --points P --out OUT --scheduler ~/.kgrad/slurm-scheduler.json # from another shell

    python cluster/slurm_cluster.py --jobs 8 ... -- --points P --out OUT     # one run, then stop
    python cluster/slurm_cluster.py --jobs 8 ... --print-job-script           # show the sbatch script only

Requirements: ``pip install dask-jobqueue``; ``sbatch``/``squeue``/``scancel`` here; on the compute nodes the
same Python environment with kgrad installed (``--python``, default: this interpreter's path); inputs and
outputs on storage the nodes see (a shared filesystem or an object store, see cluster/README.md).

One worker per job: ``--cpus`` CPUs are booked for it (``#SBATCH --cpus-per-task``), ``--memory`` is both the
job's memory and the worker's limit, and the worker runs ``--nthreads`` dask threads (default 1: each kgrad
task already keeps XLA's thread pool busy; measure before raising it).  The job exports
MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_=268435456 before `dask worker` starts (the nanny passes them on
to its worker process instead of its default 65536).  ``--gpus 1`` books a GPU per job and advertises the
dask resource GPU=1 (see cluster/gpu_workers.sh for the XLA settings).

TLS: ``--tls-dir DIR`` (from cluster/make-tls-certs.sh DIR SCHEDULER-HOST) makes scheduler, workers and the
kgrad client use TLS; DIR must be readable on the compute nodes at the same path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_common import WORKER_ENV, script_parser, serve, split_kgrad_args, tls_files  # noqa: E402


def parse(argv=None):
    argv, kgrad_args = split_kgrad_args(argv)
    p = script_parser(__doc__)
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs = dask workers (default 2)")
    p.add_argument("--cpus", type=int, default=4, help="CPUs booked per job (default 4)")
    p.add_argument("--nthreads", type=int, default=1, help="dask threads of each worker (default 1)")
    p.add_argument("--memory", default="16GiB", help="memory per job = per worker (default 16GiB)")
    p.add_argument("--walltime", default="01:00:00", help="per job, HH:MM:SS (default 01:00:00)")
    p.add_argument("--queue", help="partition (#SBATCH -p)")
    p.add_argument("--account", help="account to charge (#SBATCH -A)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per job (adds --gres=gpu:N and GPU=N)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch=--constraint=avx512 (repeatable)")
    p.add_argument("--prologue", action="append", default=[], metavar="LINE",
                   help="extra shell line run before the worker, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--python", help="python on the compute nodes (default: this interpreter's path)")
    p.add_argument("--interface", help="network interface for scheduler and workers, e.g. ib0")
    p.add_argument("--local-directory", default="$TMPDIR", help="workers' scratch (default $TMPDIR)")
    p.add_argument("--log-directory", help="where SLURM writes the jobs' output")
    p.add_argument("--tls-dir", help="certificates from cluster/make-tls-certs.sh")
    p.add_argument("--scheduler-file", default=str(Path.home() / ".kgrad" / "slurm-scheduler.json"),
                   help="where to write the scheduler address (default ~/.kgrad/slurm-scheduler.json)")
    p.add_argument("--print-job-script", action="store_true", help="print the job script and exit")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="before serving, wait up to SECONDS for the first worker (default 0: don't)")
    args = p.parse_args(argv)
    if min(args.jobs, args.cpus, args.nthreads) < 1 or args.gpus < 0:
        p.error("--jobs, --cpus and --nthreads must be >= 1, --gpus >= 0")
    return args, kgrad_args


def cluster_kwargs(args) -> dict:
    """SLURMCluster keyword arguments for one single-process worker per job."""
    directives = list(args.sbatch)  # --cpus-per-task comes from job_cpu
    worker_args = []
    if args.gpus:
        directives.append(f"--gres=gpu:{args.gpus}")
        worker_args += ["--resources", f"GPU={args.gpus}"]
    prologue = [f"export {k}={v}" for k, v in WORKER_ENV.items()]
    if args.gpus:
        prologue.append("export XLA_PYTHON_CLIENT_PREALLOCATE=false")
    prologue += args.prologue
    kwargs = dict(
        cores=args.nthreads,          # dask threads of the worker (jobqueue's "cores")
        processes=1,                  # one worker process per job
        job_cpu=args.cpus,            # CPUs booked in SLURM (#SBATCH --cpus-per-task)
        memory=args.memory,           # job memory = the worker's memory limit
        walltime=args.walltime,
        queue=args.queue,
        account=args.account,
        job_extra_directives=directives,
        job_script_prologue=prologue,
        worker_extra_args=worker_args,
        local_directory=args.local_directory,
        log_directory=args.log_directory,
        interface=args.interface,
        python=args.python or sys.executable,
        job_name="kgrad-worker",
        death_timeout=120,
    )
    if args.tls_dir:
        from distributed.security import Security

        f = tls_files(args.tls_dir)
        kwargs["protocol"] = "tls://"
        kwargs["security"] = Security(
            tls_ca_file=f["ca.pem"], tls_scheduler_cert=f["scheduler.pem"], tls_scheduler_key=f["scheduler.key"],
            tls_worker_cert=f["worker.pem"], tls_worker_key=f["worker.key"],
            tls_client_cert=f["client.pem"], tls_client_key=f["client.key"], require_encryption=True)
    return {k: v for k, v in kwargs.items() if v is not None}


def main(argv=None) -> int:
    args, kgrad_args = parse(argv)
    import dask

    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise SystemExit("slurm_cluster.py needs dask-jobqueue: pip install dask-jobqueue") from None
    with dask.config.set({"distributed.scheduler.allowed-failures": 5}):
        cluster = SLURMCluster(scheduler_options={"dashboard_address": ":8787"}, **cluster_kwargs(args))
        try:
            if args.print_job_script:
                print(cluster.job_script())
                return 0
            cluster.scale(jobs=args.jobs)
            if args.wait:
                from distributed import Client

                with Client(cluster) as client:
                    client.wait_for_workers(1, timeout=args.wait)
            return serve(cluster.scheduler_address, kgrad_args, tls_dir=args.tls_dir,
                         scheduler_file=args.scheduler_file)
        finally:
            cluster.close()


if __name__ == "__main__":
    sys.exit(main())
