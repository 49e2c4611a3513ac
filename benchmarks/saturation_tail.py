"""Latency at saturation, this build against another: p50 and p99 of every request while the
gateway's core is full, with throughput and CPU a request beside them.

    python benchmarks/saturation_tail.py --baseline ../old/.venv/bin/python --loadgen ...

Run it with the project's interpreter (`.venv/bin/python`) after `make build`. `--baseline` is
another build's interpreter: a checkout's venv, or a script that runs this venv's Python with
another build's `gateway` package first on `PYTHONPATH`. Both gateways run with their defaults
(journal on, `interval`) in front of one `gateway sim` answering at once, pinned like
`overhead.py` (gateways on core 1, simulator and loadgen on core 0), and take turns, the order
alternating each round; closed loop, 64 connections, completions and streamed completions. A
figure is the median over rounds. Results: a section of `benchmarks/RESULTS.md` (`--quick` only
prints it) and a raw report in `benchmarks/out/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

from harness import (
    Settings,
    Target,
    gateway_service,
    instant_sim,
    open_harness,
    parse_args,
    publish,
    run_loadgen,
    wait_serving,
)
from tests.support import procs

BEGIN = "<!-- saturation_tail.py:begin -->"
END = "<!-- saturation_tail.py:end -->"
BUILDS = ("baseline", "this build")
MODES = (("completions", False), ("completions, streaming", True))


@dataclasses.dataclass
class Run:
    """One saturation run's figures; latencies in µs from each request's send."""

    round: int
    build: str
    rps: float
    p50: float
    p99: float
    cpu_us: float  # the gateway's CPU a request
    errors: int


def rounds(settings: Settings, targets: list[Target], *, stream: bool) -> list[Run]:
    """`settings.rounds` rounds of one run per build, the order alternating each round."""
    runs = []
    for round_ in range(settings.rounds):
        for target in targets if round_ % 2 == 0 else targets[::-1]:
            report, cpus = run_loadgen(
                settings,
                target.url,
                target.key,
                stream=stream,
                rate=None,
                services=(target.gateway,),
            )
            rps, latency = float(report["rps"]), report["latency_us"]
            errors = int(report["errors"]) + int(report["unsent"])
            run = Run(round_, target.name, rps, latency["p50"], latency["p99"], 0.0, errors)
            run.cpu_us = cpus[0] * 1e6 / rps if rps else float("nan")
            runs.append(run)
            print(
                f"  round {round_ + 1} {target.name:>10} {'stream' if stream else 'plain':6} "
                f"{rps:>9.0f} req/s  p50 {run.p50:>6.0f} µs  p99 {run.p99:>6.0f} µs  "
                f"CPU {run.cpu_us:.1f} µs/req  errors {errors}",
                flush=True,
            )
    return runs


def median(runs: list[Run], build: str, pick: str) -> float:
    return float(statistics.median(getattr(r, pick) for r in runs if r.build == build))


def section(results: dict[str, list[Run]], meta: dict[str, Any], baseline: str) -> str:
    lines = [
        BEGIN,
        "## Latency at saturation: this build against the baseline",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']} against {baseline}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start. Gateways with their defaults on core 1, simulator "
        f"and loadgen on core 0; closed loop, {meta['concurrency']} connections; "
        f"{meta['rounds']} rounds of {meta['duration_s']:.0f} s, the order alternating; medians "
        "over rounds.",
        "",
        "| mode | build | req/s | p50 µs | p99 µs | CPU µs / req |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode, runs in results.items():
        for build in BUILDS:
            lines.append(
                f"| {mode} | {build} | {median(runs, build, 'rps'):,.0f} "
                f"| {median(runs, build, 'p50'):,.0f} | {median(runs, build, 'p99'):,.0f} "
                f"| {median(runs, build, 'cpu_us'):.1f} |"
            )
    lines += ["", "p99 round by round (baseline; this build):", ""]
    for mode, runs in results.items():
        cells = [", ".join(f"{r.p99:,.0f}" for r in runs if r.build == build) for build in BUILDS]
        lines.append(f"- {mode}: {cells[0]}; {cells[1]}")
    errors = sum(r.errors for runs in results.values() for r in runs)
    lines += ["", f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}`.", END, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--baseline", type=Path, required=True)
    args, rest = parser.parse_known_args(argv)
    baseline: Path = args.baseline.absolute()
    settings = parse_args(rest, __doc__)
    results: dict[str, list[Run]] = {}
    with open_harness("saturation_tail.py", settings, argv) as run:
        workdir, services = run.workdir, run.services
        db_url = f"sqlite:///{workdir / 'ledger.db'}"
        key, _ = procs.create_key(db_url, "bench")
        sim = instant_sim(settings, workdir)
        services.append(sim)
        targets = []
        for build, python in zip(BUILDS, (baseline, None), strict=True):
            name = build.replace(" ", "-")
            journal = f'[journal]\ndir = "{workdir / name}-journal"\n'
            gateway = gateway_service(
                f"gateway-{name}", settings, workdir, sim.wait_listening(), db_url, journal, python
            )
            services.append(gateway)
            url = gateway.wait_listening() + "/v1/completions"
            wait_serving(url, key, gateway)
            targets.append(Target(build, gateway, url, key))
        for mode, stream in MODES:
            results[mode] = rounds(settings, targets, stream=stream)
    meta = {**run.meta("saturation", settings), "concurrency": settings.concurrency}
    raw = {"runs": {mode: [vars(r) for r in runs] for mode, runs in results.items()}}
    publish(meta, raw, section(results, meta, str(baseline)), BEGIN, END, settings.quick)
    return 1 if any(r.errors for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
