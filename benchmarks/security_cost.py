"""What the local cluster's TLS costs (issue: loopback is not authentication).

kgrad's local cluster (pipeline.cluster.local_cluster) speaks TLS on credentials made for it at start-up
(distributed's ``Security.temporary()``).  This measures, alternating the order, the same 2-worker
LocalCluster with and without that security: start-up (to both workers connected) and 200 tiny-task round
trips (what a run's small task messages cost).  Medians of ``--repeats`` (default 6) each.

    python benchmarks/security_cost.py            # -> benchmarks/results/security_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _measure(secure: bool) -> tuple[float, float]:
    from distributed import Client, LocalCluster
    from distributed.security import Security

    started = time.perf_counter()
    extra = {"security": Security.temporary()} if secure else {}
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", **extra)
    client = Client(cluster)
    client.wait_for_workers(2)
    ready = time.perf_counter()
    client.gather([client.submit(abs, -i, pure=False) for i in range(200)])
    done = time.perf_counter()
    client.close()
    cluster.close()
    return ready - started, done - ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "security_cost.json"))
    args = parser.parse_args()
    runs = {"tcp": [], "tls": []}
    for repeat in range(args.repeats):
        for secure in ((False, True) if repeat % 2 == 0 else (True, False)):
            runs["tls" if secure else "tcp"].append(_measure(secure))
    result = {kind: {"start_seconds_median": round(statistics.median(r[0] for r in rows), 3),
                     "tasks_200_seconds_median": round(statistics.median(r[1] for r in rows), 3)}
              for kind, rows in runs.items()}
    result["repeats"] = args.repeats
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
