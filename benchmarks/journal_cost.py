"""The cost of the durable usage journal: gateway throughput with events kept in memory until the
ledger has them, against events on disk and synced before each response ends.

    python benchmarks/journal_cost.py            # 3 rounds of 10 s runs, about 5 minutes
    python benchmarks/journal_cost.py --quick    # 1 round of 2 s runs: a smoke test

Run it with the project's interpreter (`.venv/bin/python`) after `make build`. Two gateways in
front of one `gateway sim` (answering at once, 16 tokens), pinned like `overhead.py` (gateways
on core 1, simulator and loadgen on core 0): "memory" without a journal, "journal" with
`[journal] dir` in the harness's temporary directory (the same disk as /tmp). Non-streaming and
streaming completions at saturation (`loadgen`, closed loop, 64 connections), the two targets
taking turns in a rotating order; the gateway is then the bottleneck, the worst case for the
journal. Then the same pair in front of a simulator paced like a model (20 ms to the first token,
5 ms between tokens, 32 tokens), streaming over 256 connections: the worker is the bottleneck, as
in production. The table gives medians over rounds. Results: a section of
`benchmarks/RESULTS.md` (`--quick` only prints it) and raw reports in `benchmarks/out/`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from harness import (
    Pinned,
    Saturation,
    Service,
    Settings,
    Target,
    gateway_service,
    instant_sim,
    median_of,
    open_harness,
    parse_args,
    publish,
    rotate_saturation,
    wait_serving,
)
from tests.support import procs

BEGIN = "<!-- journal_cost.py:begin -->"
END = "<!-- journal_cost.py:end -->"


def section(runs: dict[str, list[Saturation]], meta: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "## The usage journal: events on disk before each response ends",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start. Completions at saturation, 64 connections (the "
        f"paced worker: {PACED_CONNECTIONS}); gateway "
        f"on core 1, simulator and loadgen on core 0; medians of {meta['rounds']} rounds of "
        f"{meta['duration_s']:.0f} s.",
        "",
        "| mode | memory req/s | journal req/s | journal vs memory "
        "| gateway CPU (memory / journal) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, results in runs.items():
        memory, journal = median_of(results, "memory", "rps"), median_of(results, "journal", "rps")
        cpu = (
            median_of(results, "memory", "gateway_cpu"),
            median_of(results, "journal", "gateway_cpu"),
        )
        lines.append(
            f"| {mode} | {memory:,.0f} | {journal:,.0f} | {journal / memory:.0%} | "
            f"{cpu[0]:.0%} / {cpu[1]:.0%} |"
        )
    errors = sum(r.errors for results in runs.values() for r in results)
    lines += ["", f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}`.", END, ""]
    return "\n".join(lines)


# A worker paced like a model: the gateway is not the bottleneck, as in production.
PACED_SIM = [
    *("sim", "--port", "0", "--model", "sim-model", "--ttft-ms", "20", "--itl-ms", "5"),
    *("--max-num-seqs", "1024", "--max-output-tokens", "32", "--log-level", "WARNING"),
]
PACED_CONNECTIONS = 256
PACED_MODE = "streaming, paced worker, 256 connections"


def start_gateways(
    settings: Settings,
    workdir: Path,
    db_url: str,
    key: str,
    sim_url: str,
    services: list[Pinned],
    prefix: str = "",
) -> list[Target]:
    """A gateway without a journal ("memory") and one with ("journal") in front of `sim_url`,
    serving; each is added to `services` as soon as it starts."""
    targets = []
    for name, extra in (
        ("memory", "[journal]\nenabled = false\n"),
        ("journal", f'[journal]\ndir = "{workdir / f"{prefix}journal"}"\n'),
    ):
        gateway = gateway_service(
            f"gateway-{prefix}{name}", settings, workdir, sim_url, db_url, extra
        )
        services.append(gateway)
        url = gateway.wait_listening() + "/v1/completions"
        wait_serving(url, key, gateway)
        targets.append(Target(name, gateway, url, key))
    return targets


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv, __doc__)
    runs: dict[str, list[Saturation]] = {}
    with open_harness("journal_cost.py", settings, argv) as run:
        workdir, services = run.workdir, run.services
        db_url = f"sqlite:///{workdir / 'ledger.db'}"
        key, _ = procs.create_key(db_url, "bench")
        sim = instant_sim(settings, workdir)
        paced = Service("sim-paced", settings.client_core, PACED_SIM, workdir)
        services += [sim, paced]
        targets = start_gateways(settings, workdir, db_url, key, sim.wait_listening(), services)
        for mode, stream in (("completions", False), ("completions, streaming", True)):
            runs[mode] = rotate_saturation(settings, targets, stream=stream)
        paced_targets = start_gateways(
            settings, workdir, db_url, key, paced.wait_listening(), services, "paced-"
        )
        paced_settings = dataclasses.replace(settings, concurrency=PACED_CONNECTIONS)
        runs[PACED_MODE] = rotate_saturation(paced_settings, paced_targets, stream=True)
    meta = run.meta("journal", settings)
    raw = {"runs": {mode: [vars(r) for r in rs] for mode, rs in runs.items()}}
    publish(meta, raw, section(runs, meta), BEGIN, END, settings.quick)
    return 1 if any(r.errors for results in runs.values() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
