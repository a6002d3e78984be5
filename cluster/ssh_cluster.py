#!/usr/bin/env python
"""A dask cluster over SSH for kgrad (distributed.deploy.ssh.SSHCluster): scheduler on the first host,
workers on the others.

    python cluster/ssh_cluster.py node1 node2 node3 [options]                 # serve until Ctrl-C
    kgrad run --points P --out OUT --scheduler ~/.kgrad/ssh-scheduler.json    # from another shell

    python cluster/ssh_cluster.py node1 node2 node3 [options] -- --points P --out OUT   # one run, then stop

Requirements: password-less SSH (keys or an agent) from here to every host; on every host the same Python
environment with kgrad installed (``--remote-python``) and the ``asyncssh`` package here
(``pip install asyncssh``); inputs and outputs on storage every host sees (a shared filesystem or an
object store such as s3://, see cluster/README.md).  With a single host it runs the scheduler and the
workers there.

Workers: ``--nworkers`` processes per host (default 1), each with ``--nthreads`` dask threads (default 1:
XLA already uses several cores per task; measure before raising it), ``--memory-limit`` each, started with
MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ = 256 MiB (through the nanny's pre-spawn-environ, which
SSHCluster hands to the remote processes with the rest of this process's dask configuration).

TLS: ``--tls-dir DIR`` (from cluster/make-tls-certs.sh DIR HOSTS...) makes scheduler, workers and clients
require TLS; the same files must exist at the same absolute paths on every host.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_common import WORKER_ENV, script_parser, serve, split_kgrad_args, tls_config  # noqa: E402


def parse(argv=None):
    argv, kgrad_args = split_kgrad_args(argv)
    p = script_parser(__doc__)
    p.add_argument("hosts", nargs="+", help="scheduler host first, then worker hosts")
    p.add_argument("--nworkers", type=int, default=1, help="worker processes per worker host (default 1)")
    p.add_argument("--nthreads", type=int, default=1, help="dask threads per worker process (default 1)")
    p.add_argument("--memory-limit", default="auto", help="per worker process, e.g. 16GiB (default auto)")
    p.add_argument("--remote-python", help="python on the hosts (default: this interpreter's path)")
    p.add_argument("--ssh-user", help="SSH user name (default: ~/.ssh/config or the current user)")
    p.add_argument("--ssh-key", help="SSH private key file (default: the agent / ~/.ssh defaults)")
    p.add_argument("--ssh-port", type=int, help="SSH port on every host (default 22 / ~/.ssh/config)")
    p.add_argument("--ssh-known-hosts", help="known_hosts file to check host keys against "
                                             "(default ~/.ssh/known_hosts)")
    p.add_argument("--port", type=int, default=8786, help="scheduler port (default 8786; 0: any free port)")
    p.add_argument("--dashboard", default=":8787", help="scheduler dashboard address (default :8787)")
    p.add_argument("--local-directory", help="workers' scratch directory on each host")
    p.add_argument("--tls-dir", help="certificates from cluster/make-tls-certs.sh (same paths on every host)")
    p.add_argument("--scheduler-file", default=str(Path.home() / ".kgrad" / "ssh-scheduler.json"),
                   help="where to write the scheduler address (default ~/.kgrad/ssh-scheduler.json)")
    args = p.parse_args(argv)
    if args.nworkers < 1 or args.nthreads < 1:
        p.error("--nworkers and --nthreads must be >= 1")
    return args, kgrad_args


def main(argv=None) -> int:
    args, kgrad_args = parse(argv)
    import dask
    from distributed import SSHCluster
    from distributed.security import Security

    hosts = args.hosts if len(args.hosts) > 1 else args.hosts * 2  # one host: scheduler and workers there
    config = {"distributed.nanny.pre-spawn-environ": dict(WORKER_ENV),
              "distributed.scheduler.allowed-failures": 5}
    scheduler_options = {"port": args.port, "dashboard_address": args.dashboard}
    if args.tls_dir:
        config.update(tls_config(args.tls_dir))
        scheduler_options["protocol"] = "tls"
    worker_options = {"n_workers": args.nworkers, "nthreads": args.nthreads, "memory_limit": args.memory_limit}
    if args.local_directory:
        worker_options["local_directory"] = args.local_directory
    connect_options: dict = {}  # host keys are checked against ~/.ssh/known_hosts (asyncssh default)
    if args.ssh_user:
        connect_options["username"] = args.ssh_user
    if args.ssh_key:
        connect_options["client_keys"] = [args.ssh_key]
    if args.ssh_port:
        connect_options["port"] = args.ssh_port
    if args.ssh_known_hosts:
        connect_options["known_hosts"] = args.ssh_known_hosts
    with dask.config.set(config):  # remote scheduler and workers inherit this configuration
        cluster = SSHCluster(hosts, connect_options=connect_options, worker_options=worker_options,
                             scheduler_options=scheduler_options,
                             remote_python=args.remote_python or sys.executable,
                             security=Security() if args.tls_dir else None)
        try:
            return serve(cluster.scheduler_address, kgrad_args, tls_dir=args.tls_dir,
                         scheduler_file=args.scheduler_file)
        finally:
            cluster.close()


if __name__ == "__main__":
    sys.exit(main())
