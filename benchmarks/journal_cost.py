"""The cost of the durable usage journal: the gateway with events kept in memory until the ledger
has them ("memory"), against the journal synced on an interval ("interval", the default) and
synced before each response ends ("always").

    python benchmarks/journal_cost.py            # 3 rounds of 10 s runs, about 15 minutes
    python benchmarks/journal_cost.py --quick    # 1 round of 2 s runs: a smoke test
    python benchmarks/journal_cost.py --saturation-only --rounds 50 --duration-s 3

Run it with the project's interpreter (`.venv/bin/python`) after `make build`. Three gateways in
front of one `gateway sim` (answering at once, 16 tokens), pinned like `overhead.py` (gateways
on core 1, simulator and loadgen on core 0), their journals in the harness's temporary directory
(the same disk as /tmp), or under `--journal-dir DIR` (the disk a deployment would journal to;
each section names the file system its journals were on). For non-streaming and streaming
completions:
- throughput at saturation (`loadgen`, closed loop, 64 connections), the gateway's CPU per
  request beside it: the gateway is then the bottleneck, the worst case for the journal;
- latency at 500 req/s (open loop, from each request's due time), p50 and p99: what a user sees
  on every call at a moderate load.
The targets take turns in a rotating order. Then the same in front of a simulator paced like a
model (20 ms to the first token, 5 ms between tokens, 32 tokens), streaming over 256
connections: the worker is the bottleneck, as in production. At saturation a fourth gateway,
"control", is configured as "memory" is: two identical gateways read apart by what this machine
cannot resolve, and that spread is printed beside each ratio. A ratio is the median over rounds
of the two targets' figures in the same round (the machine's drift moves both alike within a
round); the other figures are medians over rounds. Results: a section of
`benchmarks/RESULTS.md` (`--quick` only prints it) and raw reports in `benchmarks/out/`.

`--saturation-only` runs "memory", "interval" and "control" at saturation alone, for as many
rounds as you ask: each ratio, throughput and CPU per request, with a 95% interval of its median
(bootstrap over rounds), in a section of its own. On a shared 2-core machine one round's ratio
moves by 7 to 10 points, and 50 rounds (about 27 minutes) narrow the interval to 4 to 6.

`--shared-core` runs "memory", "interval" and "control" at saturation all at once, sharing the
gateway core, each with a loadgen of its own (`harness.share_core`), for as many rounds as you
ask: each one's CPU a request, from before its load until it is idle again, by thread. The
machine's drift then hits the three alike at the same moments, and the ratios resolve to about a
point (30 rounds of 3 s, about 8 minutes). The journal's sync, done once a tick whatever the
rate, weighs three times what it does on a core of its own; the section also states the ratio
with the syncer's CPU counted at the rate the core serves alone.

`--pool REPORT...` runs nothing: it pools the rounds of earlier `--saturation-only` runs (their
raw reports in `benchmarks/out/`), each round paired within its own run, and prints each ratio's
median with its interval over all of them.

    python benchmarks/journal_cost.py --pool benchmarks/out/journal-resolved-*.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import (
    Pinned,
    Saturation,
    Service,
    Settings,
    SharedRun,
    Target,
    gateway_service,
    median_of,
    open_harness,
    parse_args,
    publish,
    rotate_saturation,
    run_loadgen,
    share_core,
    wait_serving,
)

BEGIN = "<!-- journal_cost.py:begin -->"
END = "<!-- journal_cost.py:end -->"
RESOLVED_BEGIN = "<!-- journal_cost.py --saturation-only:begin -->"
RESOLVED_END = "<!-- journal_cost.py --saturation-only:end -->"
SHARED_BEGIN = "<!-- journal_cost.py --shared-core:begin -->"
SHARED_END = "<!-- journal_cost.py --shared-core:end -->"

# The gateway's journal settings, by target name.
JOURNALS = {
    "memory": "[journal]\nenabled = false\n",
    "interval": '[journal]\ndir = "{dir}"\nsync = "interval"\n',
    "always": '[journal]\ndir = "{dir}"\nsync = "always"\n',
}
# A second gateway configured as "memory" is, at saturation only: the resolution of a ratio.
CONTROL = "control"
RATE = 500.0  # req/s of the latency runs
# The modes measured at saturation against the instant simulator: name, and whether it streams.
MODES = (("completions", False), ("completions, streaming", True))


@dataclasses.dataclass
class Latency:
    """One fixed-rate run's figures, in microseconds from each request's due time."""

    round: int
    target: str
    p50: float
    p99: float
    errors: int


def rotate_latency(settings: Settings, targets: list[Target], *, stream: bool) -> list[Latency]:
    """`settings.rounds` rounds of one run at `RATE` per target, in a rotating order."""
    results = []
    for round_ in range(settings.rounds):
        shift = round_ % len(targets)
        for target in targets[shift:] + targets[:shift]:
            report, _ = run_loadgen(settings, target.url, target.key, stream=stream, rate=RATE)
            latency = report["latency_us"]
            errors = int(report["errors"]) + int(report["unsent"])
            results.append(Latency(round_, target.name, latency["p50"], latency["p99"], errors))
            print(
                f"  {target.name:>8}: p50 {latency['p50']:>6.0f} µs  p99 {latency['p99']:>6.0f} µs"
            )
    return results


def latency_of(results: list[Latency], target: str, pick: str) -> float:
    return float(statistics.median(getattr(r, pick) for r in results if r.target == target))


def paired_ratios(
    results: list[Saturation], target: str, base: str, pick: str = "rps"
) -> list[float]:
    """`target`'s throughput (or CPU per request, `pick="cpu"`) over `base`'s, round by round."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if r.rps:
            value = r.rps if pick == "rps" else r.gateway_cpu / r.rps
            by_round.setdefault(r.round, {})[r.target] = value
    return [
        values[target] / values[base]
        for _, values in sorted(by_round.items())
        if values.get(base) and target in values
    ]


def median_interval(values: list[float], draws: int = 4000) -> tuple[float, float]:
    """A 95% interval of the median of `values`: the percentile bootstrap, its draws seeded, so
    one report reads the same every time it is computed."""
    rng = random.Random(16)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(draws * 0.025)], medians[int(draws * 0.975) - 1]


def saturation_table(runs: dict[str, list[Saturation]]) -> list[str]:
    lines = [
        "| mode | memory req/s | interval req/s | always req/s | interval / memory "
        "| always / memory | control / memory | gateway CPU µs / req (memory, interval, always) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, results in runs.items():
        rps = {name: median_of(results, name, "rps") for name in JOURNALS}
        ratio = {
            name: statistics.median(paired_ratios(results, name, "memory"))
            for name in ("interval", "always", CONTROL)
        }
        cpu = {
            name: statistics.median(
                r.gateway_cpu * 1e6 / r.rps for r in results if r.target == name and r.rps
            )
            for name in JOURNALS
        }
        lines.append(
            f"| {mode} | {rps['memory']:,.0f} | {rps['interval']:,.0f} | {rps['always']:,.0f} "
            f"| {ratio['interval']:.3f} | {ratio['always']:.3f} | {ratio[CONTROL]:.3f} "
            f"| {cpu['memory']:.1f}, {cpu['interval']:.1f}, {cpu['always']:.1f} |"
        )
    return lines


def rounds_of_ratios(runs: dict[str, list[Saturation]]) -> list[str]:
    """Each mode's ratios to "memory", round by round."""
    lines = []
    for mode, results in runs.items():
        cells = [
            f"{name} " + ", ".join(f"{x:.2f}" for x in paired_ratios(results, name, "memory"))
            for name in ("interval", CONTROL)
        ]
        lines.append(f"- {mode}: " + "; ".join(cells))
    return lines


def latency_table(latencies: dict[str, list[Latency]]) -> list[str]:
    lines = [
        f"| mode at {RATE:.0f} req/s | memory p50 / p99 µs | interval p50 / p99 µs "
        "| always p50 / p99 µs |",
        "|---|---:|---:|---:|",
    ]
    for mode, results in latencies.items():
        cells = [
            f"{latency_of(results, name, 'p50'):,.0f} / {latency_of(results, name, 'p99'):,.0f}"
            for name in JOURNALS
        ]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def section(
    runs: dict[str, list[Saturation]], latencies: dict[str, list[Latency]], meta: dict[str, Any]
) -> str:
    lines = [
        BEGIN,
        "## The usage journal: interval and always against events in memory",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start, journals on {meta['journals']}. Gateways on core 1, "
        f"simulator and loadgen on core 0; {meta['rounds']} rounds of "
        f"{meta['duration_s']:.0f} s, the targets taking turns; "
        "a ratio is the median of the rounds' ratios, the other figures medians over rounds. "
        "Throughput: closed loop, 64 connections (the paced worker: "
        f"{PACED_CONNECTIONS}). `control` is a second gateway configured as `memory` is: how "
        "far apart this machine reads two identical gateways.",
        "",
        *saturation_table(runs),
        "",
        "Throughput over `memory`'s, round by round:",
        "",
        *rounds_of_ratios(runs),
        "",
        "Latency from each request's due time, open loop (the simulator answers at once, so "
        "this is the gateway's own time plus the simulator's):",
        "",
        *latency_table(latencies),
    ]
    errors = sum(r.errors for results in runs.values() for r in results)
    errors += sum(r.errors for results in latencies.values() for r in results)
    lines += ["", f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}`.", END, ""]
    return "\n".join(lines)


# A worker paced like a model: the gateway is not the bottleneck, as in production.
PACED_SIM = [
    *("sim", "--port", "0", "--model", "sim-model", "--ttft-ms", "20", "--itl-ms", "5"),
    *("--max-num-seqs", "1024", "--max-output-tokens", "32", "--log-level", "WARNING"),
]
PACED_CONNECTIONS = 256
PACED_MODE = "streaming, paced worker, 256 connections"


@contextlib.contextmanager
def journal_root(journal_dir: Path | None) -> Iterator[Path | None]:
    """Where the gateways' journals go: a fresh directory under `journal_dir`, removed on the
    way out (enter it before the harness, so that the gateways have stopped by then), or `None`
    for the harness's work directory."""
    if journal_dir is None:
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="tokengate-journals-", dir=journal_dir))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def file_system(path: Path) -> str:
    """The type and source of the file system `path` is on ("ext4 /dev/vda"), as `findmnt`
    names them; "unknown" where it cannot."""
    try:
        found = subprocess.run(
            ["findmnt", "--noheadings", "--output", "FSTYPE,SOURCE", "--target", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # Mounts stacked on one mount point are listed bottom first: the last is the one in use.
    lines = found.stdout.strip().splitlines()
    return " ".join(lines[-1].split()) if lines else "unknown"


def start_gateways(
    settings: Settings,
    workdir: Path,
    db_url: str,
    key: str,
    sim_url: str,
    services: list[Pinned],
    prefix: str = "",
    names: tuple[str, ...] = (*JOURNALS, CONTROL),
    journals: Path | None = None,
) -> list[Target]:
    """A gateway per name (a `JOURNALS` entry, or `CONTROL`) in front of `sim_url`, serving,
    its journal under `journals` (default `workdir`); each is added to `services` as soon as it
    starts."""
    targets = []
    for name in names:
        extra = JOURNALS.get(name, JOURNALS["memory"])
        extra = extra.format(dir=(journals or workdir) / f"{prefix}{name}-journal")
        gateway = gateway_service(
            f"gateway-{prefix}{name}", settings, workdir, sim_url, db_url, extra
        )
        services.append(gateway)
        url = gateway.wait_listening() + "/v1/completions"
        wait_serving(url, key, gateway)
        targets.append(Target(name, gateway, url, key))
    return targets


# The targets of `--saturation-only`.
RESOLVED = ("memory", "interval", CONTROL)
# The journal's syncer thread, as the gateway names it.
SYNCER = "usage-journal"


def syncer_cost(results: list[Saturation]) -> tuple[list[float], list[float]]:
    """In each of `interval`'s runs that counted the gateway's threads: the syncer's CPU a
    request in µs, and its share of the gateway's CPU a request."""
    runs = [r for r in results if r.target == "interval" and r.rps and r.gateway_cpu]
    counted = [r for r in runs if SYNCER in r.threads]
    return (
        [r.threads[SYNCER] * 1e6 / r.rps for r in counted],
        [r.threads[SYNCER] / r.gateway_cpu for r in counted],
    )


def median_cell(values: list[float]) -> str:
    """A table cell: the median of `values`, in bold, and the 95% interval of it."""
    low, high = median_interval(values)
    return f"**{statistics.median(values):.3f}** ({low:.3f} to {high:.3f})"


def resolved_section(runs: dict[str, list[Saturation]], meta: dict[str, Any]) -> str:
    """`--saturation-only`'s section: each ratio with the interval its rounds resolve."""
    lines = [
        RESOLVED_BEGIN,
        "## The usage journal at saturation, resolved: interval against events in memory",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start, journals on {meta['journals']}. Pinned as in the "
        f"section above; {meta['rounds']} rounds of {meta['duration_s']:.0f} s, `memory`, "
        "`interval` and `control` taking turns, closed loop over 64 connections. Each ratio is "
        "the median of the rounds' paired ratios, with a 95% interval of that median "
        "(percentile bootstrap over rounds) in brackets; `control` is a second gateway "
        "configured as `memory` is.",
        "",
        "| mode | memory req/s | interval req/s | throughput interval / memory "
        "| throughput control / memory | CPU a request interval / memory "
        "| CPU a request control / memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, results in runs.items():
        lines.append(
            f"| {mode} | {median_of(results, 'memory', 'rps'):,.0f} "
            f"| {median_of(results, 'interval', 'rps'):,.0f} | "
            + " | ".join(
                median_cell(paired_ratios(results, name, "memory", pick))
                for pick in ("rps", "cpu")
                for name in ("interval", CONTROL)
            )
            + " |"
        )
    syncer = {mode: syncer_cost(results) for mode, results in runs.items()}
    if all(µs for µs, _ in syncer.values()):
        lines += [
            "",
            f"The journal's syncer (its thread, `{SYNCER}`, counted to the nanosecond by the "
            "scheduler: `/proc/<pid>/task/*/schedstat`), a request of `interval`'s: "
            + "; ".join(
                f"{mode} **{statistics.median(µs):.2f} µs**, "
                f"{statistics.median(share):.1%} of its CPU a request"
                for mode, (µs, share) in syncer.items()
            )
            + ". A request's own records are written on its thread, among the rest of its work.",
        ]
    errors = sum(r.errors for results in runs.values() for r in results)
    lines += [
        "",
        f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}`.",
        RESOLVED_END,
        "",
    ]
    return "\n".join(lines)


def shared_pairs(
    results: list[SharedRun], target: str, base: str = "memory"
) -> list[tuple[SharedRun, SharedRun, float]]:
    """`target`'s and `base`'s runs of each round, with the round's throughput over all targets
    (what the shared core served)."""
    by_round: dict[int, dict[str, SharedRun]] = {}
    for r in results:
        by_round.setdefault(r.round, {})[r.target] = r
    return [
        (runs[target], runs[base], sum(r.rps for r in runs.values()))
        for _, runs in sorted(by_round.items())
        if target in runs and base in runs and runs[target].requests and runs[base].requests
    ]


def shared_section(runs: dict[str, list[SharedRun]], meta: dict[str, Any]) -> str:
    """`--shared-core`'s section: CPU a request of each target, the ratios with their intervals,
    and where `interval`'s extra CPU goes, by thread."""
    lines = [
        SHARED_BEGIN,
        "## The usage journal at saturation, sharing one core: interval against events in memory",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine']['cpu']} ({meta['machine']['nproc']} cores), load "
        f"{meta['machine']['load']} at start, journals on {meta['journals']}. `memory`, "
        "`interval` and `control` pinned to core 1 together, each driven at saturation by a "
        f"loadgen of its own (64 connections, on core 0 with the simulator), all at once; "
        f"{meta['rounds']} rounds of {meta['duration_s']:.0f} s. A gateway's CPU a request is "
        "its process's CPU (the scheduler's count, `schedstat`, every thread) over the requests "
        "it served (`/metrics`), both counted from before its load until it is idle again after "
        "it. A ratio is `memory`'s CPU a request over the other's, the throughput each would "
        "have on a core of its own: the median of the rounds' ratios, a 95% interval of that "
        "median in brackets. `control` is a second gateway configured as `memory` is.",
        "",
        "| mode | req/s each (memory, interval, control) | CPU µs a request (memory, interval, "
        "control) | interval / memory | control / memory | interval / memory, the syncer at "
        "a whole core's rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    breakdown = []
    for mode, results in runs.items():
        rps = [statistics.median(r.rps for r in results if r.target == n) for n in RESOLVED]
        cpu = [
            statistics.median(r.cpu_per_request() * 1e6 for r in results if r.target == n)
            for n in RESOLVED
        ]
        pairs = {n: shared_pairs(results, n) for n in ("interval", CONTROL)}
        ratio = {
            n: [b.cpu_per_request() / t.cpu_per_request() for t, b, _ in ps]
            for n, ps in pairs.items()
        }
        # The syncer's work is per tick: on a core of its own the gateway would serve what the
        # shared core served, so its CPU a request there is its share here of that.
        alone = [
            b.cpu_per_request()
            / (t.cpu_per_request() - t.cpu_per_request(SYNCER) * (1 - t.rps / total))
            for t, b, total in pairs["interval"]
        ]
        lines.append(
            f"| {mode} | {', '.join(f'{x:,.0f}' for x in rps)} "
            f"| {', '.join(f'{x:.1f}' for x in cpu)} | {median_cell(ratio['interval'])} "
            f"| {median_cell(ratio[CONTROL])} | {median_cell(alone)} |"
        )
        cells = []
        for thread in ("tokengate", "python", SYNCER):
            extra = [
                (t.cpu_per_request(thread) - b.cpu_per_request(thread)) * 1e6
                for t, b, _ in pairs["interval"]
            ]
            cells.append(f"`{thread}` {statistics.median(extra):+.2f}")
        breakdown.append(f"- {mode}: " + ", ".join(cells))
    errors = sum(r.errors for results in runs.values() for r in results)
    lines += [
        "",
        "`interval`'s CPU a request over `memory`'s, by thread (µs, the median of the rounds' "
        "differences; `tokengate` is the tokio thread that serves the requests, `python` the "
        f"control plane and the ledger's writes, `{SYNCER}` the journal's syncer):",
        "",
        *breakdown,
        "",
        f"Errors: {errors}. Raw reports: `benchmarks/out/{meta['raw']}`.",
        SHARED_END,
        "",
    ]
    return "\n".join(lines)


def pooled_ratios(reports: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Each mode's paired ratios to "memory" over the rounds of every report (a
    `--saturation-only` run's raw report), a round paired within its own run: by mode, then by
    `interval`'s and the control's throughput (`rps`) and CPU a request (`cpu`)."""
    pooled: dict[str, dict[str, list[float]]] = {}
    for report in reports:
        for mode, rounds in report["runs"].items():
            results = [Saturation(**r) for r in rounds]
            ratios = pooled.setdefault(mode, {})
            for name in ("interval", CONTROL):
                for pick in ("rps", "cpu"):
                    values = paired_ratios(results, name, "memory", pick)
                    ratios.setdefault(f"{name} {pick}", []).extend(values)
    return pooled


def pooled_table(pooled: dict[str, dict[str, list[float]]]) -> str:
    """`--pool`'s table: each ratio's median over the pooled rounds, with its interval."""
    lines = [
        "| mode | rounds | throughput interval / memory | throughput control / memory "
        "| CPU a request interval / memory | CPU a request control / memory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, ratios in pooled.items():
        cells = [
            median_cell(ratios[key]) if ratios.get(key) else "—"
            for key in ("interval rps", f"{CONTROL} rps", "interval cpu", f"{CONTROL} cpu")
        ]
        rounds = len(ratios.get("interval rps", []))
        lines.append(f"| {mode} | {rounds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pool(paths: list[Path]) -> int:
    reports = [json.loads(path.read_text()) for path in paths]
    print(f"Pooled: {', '.join(path.name for path in paths)}\n")
    print(pooled_table(pooled_ratios(reports)))
    return 0


def resolved(
    settings: Settings, argv: list[str] | None, journal_dir: Path | None, *, shared: bool
) -> int:
    """`--saturation-only` (the targets taking turns), or `--shared-core` (`shared`: all at
    once), each mode's runs published in the section of its own."""
    runs: dict[str, list[Any]] = {}
    with (
        journal_root(journal_dir) as journals,
        open_harness("journal_cost.py", settings, argv) as run,
    ):
        db_url, key = run.sqlite_ledger()
        sim = run.start_instant_sim(settings)
        targets = start_gateways(
            settings,
            run.workdir,
            db_url,
            key,
            sim.wait_listening(),
            run.services,
            names=RESOLVED,
            journals=journals,
        )
        for mode, stream in MODES:
            measure = share_core if shared else rotate_saturation
            runs[mode] = measure(settings, targets, stream=stream)
        journals_on = file_system(journals or run.workdir)
    prefix = "journal-shared" if shared else "journal-resolved"
    meta = {**run.meta(prefix, settings), "journals": journals_on}
    raw = {"runs": {mode: [vars(r) for r in rs] for mode, rs in runs.items()}}
    if shared:
        text, begin, end = shared_section(runs, meta), SHARED_BEGIN, SHARED_END
    else:
        text, begin, end = resolved_section(runs, meta), RESOLVED_BEGIN, RESOLVED_END
    publish(meta, raw, text, begin, end, settings.quick)
    return 1 if any(r.errors for results in runs.values() for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--saturation-only", action="store_true")
    parser.add_argument("--shared-core", action="store_true")
    parser.add_argument("--journal-dir", type=Path)
    parser.add_argument("--pool", type=Path, nargs="+")
    args, rest = parser.parse_known_args(argv)
    if args.pool:
        return pool(args.pool)
    settings = parse_args(rest, __doc__)
    if args.saturation_only or args.shared_core:
        return resolved(settings, argv, args.journal_dir, shared=args.shared_core)
    runs: dict[str, list[Saturation]] = {}
    latencies: dict[str, list[Latency]] = {}
    with (
        journal_root(args.journal_dir) as journals,
        open_harness("journal_cost.py", settings, argv) as run,
    ):
        workdir, services = run.workdir, run.services
        db_url, key = run.sqlite_ledger()
        sim = run.start_instant_sim(settings)
        paced = Service("sim-paced", settings.client_core, PACED_SIM, workdir)
        services.append(paced)
        targets = start_gateways(
            settings, workdir, db_url, key, sim.wait_listening(), services, journals=journals
        )
        for mode, stream in MODES:
            runs[mode] = rotate_saturation(settings, targets, stream=stream)
            measured = [target for target in targets if target.name != CONTROL]
            latencies[mode] = rotate_latency(settings, measured, stream=stream)
        paced_targets = start_gateways(
            settings,
            workdir,
            db_url,
            key,
            paced.wait_listening(),
            services,
            "paced-",
            journals=journals,
        )
        paced_settings = dataclasses.replace(settings, concurrency=PACED_CONNECTIONS)
        runs[PACED_MODE] = rotate_saturation(paced_settings, paced_targets, stream=True)
        journals_on = file_system(journals or run.workdir)
    meta = {**run.meta("journal", settings), "journals": journals_on}
    raw = {
        "runs": {mode: [vars(r) for r in rs] for mode, rs in runs.items()},
        "latencies": {mode: [vars(r) for r in rs] for mode, rs in latencies.items()},
    }
    publish(meta, raw, section(runs, latencies, meta), BEGIN, END, settings.quick)
    failed = any(r.errors for results in runs.values() for r in results)
    return 1 if failed or any(r.errors for rs in latencies.values() for r in rs) else 0


if __name__ == "__main__":
    sys.exit(main())
