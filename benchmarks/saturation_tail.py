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
import statistics
import sys
from pathlib import Path
from typing import Any

from harness import (
    Saturation,
    Target,
    gateway_service,
    median_of,
    open_harness,
    parse_args,
    publish,
    rotate_saturation,
    wait_serving,
)

BEGIN = "<!-- saturation_tail.py:begin -->"
END = "<!-- saturation_tail.py:end -->"
BUILDS = ("baseline", "this build")
MODES = (("completions", False), ("completions, streaming", True))


def cpu_us(run: Saturation) -> float:
    """The gateway's CPU a request, in µs."""
    return run.gateway_cpu * 1e6 / run.rps if run.rps else float("nan")


def median(runs: list[Saturation], build: str, pick: str) -> float:
    """The median over rounds of `pick`, a field of `Saturation` or "cpu_us"."""
    if pick != "cpu_us":
        return median_of(runs, build, pick)
    return float(statistics.median(cpu_us(r) for r in runs if r.target == build))


def section(results: dict[str, list[Saturation]], meta: dict[str, Any], baseline: str) -> str:
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
        cells = [", ".join(f"{r.p99:,.0f}" for r in runs if r.target == build) for build in BUILDS]
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
    results: dict[str, list[Saturation]] = {}
    with open_harness("saturation_tail.py", settings, argv) as run:
        workdir, services = run.workdir, run.services
        db_url, key = run.sqlite_ledger()
        sim = run.start_instant_sim(settings)
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
            # Two targets: the rotating order alternates.
            results[mode] = rotate_saturation(settings, targets, stream=stream)
    meta = {**run.meta("saturation", settings), "concurrency": settings.concurrency}
    raw = {"runs": {mode: [vars(r) for r in runs] for mode, runs in results.items()}}
    publish(meta, raw, section(results, meta, str(baseline)), BEGIN, END, settings.quick)
    return 1 if any(r.errors for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
