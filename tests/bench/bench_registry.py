"""Benchmark: seconds from `activate` to every replica serving the new probe version.

Starts a redis-server and two `guard serve` replicas of the default model on loopback ports, pushes
the shipped harmful_request probe twice, then alternates activations and polls each replica's
/readyz until all report the new version. Prints the median and writes JSON.

    .venv/bin/python tests/bench/bench_registry.py [--runs 9] [--out tests/bench/results/registry.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import RedisServer
from serverproc import Server

from probes.catalog import load_shipped
from probes.registry import RedisRegistry

POLICIES = {"policies": [{"name": "harmful_request", "probe": "harmful_request", "stage": "prompt", "action": "block"}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("tests/bench/results/registry.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="guard-bench-registry-"))
    store = RedisServer(work)
    registry = RedisRegistry(redis.Redis.from_url(store.url))
    probe = load_shipped("harmful_request")
    first, second = registry.push(probe), registry.push(probe)
    registry.activate("harmful_request", first)
    (work / "policies.json").write_text(json.dumps(POLICIES))
    replicas = [
        Server(
            "--policy-file",
            str(work / "policies.json"),
            "--redis-url",
            store.url,
            env={"GUARD_CACHE_DIR": str(work / f"cache-{i}")},
            log=work / f"replica-{i}.log",
        )
        for i in range(2)
    ]
    for replica in replicas:
        replica.wait_compiled()
    seconds = []
    try:
        for run in range(args.runs):
            target = second if run % 2 == 0 else first
            started = time.perf_counter()
            registry.activate("harmful_request", target)
            while not all(_version(r) == target for r in replicas):
                time.sleep(0.005)
            seconds.append(time.perf_counter() - started)
    finally:
        for replica in replicas:
            replica.stop()
        store.stop()
    result = {
        "replicas": len(replicas),
        "runs": args.runs,
        "median_s": statistics.median(seconds),
        "max_s": max(seconds),
        "all_s": [round(s, 4) for s in seconds],
        "target_s": 2.0,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


def _version(server: Server) -> str:
    return httpx.get(server.url + "/readyz", timeout=5).json()["policies"]["harmful_request"]


if __name__ == "__main__":
    main()
