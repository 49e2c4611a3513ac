"""Coalescing on real vLLM: does sending compatible completions as one call pay?

    python benchmarks/coalescing.py             # writes a section of benchmarks/RESULTS.md
    python benchmarks/coalescing.py --quick     # one short round, prints only

One vLLM CPU worker (the real-vLLM tier's environment and tiny model, `tests/vllm/cpu_env.py`)
pinned to core 0; two gateways in front of it on core 1, one plain and one with
`routing.coalesce_window_us = --window-us` (`coalesce_max_prompts = --max-prompts`). `--clients`
client threads, each with its own short prompt, send non-streaming completions of `--max-tokens`
tokens (`ignore_eos`, temperature 0) back to back through one gateway, then the other, for
`--requests` requests a round; `--rounds` alternate which goes first. Reported per mode: requests
a second and latency percentiles (medians over rounds), the worker's CPU seconds a request, and
the ratio coalesced / plain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from harness import HarnessError, Pinned, Service, git_commit, write_results
from prefix_affinity import start_gateway, wait_worker
from tests.support import procs
from tests.vllm import cpu_env

BEGIN = "<!-- coalescing.py:begin -->"
END = "<!-- coalescing.py:end -->"


@dataclass
class Round:
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    worker_cpu_per_request_ms: float
    coalesced: int


class Worker(Pinned):
    """vLLM's API server and the engine-core process it starts: CPU time counts both."""

    def pids(self) -> list[int]:
        family = [self.proc.pid]
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        for pid in family:
            family.extend(child for child, parent in parents.items() if parent == pid)
        return family


def drive(url: str, key: str, clients: int, requests: int, max_tokens: int) -> list[float]:
    """`requests` completions from `clients` threads, back to back; each one's latency (s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = [requests]
    failures: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=120, headers={"authorization": f"Bearer {key}"}) as http:
            while True:
                with lock:
                    if left[0] == 0 or failures:
                        return
                    left[0] -= 1
                body = {
                    "model": cpu_env.SERVED_MODEL,
                    "prompt": f"client {i} asks the gateway about request {left[0]}",
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                started = time.perf_counter()
                response = http.post(f"{url}/v1/completions", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code != 200:
                        failures.append(response.text[:300])
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise HarnessError(f"a request failed: {failures[0]}")
    return latencies


def run_round(mode: str, url: str, key: str, worker: Pinned, args: argparse.Namespace) -> Round:
    before_cpu = worker.cpu_seconds()
    before = procs.scrape(url).get("tokengate_coalesced_requests_total", 0)
    started = time.perf_counter()
    latencies = drive(url, key, args.clients, args.requests, args.max_tokens)
    wall = time.perf_counter() - started
    cpu = worker.cpu_seconds() - before_cpu
    coalesced = int(procs.scrape(url).get("tokengate_coalesced_requests_total", 0) - before)
    cuts = statistics.quantiles(latencies, n=100)
    return Round(
        mode=mode,
        rps=len(latencies) / wall,
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
        worker_cpu_per_request_ms=cpu / len(latencies) * 1000,
        coalesced=coalesced,
    )


def summary(rounds: list[Round], args: argparse.Namespace) -> str:
    def med(mode: str, pick: str) -> float:
        return float(statistics.median(getattr(r, pick) for r in rounds if r.mode == mode))

    lines = [
        "| mode | requests/s | p50 ms | p99 ms | worker CPU ms a request | coalesced a round |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in ("plain", "coalesced"):
        lines.append(
            f"| {mode} | {med(mode, 'rps'):.1f} | {med(mode, 'p50_ms'):.0f} | "
            f"{med(mode, 'p99_ms'):.0f} | {med(mode, 'worker_cpu_per_request_ms'):.1f} | "
            f"{med(mode, 'coalesced'):.0f} of {args.requests} |"
        )
    ratio = med("coalesced", "rps") / med("plain", "rps")
    p50 = med("coalesced", "p50_ms") / med("plain", "p50_ms")
    cpu = med("coalesced", "worker_cpu_per_request_ms") / med("plain", "worker_cpu_per_request_ms")
    per_round = ", ".join(
        f"{c.rps / p.rps:.2f}"
        for p, c in zip(
            [r for r in rounds if r.mode == "plain"],
            [r for r in rounds if r.mode == "coalesced"],
            strict=True,
        )
    )
    lines.append("")
    lines.append(
        f"Coalesced / plain: throughput **{ratio:.2f}x** (rounds: {per_round}), p50 latency "
        f"{p50:.2f}x, worker CPU a request {cpu:.2f}x."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=480)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-us", type=int, default=5000)
    parser.add_argument("--max-prompts", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests = 1, 64

    env = cpu_env.ensure()
    with tempfile.TemporaryDirectory(prefix="tokengate-coalescing-") as tmp:
        workdir = Path(tmp)
        port = procs.free_port()
        worker = Worker("vllm", 0, env.worker_command(port), workdir, env=env.worker_env(cpu=0))
        url = f"http://127.0.0.1:{port}"
        gateways: list[Service] = []
        try:
            wait_worker(worker, url)
            db = workdir / "ledger.db"
            key, _ = procs.create_key(db, "bench")
            plain, plain_url = start_gateway("plain", [url], "", f"sqlite:///{db}", key, workdir)
            gateways.append(plain)
            routing = (
                f"coalesce_window_us = {args.window_us}\n"
                f"coalesce_max_prompts = {args.max_prompts}\n"
            )
            joint, joint_url = start_gateway(
                "coalesced", [url], routing, f"sqlite:///{db}", key, workdir
            )
            gateways.append(joint)
            # Warm up both paths (vLLM's first requests compile and allocate).
            drive(plain_url, key, args.clients, args.clients * 2, args.max_tokens)
            drive(joint_url, key, args.clients, args.clients * 2, args.max_tokens)
            rounds: list[Round] = []
            targets = [("plain", plain_url), ("coalesced", joint_url)]
            for i in range(args.rounds):
                for mode, target in targets if i % 2 == 0 else targets[::-1]:
                    result = run_round(mode, target, key, worker, args)
                    print(result, file=sys.stderr)
                    rounds.append(result)
        finally:
            for gateway in gateways:
                gateway.stop()
            worker.stop()

    table = summary(rounds, args)
    print(table)
    if args.quick:
        return
    command = (
        f"python benchmarks/coalescing.py --clients {args.clients} --requests {args.requests} "
        f"--max-tokens {args.max_tokens} --rounds {args.rounds} --window-us {args.window_us} "
        f"--max-prompts {args.max_prompts}"
    )
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    text = (
        f"{BEGIN}\n## Coalescing on real vLLM\n\n"
        f"`{command}` ({when}, commit {git_commit()}): one vLLM CPU worker (tiny model, core 0), "
        f"two gateways in front of it (core 1), {args.clients} clients sending non-streaming "
        f"completions of {args.max_tokens} tokens back to back; medians of {args.rounds} rounds "
        f"of {args.requests} requests, modes alternating.\n\n{table}\n{END}\n"
    )
    write_results(text, BEGIN, END)


if __name__ == "__main__":
    main()
