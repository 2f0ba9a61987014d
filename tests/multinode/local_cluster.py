"""A Ray cluster of several nodes on this machine, each node its own raylet (`ray.cluster_utils.Cluster`),
kept alive by this script for the multi-node tests:

    python tests/multinode/local_cluster.py WORKERS

starts a head with no CPUs (drivers attach to it; their small actors and Ray Train's controller live
there) and WORKERS worker nodes with one CPU each, prints one JSON line (the cluster's address and
every node with the pid of its raylet), then answers commands on stdin, one JSON line each:

    actors CLASS    every actor of that class (alive or dead) with its node and start time
    kill NODE_ID    SIGKILL every process of that node at once, as when its machine dies
    add             add a worker node (one CPU)

End of input shuts the cluster down. A process of its own because starting a head points the process's
Ray internal-KV client at the new cluster and shutting it down resets that client: the pytest process's
own Ray session must see neither.
"""

from __future__ import annotations

import json
import os
import sys

import psutil
from ray.cluster_utils import Cluster

# A dead node is declared dead after ~1.5 s instead of Ray's default 15 s (a health check every 3 s, 5 misses).
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def kill(cluster: Cluster, node) -> None:
    """The node's raylet and everything it started (workers, agents), killed together."""
    raylet = psutil.Process(raylet_pid(node))
    processes = [raylet, *raylet.children(recursive=True)]
    for p in processes:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)
    cluster.remove_node(node, allow_graceful=False)  # forget it (its processes are gone already)


def actors(cluster: Cluster, class_name: str) -> list[dict]:
    return [{"actor_id": a["ActorID"], "node_id": a["Address"]["NodeID"], "state": a["State"],
             "start_time": a["StartTime"] / 1000} for a in cluster.global_state.actor_table(None).values()
            if a["ActorClassName"] == class_name]


def node_info(node) -> dict:
    return {"node_id": node.node_id, "raylet_pid": raylet_pid(node)}


def main(workers: int) -> None:
    # DeepSpeed compiles a communication op into torch's extensions folder at first use; one of this
    # virtualenv's own keeps another checkout's DeepSpeed on the same machine from swapping it mid-run.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE_DETECTION})
    nodes = {n.node_id: n for n in [cluster.add_node(num_cpus=1) for _ in range(workers)]}
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "head": node_info(cluster.head_node),
                      "workers": [node_info(n) for n in nodes.values()]}), flush=True)
    try:
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "actors":
                print(json.dumps(actors(cluster, arg)), flush=True)
            elif command == "kill":
                kill(cluster, nodes.pop(arg))
                print(json.dumps("killed"), flush=True)
            elif command == "add":
                node = cluster.add_node(num_cpus=1)
                nodes[node.node_id] = node
                print(json.dumps(node_info(node)), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {line.strip()!r}"}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
