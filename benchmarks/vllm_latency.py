"""The gateway's added latency in front of real vLLM: time to first token and inter-token latency,
gateway vs direct, with the same load in one run.

    python benchmarks/vllm_latency.py            # writes a section of benchmarks/RESULTS.md
    python benchmarks/vllm_latency.py --quick    # one short round, prints only

One vLLM CPU worker (the real-vLLM tier's environment and tiny model, `tests/vllm/cpu_env.py`)
pinned to core 0; the gateway (one tokio thread) and this client pinned to core 1. Rounds alternate
direct and gateway; in each, `--concurrency` clients each stream `--requests` completions of
`--max-tokens` tokens (`ignore_eos`, so every stream has the same length) and time, per request,
the first event with a token (TTFT, as `vllm bench serve` takes it) and the gaps between later
token events (ITL). The figures that matter are the differences, gateway minus direct.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from harness import HarnessError, Pinned, Service, git_commit, write_results
from tests.support import procs
from tests.vllm import cpu_env

BEGIN = "<!-- vllm_latency.py:begin -->"
END = "<!-- vllm_latency.py:end -->"
PROMPT = "the gateway routes every request to a worker and meters every token it relays"


@dataclass
class Samples:
    """Per-request TTFTs and every inter-token gap, in seconds."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ttft: float, gaps: list[float]) -> None:
        with self.lock:
            self.ttft.append(ttft)
            self.itl.extend(gaps)


def stream_once(http: httpx.Client, url: str, key: str, max_tokens: int, samples: Samples) -> None:
    body = {
        "model": cpu_env.SERVED_MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"authorization": f"Bearer {key}"}
    start = time.perf_counter()
    token_times: list[float] = []
    with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            samples.errors += 1
            return
        for line in response.iter_lines():
            if line.startswith("data: {") and '"choices":[{' in line:
                token_times.append(time.perf_counter())
    if not token_times:
        samples.errors += 1
        return
    gaps = [b - a for a, b in itertools.pairwise(token_times)]
    samples.add(token_times[0] - start, gaps)


def run_load(url: str, key: str, concurrency: int, requests: int, max_tokens: int) -> Samples:
    samples = Samples()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            for _ in range(requests):
                stream_once(http, url, key, max_tokens, samples)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def table(results: dict[tuple[int, str], Samples]) -> str:
    lines = [
        "| concurrency | metric | direct p50 | gateway p50 | added p50 | direct p90 | gateway p90"
        " | added p90 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for concurrency in sorted({c for c, _ in results}):
        direct, gateway = results[(concurrency, "direct")], results[(concurrency, "gateway")]
        for metric in ("ttft", "itl"):
            d, g = getattr(direct, metric), getattr(gateway, metric)
            cells = []
            for q in (0.5, 0.9):
                dq, gq = quantile(d, q), quantile(g, q)
                cells += [ms(dq), ms(gq), f"{(gq - dq) * 1000:+.2f}"]
            name = "TTFT (ms)" if metric == "ttft" else "ITL (ms)"
            lines.append(
                f"| {concurrency} | {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]}"
                f" | {cells[4]} | {cells[5]} |"
            )
    return "\n".join(lines)


def start_worker(env: cpu_env.VllmEnv, workdir: Path) -> tuple[Pinned, str]:
    port = procs.free_port()
    worker = Pinned("vllm", 0, env.worker_command(port), workdir, env=env.worker_env(cpu=0))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        worker.check_running()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return worker, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    worker.stop()
    raise HarnessError(f"vLLM did not start:\n{worker.log_tail()}")


def start_gateway(worker_url: str, workdir: Path) -> tuple[Service, str, str]:
    db_url = f"sqlite:///{workdir / 'ledger.db'}"
    key, _ = procs.create_key(db_url, "bench")
    config = workdir / "gateway.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\n\n[storage]\nurl = "{db_url}"\n\n'
        f'[[workers]]\nurl = "{worker_url}"\n'
    )
    gateway = Service("gateway", 1, ["serve", "--config", str(config)], workdir)
    url = gateway.wait_listening()
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}).json().get(
        "data"
    ) in (None, []):
        if time.monotonic() > deadline:
            raise HarnessError(
                f"the gateway never listed the worker's model:\n{gateway.log_tail()}"
            )
        time.sleep(0.2)
    return gateway, url, key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one short round; no RESULTS.md")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20, help="streams per client per round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args(argv)
    rounds, requests = (1, 3) if args.quick else (args.rounds, args.requests)

    env = cpu_env.ensure()
    os.sched_setaffinity(0, {1})
    results: dict[tuple[int, str], Samples] = {}
    with tempfile.TemporaryDirectory(prefix="vllm-latency-") as tmp:
        workdir = Path(tmp)
        worker, worker_url = start_worker(env, workdir)
        try:
            gateway, gateway_url, key = start_gateway(worker_url, workdir)
            try:
                targets = {"direct": worker_url, "gateway": gateway_url}
                run_load(gateway_url, key, 1, 2, args.max_tokens)  # warm both paths
                run_load(worker_url, key, 1, 2, args.max_tokens)
                for round_ in range(rounds):
                    order = ["direct", "gateway"] if round_ % 2 == 0 else ["gateway", "direct"]
                    for concurrency in args.concurrency:
                        for name in order:
                            samples = run_load(
                                targets[name], key, concurrency, requests, args.max_tokens
                            )
                            slot = results.setdefault((concurrency, name), Samples())
                            slot.ttft += samples.ttft
                            slot.itl += samples.itl
                            slot.errors += samples.errors
                            print(
                                f"round {round_ + 1} c={concurrency} {name}: "
                                f"ttft p50 {ms(statistics.median(samples.ttft))} ms, "
                                f"itl p50 {ms(statistics.median(samples.itl))} ms",
                                flush=True,
                            )
            finally:
                gateway.stop()
        finally:
            worker.stop()
    errors = sum(s.errors for s in results.values())
    if errors:
        raise HarnessError(f"{errors} requests failed")
    text = table(results)
    print(text)
    if args.quick:
        return
    n = {key: len(s.ttft) for key, s in results.items()}
    command = "python benchmarks/vllm_latency.py" + ("" if argv is None else " " + " ".join(argv))
    section = "\n".join(
        [
            BEGIN,
            "## Added latency in front of real vLLM",
            "",
            f"`{command}` — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {git_commit()};"
            f" vLLM 0.32.0 CPU build, tiny Llama (`tests/vllm/tiny_model.py`), worker on core 0,"
            f" gateway and client on core 1; {args.rounds} alternating rounds, streams of"
            f" {args.max_tokens} tokens, {json.dumps({f'c={c} {t}': v for (c, t), v in n.items()})}"
            " streams measured.",
            "",
            text,
            "",
            END,
        ]
    )
    write_results(section + "\n", BEGIN, END)


if __name__ == "__main__":
    main()
