"""The cost of journalling a running stream's usage more often: gateway CPU per streamed request
with `journal.progress_interval_ms` at 1000 (the old cadence), 100 (the default) and 20.

    python benchmarks/progress_cost.py            # 3 rounds of 10 s runs, about 3 minutes
    python benchmarks/progress_cost.py --quick    # 1 round of 2 s runs: a smoke test

Run it with the project's interpreter (`.venv/bin/python`) after `make build`. Three gateways,
each with its journal, in front of one `gateway sim` paced like a model whose answers are long
(20 ms to the first token, 5 ms between tokens, 200 tokens: one second a stream, so a stream
writes about 1, 10 or 50 progress records), pinned like `overhead.py` (gateways on core 1,
simulator and loadgen on core 0); streaming completions over 256 connections, the targets taking
turns in a rotating order. The worker is the bottleneck, so requests per second are the same for
all three and the figure to compare is the gateway's CPU per request. Results: a section of
`benchmarks/RESULTS.md` (`--quick` only prints it) and raw reports in `benchmarks/out/`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from harness import (
    Saturation,
    Service,
    Target,
    gateway_service,
    median_of,
    open_harness,
    parse_args,
    publish,
    rotate_saturation,
    wait_serving,
)
from tests.support import procs

BEGIN = "<!-- progress_cost.py:begin -->"
END = "<!-- progress_cost.py:end -->"

SIM = [
    *("sim", "--port", "0", "--model", "sim-model", "--ttft-ms", "20", "--itl-ms", "5"),
    *("--max-num-seqs", "1024", "--max-output-tokens", "200", "--log-level", "WARNING"),
]
CONNECTIONS = 256
INTERVALS_MS = (1000, 100, 20)


def section(results: list[Saturation], meta: dict[str, Any]) -> str:
    lines = [
        BEGIN,
        "## Progress records: what an interrupted stream is billed for, and what it costs",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start. Streaming completions of 200 tokens at 5 ms a token "
        f"over {CONNECTIONS} connections; gateway on core 1, simulator and loadgen on core 0; "
        f"medians of {meta['rounds']} rounds of {meta['duration_s']:.0f} s.",
        "",
        "| progress every | req/s | gateway CPU | CPU µs / request | vs 1000 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    base = None
    for interval in INTERVALS_MS:
        name = f"{interval} ms"
        rps = median_of(results, name, "rps")
        cpu = median_of(results, name, "gateway_cpu")
        per_request = cpu / rps * 1e6 if rps else float("nan")
        base = base or per_request
        lines.append(
            f"| {name} | {rps:,.0f} | {cpu:.0%} | {per_request:,.0f} | {per_request / base:.2f}x |"
        )
    errors = sum(r.errors for r in results)
    lines += ["", f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}`.", END, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings = dataclasses.replace(
        parse_args(argv, __doc__), concurrency=CONNECTIONS, max_tokens=200
    )
    with open_harness("progress_cost.py", settings, argv) as run:
        workdir, services = run.workdir, run.services
        db_url = f"sqlite:///{workdir / 'ledger.db'}"
        key, _ = procs.create_key(db_url, "bench")
        sim = Service("sim-paced", settings.client_core, SIM, workdir)
        services.append(sim)
        sim_url = sim.wait_listening()
        targets = []
        for interval in INTERVALS_MS:
            journal = workdir / f"journal-{interval}"
            extra = f'[journal]\ndir = "{journal}"\nprogress_interval_ms = {interval}\n'
            gateway = gateway_service(
                f"gateway-{interval}ms", settings, workdir, sim_url, db_url, extra
            )
            services.append(gateway)
            url = gateway.wait_listening() + "/v1/completions"
            wait_serving(url, key, gateway)
            targets.append(Target(f"{interval} ms", gateway, url, key))
        results = rotate_saturation(settings, targets, stream=True)
    meta = run.meta("progress", settings)
    publish(
        meta,
        {"runs": [vars(r) for r in results]},
        section(results, meta),
        BEGIN,
        END,
        settings.quick,
    )
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
