"""The cost of quota checks: in process and through Redis, alone and through the whole gateway.

    python benchmarks/quota_cost.py            # 3 rounds of 10 s runs, about 3 minutes
    python benchmarks/quota_cost.py --quick    # 1 round of 2 s runs: a smoke test

Run it with the project's interpreter (`.venv/bin/python`) after `make build`, with
`redis-server` installed (`make services`). Two parts, one run:

1. Without HTTP (`cargo bench -p gateway-core --bench quota`): nanoseconds per admission plus
   settlement in process, for a tenant and a key that both have every kind of limit (the
   heaviest case); and through a Redis on core 0, admissions per second at 64 in flight and the
   latency of one.
2. Through the gateway: non-streaming completions at saturation (`loadgen`, closed loop,
   64 connections) against `gateway sim`, for a tenant with no policy ("off"), a tenant whose
   policy has every kind of limit, counted in process ("in process"), and the same policy counted
   in Redis ("redis"). Pinned like `overhead.py`: the gateways on core 1, the simulator, the load
   generator and Redis on core 0. The three targets take turns in a rotating order; the table
   gives medians over rounds, the gateway's CPU per request, and each throughput as a fraction of
   the in-process one.

The policy's limits are far above what the run reaches: the figures are the price of checking,
reserving and settling, never of a refusal. Results: a section of `benchmarks/RESULTS.md`
(`--quick` only prints it) and raw reports in `benchmarks/out/`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from harness import (
    MODEL,
    ROOT,
    HarnessError,
    Pinned,
    Service,
    Target,
    gateway_service,
    instant_sim,
    open_harness,
    parse_args,
    publish,
    rotate_saturation,
    wait_serving,
)
from tests.support import procs

BEGIN = "<!-- quota_cost.py:begin -->"
END = "<!-- quota_cost.py:end -->"
TARGETS = ("off", "in process", "redis")
POLICY = (
    "--rpm", "1000000000", "--tpm", "1000000000000", "--concurrency", "1000000",
    "--token-budget", "1000000000000000", "--money-budget", "1000000000", "--period", "month",
)  # fmt: skip


@dataclass
class Result:
    round: int
    target: str
    rps: float
    gateway_cpu: float
    redis_cpu: float
    errors: int


@dataclass
class Bench:
    results: list[Result] = field(default_factory=list)

    def median(self, target: str, pick: str) -> float:
        values = [float(getattr(r, pick)) for r in self.results if r.target == target]
        return statistics.median(values) if values else float("nan")


def micro(redis_url: str) -> dict[str, float]:
    """`benches/quota.rs`'s JSON report."""
    argv = ["cargo", "bench", "-q", "-p", "gateway-core", "--bench", "quota"]
    argv += ["--", "--redis-url", redis_url]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HarnessError(f"cargo bench failed:\n{done.stderr[-3000:]}")
    report: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def section(bench: Bench, figures: dict[str, float], meta: dict[str, Any]) -> str:
    in_process = bench.median("in process", "rps")
    lines = [
        BEGIN,
        "## Quota checks: in process and in Redis",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start.",
        "",
        "Without HTTP (`cargo bench -p gateway-core --bench quota`; a tenant and a key, both with "
        "every kind of limit):",
        "",
        "| measure | figure |",
        "|---|---:|",
        f"| in process, admit + settle, one thread | "
        f"{figures['in_process_ns_per_admit_and_settle']:.0f} ns |",
        f"| in process, admit + settle, two threads on one tenant | "
        f"{figures['in_process_ns_per_admit_and_settle_two_threads_one_tenant']:.0f} ns |",
        f"| Redis (core 0), admissions/s at 64 in flight, settlements batched apart | "
        f"{figures['redis_admissions_per_s_at_64']:,.0f} |",
        f"| Redis, one admission + settlement at a time | "
        f"{figures['redis_admit_latency_us_one_at_a_time']:.0f} µs |",
        "",
        "Through the gateway (non-streaming completions at saturation, 64 connections; gateway on "
        "core 1; simulator, loadgen and Redis on core 0; medians of "
        f"{meta['rounds']} rounds of {meta['duration_s']:.0f} s; policy on the tenant only):",
        "",
        "| quotas | req/s | vs in process | gateway CPU | gateway CPU per request | Redis CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target in TARGETS:
        rps = bench.median(target, "rps")
        cpu = bench.median(target, "gateway_cpu")
        redis_cpu = bench.median(target, "redis_cpu")
        lines.append(
            f"| {target} | {rps:,.0f} | {rps / in_process:.0%} | {cpu:.0%} | "
            f"{cpu / rps * 1e6:.1f} µs | {redis_cpu:.0%} |"
        )
    errors = sum(r.errors for r in bench.results)
    lines += [
        "",
        f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}` (not committed).",
        END,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv, __doc__)
    redis_binary = shutil.which("redis-server")
    if redis_binary is None:
        raise HarnessError("redis-server not found: run `make services`")
    bench = Bench()
    with open_harness("quota_cost.py", settings, argv) as run:
        workdir, services = run.workdir, run.services
        db_url = f"sqlite:///{workdir / 'ledger.db'}"
        redis_port = procs.free_port()
        redis = Pinned(
            "redis",
            settings.client_core,
            [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
            workdir,
        )
        services.append(redis)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        free_key, _ = procs.create_key(db_url, "free")
        metered_key, _ = procs.create_key(db_url, "metered")
        procs.cli("tenants", "set-quota", "metered", *POLICY, "--db", db_url)
        procs.cli(
            *("prices", "set", MODEL, "--prompt", "0.15", "--cached", "0.075"),
            *("--completion", "0.6", "--db", db_url),
        )
        print("micro-benchmark: cargo bench -p gateway-core --bench quota", flush=True)
        figures = micro(redis_url)
        print(json.dumps(figures), flush=True)
        sim = instant_sim(settings, workdir)
        services.append(sim)
        sim_url = sim.wait_listening()
        gateways: dict[str, Service] = {}
        for name, extra in (("local", ""), ("redis", f'\n[quota]\nredis_url = "{redis_url}"\n')):
            # Quotas alone: the usage journal (`journal_cost.py`) is measured apart.
            extra += "\n[journal]\nenabled = false\n"
            gateways[name] = gateway_service(
                f"gateway-{name}", settings, workdir, sim_url, db_url, extra
            )
            services.append(gateways[name])
        urls = {name: g.wait_listening() + "/v1/completions" for name, g in gateways.items()}
        plan = {
            "off": (gateways["local"], urls["local"], free_key),
            "in process": (gateways["local"], urls["local"], metered_key),
            "redis": (gateways["redis"], urls["redis"], metered_key),
        }
        for _, (gateway, url, key) in plan.items():
            wait_serving(url, key, gateway)
        targets = [Target(name, *plan[name]) for name in TARGETS]
        runs = rotate_saturation(settings, targets, stream=False, watch=(redis,))
        bench.results.extend(
            Result(r.round, r.target, r.rps, r.gateway_cpu, r.others_cpu[0], r.errors) for r in runs
        )
    meta = run.meta("quota", settings)
    raw = {"micro": figures, "runs": [vars(r) for r in bench.results]}
    publish(meta, raw, section(bench, figures, meta), BEGIN, END, settings.quick)
    return 1 if any(r.errors for r in bench.results) else 0


if __name__ == "__main__":
    sys.exit(main())
