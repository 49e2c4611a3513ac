"""gRPC next to HTTP: streaming completions through one gateway over both of its surfaces.

    python benchmarks/grpc_cost.py            # 3 rounds of 10 s runs, about 4 minutes
    python benchmarks/grpc_cost.py --quick    # 1 round of 2 s runs: a smoke test

Run it with the project's interpreter (`.venv/bin/python`) after `make build`. One gateway with
its gRPC API on (`[grpc] port = 0`) in front of one `gateway sim` answering at once (16 tokens),
pinned like `overhead.py` (gateway on core 1, simulator and loadgen on core 0). `loadgen` streams
the same completion three ways: over HTTP/1.1 SSE straight to the simulator ("direct", the
baseline of added latency), through the gateway over HTTP ("http"), and through the gateway over
gRPC (`--grpc`: HTTP/2, `gateway.v1.InferenceService/StreamCompletion`, one connection per
stream, like HTTP/1.1's). For each: throughput at saturation (closed loop, 64 connections) and
latency at a fixed rate (open loop, 200 req/s), time to the first byte (HTTP) or message (gRPC)
and to the end; the three take turns in a rotating order and the table gives medians over
rounds. Results: a section of `benchmarks/RESULTS.md` (`--quick` only prints it) and raw reports
in `benchmarks/out/`.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

from gateway.grpc import GatewayClient
from harness import (
    MODEL,
    PROMPT,
    Harness,
    Settings,
    gateway_service,
    instant_sim,
    open_harness,
    parse_args,
    publish,
    run_loadgen,
    wait_serving,
)
from tests.support import procs

BEGIN = "<!-- grpc_cost.py:begin -->"
END = "<!-- grpc_cost.py:end -->"
TARGETS = ("direct", "http", "grpc")
RATE = 200.0
METHOD = "/gateway.v1.InferenceService/StreamCompletion"
GRPC_LISTENING = r"gRPC API listening on (\S+)"


def section(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def median(target: str, kind: str, pick: str) -> float:
        values = [r[pick] for r in runs if (r["target"], r["kind"]) == (target, kind)]
        return statistics.median(values) if values else float("nan")

    lines = [
        BEGIN,
        "## gRPC next to HTTP: streaming through one gateway",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start. Streaming completions of 16 tokens from an instant "
        f"simulator; gateway on core 1, simulator and loadgen on core 0; saturation with 64 "
        f"connections, latency at {RATE:.0f} req/s (open loop); medians of {meta['rounds']} "
        f"rounds of {meta['duration_s']:.0f} s.",
        "",
        "| target | req/s at saturation | gateway CPU | CPU per call (µs) "
        "| first byte p50 / p99 (µs) | end p50 / p99 (µs) | added at p50 (µs) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    direct_end = median("direct", "rate", "p50")
    for target in TARGETS:

        def at_rate(pick: str, target: str = target) -> float:
            return median(target, "rate", pick)

        added = at_rate("p50") - direct_end
        cpu = median(target, "saturation", "gateway_cpu")
        per_call = median(target, "saturation", "cpu_us")
        lines.append(
            f"| {target} | {median(target, 'saturation', 'rps'):,.0f} | "
            f"{'-' if target == 'direct' else f'{cpu:.0%}'} | "
            f"{'-' if target == 'direct' else f'{per_call:.1f}'} | "
            f"{at_rate('ttfb_p50'):,.0f} / {at_rate('ttfb_p99'):,.0f} | "
            f"{at_rate('p50'):,.0f} / {at_rate('p99'):,.0f} | "
            f"{'-' if target == 'direct' else f'{added:,.0f}'} |"
        )
    ratios = round_ratios(runs)
    errors = sum(r["errors"] for r in runs)
    lines += [
        "",
        f"gRPC's gateway CPU per call over HTTP's, round by round (the two measured back to back): "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; median **{statistics.median(ratios):.2f}**.",
        "",
        f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}`.",
        END,
        "",
    ]
    return "\n".join(lines)


def round_ratios(runs: list[dict[str, Any]]) -> list[float]:
    """Each round's gRPC CPU per call over its HTTP CPU per call, at saturation."""
    per_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["kind"] == "saturation":
            per_round.setdefault(r["round"], {})[r["target"]] = r["cpu_us"]
    return [c["grpc"] / c["http"] for _, c in sorted(per_round.items()) if c.get("http")]


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv, __doc__)
    with open_harness("grpc_cost.py", settings, argv) as run:
        runs = measure(settings, run)
    meta = run.meta("grpc", settings)
    publish(meta, {"runs": runs}, section(runs, meta), BEGIN, END, settings.quick)
    return 1 if any(r["errors"] for r in runs) else 0


def measure(settings: Settings, run: Harness) -> list[dict[str, Any]]:
    """Starts the simulator and the gateway, then every round's runs."""
    workdir = run.workdir
    db_url = f"sqlite:///{workdir / 'ledger.db'}"
    key, _ = procs.create_key(db_url, "bench")
    message = workdir / "request.bin"
    request = GatewayClient.completion_request(MODEL, PROMPT, max_tokens=16)
    message.write_bytes(request.SerializeToString())
    sim = instant_sim(settings, workdir)
    run.services.append(sim)
    sim_url = sim.wait_listening()
    gateway = gateway_service("gateway", settings, workdir, sim_url, db_url, "[grpc]\nport = 0\n")
    run.services.append(gateway)
    gateway_url = gateway.wait_listening()
    wait_serving(gateway_url + "/v1/completions", key, gateway)
    urls = {
        "direct": sim_url + "/v1/completions",
        "http": gateway_url + "/v1/completions",
        "grpc": f"http://{gateway.wait_line(GRPC_LISTENING)[1]}{METHOD}",
    }
    runs: list[dict[str, Any]] = []
    for round_ in range(settings.rounds):
        shift = round_ % len(TARGETS)
        for target in TARGETS[shift:] + TARGETS[:shift]:
            for kind, rate in (("saturation", None), ("rate", RATE)):
                report, cpus = run_loadgen(
                    settings,
                    urls[target],
                    key,
                    stream=True,
                    rate=rate,
                    services=(gateway,),
                    grpc_body=message if target == "grpc" else None,
                )
                lat, ttfb = report["latency_us"], report["ttfb_us"]
                result = {
                    "round": round_,
                    "target": target,
                    "kind": kind,
                    "rps": report["rps"],
                    "p50": lat["p50"],
                    "p99": lat["p99"],
                    "ttfb_p50": ttfb["p50"],
                    "ttfb_p99": ttfb["p99"],
                    "gateway_cpu": cpus[0],
                    # µs of the gateway's CPU per completed stream
                    "cpu_us": cpus[0] / report["rps"] * 1e6 if report["rps"] else float("nan"),
                    "errors": report["errors"] + report["unsent"],
                    "report": report,
                }
                runs.append(result)
                print(
                    f"  round {round_ + 1} {target:6} {kind:10} {report['rps']:>9.0f} req/s"
                    f"  p50 {lat['p50']:>7.0f} µs  p99 {lat['p99']:>7.0f} µs"
                    f"  gateway cpu {cpus[0]:.0%}  errors {result['errors']}",
                    flush=True,
                )
    return runs


if __name__ == "__main__":
    sys.exit(main())
