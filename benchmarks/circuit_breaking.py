"""Circuit breaking: how many requests a worker that fails half of them takes before the gateway
ejects it, and how soon it returns once it recovers, over many ejections.

    python benchmarks/circuit_breaking.py                # 100 ejections, about a minute
    python benchmarks/circuit_breaking.py --cycles 10 --quick   # a smoke test; no RESULTS.md

Run it with the project's interpreter (`.venv/bin/python`) after `make build`. One gateway, with
the breaker's default thresholds and a 300 ms backoff, in front of two `gateway sim` workers; one
of them answers half its generation requests with a 500 (`POST /sim/faults`). Requests go one at
a time. A cycle: the worker fails half its requests until `/metrics` shows it ejected (the
requests that reached it then are the figure), then it recovers and requests go on until its
trial request brings it back. Its window starts empty at each return, so every cycle is a fresh
worker's ejection; the dice of the failures run on from cycle to cycle. Results: a section of
`benchmarks/RESULTS.md` (`--quick` only prints it) and a raw report in `benchmarks/out/`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from harness import OUT, git_commit, machine, write_results
from tests.support import procs
from tests.support.stack import Stack, start_stack

BEGIN = "<!-- circuit_breaking.py:begin -->"
END = "<!-- circuit_breaking.py:end -->"
BACKOFF_MS = 300
BODY = {"model": "sim-model", "prompt": "x", "max_tokens": 3}


def worker_sample(http: httpx.Client, stack: Stack, name: str, worker: str) -> float:
    text = http.get(f"{stack.gateway.url}/metrics").text
    series = re.escape(f'tokengate_worker_{name}{{worker="{worker}"}}')
    match = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def reached(http: httpx.Client, sim: procs.Process) -> int:
    """Generation requests the simulator took: answered, and failed on purpose."""
    answered = procs.scrape(sim.url).get("vllm:request_success_total", 0.0)
    injected = http.get(f"{sim.url}/sim/faults").json()["errors_injected"]
    return int(answered) + int(injected)


def one_request(http: httpx.Client, stack: Stack) -> None:
    response = http.post(
        f"{stack.base_url}/completions",
        json=BODY,
        headers={"authorization": f"Bearer {stack.key}"},
    )
    if response.status_code != 200:
        raise RuntimeError(f"a client saw {response.status_code}: {response.text}")


def cycle(http: httpx.Client, stack: Stack, failing: procs.Process) -> dict[str, float]:
    """One ejection and return; what it took."""

    def metric(name: str) -> float:
        return worker_sample(http, stack, name, failing.url)

    http.post(f"{failing.url}/sim/faults", json={"error_rate": 0.5}).raise_for_status()
    start = reached(http, failing)
    ejections = metric("ejections_total")
    while metric("ejections_total") == ejections:
        one_request(http, stack)
        if reached(http, failing) - start > 200:
            raise RuntimeError("not ejected after 200 requests")
    taken = reached(http, failing) - start
    http.post(f"{failing.url}/sim/faults", json={"error_rate": 0.0}).raise_for_status()
    recovered = time.monotonic()
    trials, returns = metric("trial_requests_total"), metric("returns_total")
    while metric("returns_total") == returns:
        one_request(http, stack)
        time.sleep(0.01)
    return {
        "requests_to_ejection": taken,
        "trials_to_return": metric("trial_requests_total") - trials,
        "return_ms": (time.monotonic() - recovered) * 1000,
    }


def section(cycles: list[dict[str, float]], meta: dict[str, Any], percent: int) -> str:
    taken = sorted(c["requests_to_ejection"] for c in cycles)
    trials = sorted(c["trials_to_return"] for c in cycles)
    back = sorted(c["return_ms"] for c in cycles)
    within = sum(1 for k in taken if k <= 20)
    p90 = taken[min(len(taken) - 1, int(0.9 * len(taken)))]
    return "\n".join(
        [
            BEGIN,
            "## Circuit breaking",
            "",
            f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
            f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores). One gateway with the "
            f"breaker's thresholds (5 failures in a row, or {percent}% of a 20-request window once "
            f"it holds 10) and a {BACKOFF_MS} ms backoff, two simulators, one failing half its "
            "requests; "
            f"{len(cycles)} ejections, requests one at a time.",
            "",
            "| | min | median | 90th pct | max |",
            "|---|---:|---:|---:|---:|",
            f"| requests that reached the failing worker before its ejection | {taken[0]} | "
            f"{statistics.median(taken):g} | {p90} | {taken[-1]} |",
            f"| trial requests after it recovered, until its return | {trials[0]:g} | "
            f"{statistics.median(trials):g} | | {trials[-1]:g} |",
            f"| ms from its recovery to its return (backoff {BACKOFF_MS} ms) | {back[0]:.0f} | "
            f"{statistics.median(back):.0f} | | {back[-1]:.0f} |",
            "",
            f"Ejected within 20 requests: {within} of {len(cycles)}. Every client got its answer "
            f"(a failed attempt is retried on the other worker). Raw report: "
            f"`benchmarks/out/{meta['raw']}`.",
            END,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=100, help="ejections measured (100)")
    parser.add_argument(
        "--failure-percent",
        type=int,
        help="routing.breaker_failure_percent (default: the gateway's default, 40)",
    )
    parser.add_argument("--quick", action="store_true", help="print only; RESULTS.md unchanged")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/circuit_breaking.py", *(argv or sys.argv[1:])])
    stamp = datetime.now(UTC)
    meta: dict[str, Any] = {
        "command": command,
        "date": f"{stamp:%Y-%m-%d %H:%M} UTC",
        "commit": git_commit(),
        "machine": machine(),
        "raw": f"circuit-breaking-{stamp:%Y%m%dT%H%M%SZ}{'-quick' if args.quick else ''}.json",
    }
    with tempfile.TemporaryDirectory(prefix="tokengate-breaker-") as tmp:
        routing = f"breaker_backoff_ms = {BACKOFF_MS}\nbreaker_max_backoff_ms = {BACKOFF_MS}\n"
        if args.failure_percent is not None:
            routing += f"breaker_failure_percent = {args.failure_percent}\n"
        stack = start_stack(Path(tmp) / "gateway.toml", Path(tmp) / "ledger.db", routing=routing)
        try:
            with httpx.Client(timeout=30) as http:
                cycles = [cycle(http, stack, stack.sims[0]) for _ in range(args.cycles)]
        finally:
            stack.stop()
    text = section(cycles, meta, args.failure_percent or 40)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / meta["raw"]).write_text(json.dumps({**meta, "cycles": cycles}, indent=2) + "\n")
    print("\n" + text)
    if not args.quick:
        write_results(text, BEGIN, END)
        print(f"written to benchmarks/RESULTS.md and benchmarks/out/{meta['raw']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
