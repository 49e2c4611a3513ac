"""Gateway overhead: the gateway in front of `gateway sim` against the simulator addressed directly
and against peer proxies (vllm-router, nginx) in front of the same simulator.

    python benchmarks/overhead.py            # 3 rounds of 10 s runs, about 10 minutes
    python benchmarks/overhead.py --quick    # 1 round of 2 s runs: a smoke test

Run it with the project's interpreter (`.venv/bin/python`, where `gateway._core` is built). In one
run, on the same load, it measures for non-streaming and for streaming completions
(`"max_tokens": 16`, a short prompt; the simulator with `--ttft-ms 0 --itl-ms 0`), on every
target:

- throughput at saturation: `loadgen --concurrency C` (closed loop), successful requests/s, and
  the CPU time the target's processes (children included) spent per request meanwhile;
- latency at a fixed moderate rate: `loadgen --rate R` (open loop, 500 req/s by default), p50
  and p99 from the due time of each request; "added" is the target's figure minus the direct one.

Pinning (two cores): the gateway runs on core 1 (`taskset -c 1`, its Rust threads and its
Python control plane alike; `TOKENGATE_WORKER_THREADS=1` for it and the simulator, one tokio
worker per pinned core); the simulator and the load generator share core 0 (`taskset -c 0`),
and so do they in the direct runs, which therefore differ from the gateway runs only by the
gateway. Every other target (another build, the peers) runs on the gateway's core, one worker.
The CPU use of each target during its saturation runs is reported beside its throughput: near
100% means its core was the bottleneck, well below it means core 0 was.

Auth and metering are on: the harness creates a tenant and an API key with the `gateway` CLI in a
temporary ledger, and every request (to every target, so all read the same bytes) carries
`Authorization: Bearer <key>`; the gateway meters each request into that ledger.

Peers (`peers.py`), each compared with the gateway in a table of its own (throughput and CPU per
request as ratios, the latency each adds), unless `--no-vllm-router` / `--no-nginx`:

- vllm-router, vLLM's Rust router (no auth, no metering), `round_robin` over the one simulator,
  one tokio worker thread. The harness installs it: the pinned `benchmarks/peers-requirements.txt`
  into a virtual environment of its own, `benchmarks/.peers/vllm-router/` (git-ignored), on first
  use; the gateway's environment is left alone.
- nginx as a plain reverse proxy (one worker process, keep-alive upstream connections,
  `proxy_buffering off` so SSE streams flow): the ceiling a proxy reaches on this machine with
  this pinning. Used when `nginx` is on PATH; the harness never installs it (Debian:
  `apt-get install -y nginx-light`). Without it the harness says so and leaves it out.

Another build: `--baseline PATH/.venv/bin/python` runs that checkout's gateway (the previous main,
say, built in a worktree of its own) as one more target, `baseline`, pinned like this one, with a
copy of the ledger, and adds a table of this build against it.

Tracing: `--traced` runs this build a second time as one more target, `traced`, with
`[telemetry]` on at `sample_ratio = 1.0` (every request's spans exported over OTLP/gRPC, to a
receiver the harness runs on loopback), and adds a table of the gateway with tracing off against
it.

The targets take turns, in an order that rotates by one each round, so that drift on a shared
machine hits all of them; the tables report the median over rounds. The load generator is
`rust/loadgen` (built here with `cargo build --release -p gateway-loadgen` unless `--loadgen` is
given). Results: a section of `benchmarks/RESULTS.md` (replaced on each full run; `--quick` only
prints it) and the raw reports in `benchmarks/out/` (not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.ledger.db import open_ledger
from harness import (
    OUT,
    RESULTS,
    ROOT,
    HarnessError,
    Pinned,
    Settings,
    build_loadgen,
    check_environment,
    gateway_service,
    git_commit,
    instant_sim,
    machine,
    run_loadgen,
    wait_serving,
    write_results,
)
from peers import Nginx, VllmRouter, vllm_router_env
from tests.support import procs
from tests.support.ledger_versions import downgrade
from tests.support.otlp import otlp_receiver

BEGIN = "<!-- overhead.py:begin -->"
END = "<!-- overhead.py:end -->"
MODES = ("completions", "completions, streaming")
# The targets the gateway is compared with, each in a table of its own, in this order.
COMPARED = ("vllm-router", "nginx", "baseline", "traced")


# --- the measurement ------------------------------------------------------------------------------


@dataclass
class Target:
    """One target of the runs: `process` answers at `url` and its CPU time counts as the
    target's (for `direct`, the simulator's); `what` describes it in the report."""

    name: str
    url: str
    process: Pinned
    what: str = ""


@dataclass
class Run:
    round: int
    mode: str
    kind: str  # "saturation" or "rate"
    target: str
    report: dict[str, Any]
    # CPU use over the measured window, as a fraction of one core: the target's processes, and
    # the simulator's.
    cpu: float
    sim_cpu: float

    def pick(self, what: str) -> float:
        """`rps`, `cpu`, `cpu_us` (CPU µs per successful request) or a latency percentile
        (`p50`, `p99`, ...) in µs."""
        rps = float(self.report["rps"])
        if what == "rps":
            return rps
        if what == "cpu":
            return self.cpu
        if what == "cpu_us":
            return self.cpu * 1e6 / rps if rps else math.nan
        return float(self.report["latency_us"][what])


@dataclass
class Bench:
    settings: Settings
    runs: list[Run] = field(default_factory=list)

    def measure(self, targets: list[Target], sim: Pinned, key: str, round_: int) -> None:
        """One round: every (mode, kind) on each target, in an order that rotates by one each
        round, so that every target goes first, second, ... equally often."""
        shift = round_ % len(targets)
        order = targets[shift:] + targets[:shift]
        for mode in MODES:
            stream = "streaming" in mode
            for kind, rate in (("saturation", None), ("rate", self.settings.rate)):
                for target in order:
                    report, (cpu, sim_cpu) = run_loadgen(
                        self.settings,
                        target.url + "/v1/completions",
                        key,
                        stream=stream,
                        rate=rate,
                        services=(target.process, sim),
                    )
                    run = Run(round_, mode, kind, target.name, report, cpu, sim_cpu)
                    self.runs.append(run)
                    print(f"  round {round_ + 1} {mode:24} {kind:10} {target.name:11} {brief(run)}")

    def median(self, mode: str, kind: str, target: str, pick: str) -> float:
        """The median over rounds of `Run.pick(pick)` for `target`'s `kind` runs of `mode`."""
        values = [
            run.pick(pick)
            for run in self.runs
            if (run.mode, run.kind, run.target) == (mode, kind, target)
        ]
        return statistics.median(values) if values else math.nan

    def added(self, mode: str, target: str, pick: str) -> float:
        """The latency percentile `pick` that `target` adds to the direct one at the fixed rate."""
        return self.median(mode, "rate", target, pick) - self.median(mode, "rate", "direct", pick)

    def paired(
        self, mode: str, kind: str, target: str, other: str, pick: str
    ) -> list[tuple[float, float]]:
        """`Run.pick(pick)` of `target` and of `other` in each round of `kind` runs of `mode`
        that measured both: two figures read under the same machine state."""
        values = {
            (run.round, run.target): run.pick(pick)
            for run in self.runs
            if (run.mode, run.kind) == (mode, kind)
        }
        rounds = sorted({round_ for round_, _ in values})
        return [
            (values[(r, target)], values[(r, other)])
            for r in rounds
            if (r, target) in values and (r, other) in values
        ]

    def round_ratios(self, mode: str, target: str, other: str) -> list[float]:
        """`target`'s saturation throughput over `other`'s in each round that measured both."""
        pairs = self.paired(mode, "saturation", target, other, "rps")
        return [a / b for a, b in pairs if a and b]

    def round_gaps(self, mode: str, target: str, other: str, pick: str) -> list[float]:
        """`target`'s latency percentile `pick` at the fixed rate minus `other`'s, in each round
        that measured both: what one adds beyond the other."""
        return [a - b for a, b in self.paired(mode, "rate", target, other, pick)]

    def problems(self) -> list[str]:
        found = []
        for run in self.runs:
            report = run.report
            if report["errors"] or report["unsent"]:
                found.append(
                    f"round {run.round + 1}, {run.mode}, {run.kind}, {run.target}: "
                    f"{report['errors']} errors of {report['requests']} requests "
                    f"{json.dumps(report['error_kinds'])}, {report['unsent']} unsent"
                )
        return found


def brief(run: Run) -> str:
    r = run.report
    lat = r["latency_us"]
    text = f"{r['rps']:>9.0f} req/s  p50 {lat['p50']:>7.0f} µs  p99 {lat['p99']:>7.0f} µs"
    text += f"  cpu {run.cpu:.0%} ({run.pick('cpu_us'):.0f} µs/req)  sim cpu {run.sim_cpu:.0%}"
    if r["errors"] or r["unsent"]:
        text += f"  ERRORS {r['errors']} unsent {r['unsent']}"
    return text


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# --- the report -----------------------------------------------------------------------------------


def section(bench: Bench, meta: dict[str, Any]) -> str:
    s = bench.settings
    targets: dict[str, str] = meta["targets"]
    others = [
        f"{name} ({what})" for name, what in targets.items() if name not in ("direct", "gateway")
    ]
    lines = [
        BEGIN,
        "## Gateway overhead",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}; machine: nproc "
        f"{meta['machine']['nproc']}, {meta['machine']['cpu']}, Linux {meta['machine']['kernel']}, "
        f"load average {meta['machine']['load']} before the run.",
        "",
        f"Gateway (auth and metering on){''.join(', ' + o for o in others)} each pinned to core "
        f"{s.gateway_core}, one worker thread; `gateway sim` (ttft 0, itl 0) and `loadgen` on "
        f"core {s.client_core}, for the direct runs as well. `/v1/completions`, `max_tokens` 16. "
        f"Throughput: closed loop, {s.concurrency} connections. Latency: open loop at "
        f"{s.rate:g} req/s (up to {s.concurrency} connections), measured from each request's due "
        f"time. Medians of {s.rounds} round(s) of {s.duration_s:g} s after {s.warmup_s:g} s of "
        f"warm-up, the {len(targets)} targets taking turns in an order that rotates from round "
        "to round.",
        "",
        f"| mode | target | req/s | / direct | CPU | CPU µs / req | p50 / p99 µs at {s.rate:g} "
        "req/s | added p50 / p99 µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        direct_rps = bench.median(mode, "saturation", "direct", "rps")
        for name in targets:
            rps = bench.median(mode, "saturation", name, "rps")
            at = [bench.median(mode, "rate", name, p) for p in ("p50", "p99")]
            p50, p99 = (bench.added(mode, name, p) for p in ("p50", "p99"))
            added = "—" if name == "direct" else f"{p50:+,.0f} / {p99:+,.0f}"
            lines.append(
                f"| {mode} | {name} | {rps:,.0f} | {ratio(rps, direct_rps):.2f} "
                f"| {bench.median(mode, 'saturation', name, 'cpu'):.0%} "
                f"| {bench.median(mode, 'saturation', name, 'cpu_us'):,.0f} "
                f"| {at[0]:,.0f} / {at[1]:,.0f} | {added} |"
            )
    lines += [
        "",
        "CPU: the target's processes' CPU time (children included; for direct, the simulator's) "
        "during its saturation runs, as a share of one core (100% = its core was the "
        "bottleneck), and per successful request.",
    ]
    lines += [f"{name}: skipped ({why})." for name, why in meta["skipped"].items()]
    for other in COMPARED:
        if other in targets:
            lines += comparison_table(bench, other, targets[other])
    if problems := bench.problems():
        lines += ["", "**Errors during this run** (figures above include only successes):", ""]
        lines += [f"- {p}" for p in problems]
    lines += ["", f"Raw reports: `benchmarks/out/{meta['raw']}` (not committed).", END, ""]
    return "\n".join(lines)


def comparison_table(bench: Bench, other: str, what: str) -> list[str]:
    """The gateway against `other` (a peer, the baseline build, this build traced), measured in
    the same rounds: throughput and CPU per request as ratios, and the latency each adds."""
    title = {
        "baseline": f"This build against the baseline build ({what})",
        "traced": f"tokengate against itself with {what}",
    }.get(other, f"tokengate against {what}")
    lines = [
        "",
        f"{title}, pinned alike and measured in the same rounds:",
        "",
        f"| mode | req/s gateway / {other} | CPU µs / req gateway / {other} "
        f"| gateway added p50 / p99 µs | {other} added p50 / p99 µs |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        cells = []
        for pick in ("rps", "cpu_us"):
            gateway = bench.median(mode, "saturation", "gateway", pick)
            cells.append(f"{ratio(gateway, bench.median(mode, 'saturation', other, pick)):.2f}")
        for target in ("gateway", other):
            p50, p99 = (bench.added(mode, target, p) for p in ("p50", "p99"))
            cells.append(f"{p50:+,.0f} / {p99:+,.0f}")
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Throughput of the gateway over {other}'s, round by round (one machine's drift moves "
        "both alike within a round):",
    ]
    lines += [
        f"- {mode}: " + ", ".join(f"{r:.2f}" for r in bench.round_ratios(mode, "gateway", other))
        for mode in MODES
    ]
    lines += [
        "",
        f"Latency at {bench.settings.rate:.0f} req/s, the gateway's minus {other}'s in the same "
        "round, in µs (negative: the gateway adds less), and the median of those differences:",
    ]
    for mode in MODES:
        cells = []
        for pick in ("p50", "p99"):
            gaps = bench.round_gaps(mode, "gateway", other, pick)
            if gaps:
                listed = ", ".join(f"{g:+,.0f}" for g in gaps)
                cells.append(f"{pick} {listed} (median {statistics.median(gaps):+,.0f})")
        if cells:
            lines.append(f"- {mode}: " + "; ".join(cells))
    return lines


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs; no RESULTS.md")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--duration-s", type=float, help="measured seconds per run (10, quick 2)")
    parser.add_argument("--warmup-s", type=float, help="warm-up seconds per run (2, quick 0.5)")
    parser.add_argument("--concurrency", type=int, default=64, help="loadgen connections")
    parser.add_argument("--rate", type=float, default=500.0, help="fixed rate, req/s")
    parser.add_argument("--gateway-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0, help="simulator and loadgen")
    parser.add_argument("--loadgen", type=Path, help="loadgen binary (default: build it)")
    parser.add_argument(
        "--no-nginx", action="store_true", help="skip the nginx peer (used when on PATH)"
    )
    parser.add_argument(
        "--no-vllm-router",
        action="store_true",
        help="skip the vllm-router peer (installed in benchmarks/.peers/ on first use)",
    )
    parser.add_argument(
        "--baseline", type=Path, help="another build's python (.venv/bin/python) to compare with"
    )
    parser.add_argument(
        "--traced", action="store_true", help="also this build with tracing on (sample_ratio 1)"
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    return Settings(
        rounds=args.rounds or (1 if quick else 3),
        duration_s=args.duration_s or (2.0 if quick else 10.0),
        warmup_s=args.warmup_s if args.warmup_s is not None else (0.5 if quick else 2.0),
        concurrency=args.concurrency,
        rate=args.rate,
        gateway_core=args.gateway_core,
        client_core=args.client_core,
        loadgen=args.loadgen.resolve() if args.loadgen else Path(),
        quick=quick,
        no_nginx=args.no_nginx,
        no_vllm_router=args.no_vllm_router,
        baseline=args.baseline.absolute() if args.baseline else None,
        traced=args.traced,
    )


def find_peers(settings: Settings) -> dict[str, str]:
    """Sets the peers' binaries in `settings` (installing vllm-router if needed); returns why
    each peer left out is."""
    skipped: dict[str, str] = {}
    if settings.no_vllm_router:
        skipped["vllm-router"] = "--no-vllm-router"
    else:
        try:
            settings.vllm_router = vllm_router_env()
        except HarnessError as exc:
            skipped["vllm-router"] = f"could not be installed: {str(exc).splitlines()[0]}"
    if settings.no_nginx:
        skipped["nginx"] = "--no-nginx"
    elif found := shutil.which("nginx"):
        settings.nginx = Path(found)
    else:
        skipped["nginx"] = "nginx not found on PATH; Debian: apt-get install -y nginx-light"
    for name, why in skipped.items():
        print(f"{name} skipped ({why})", flush=True)
    return skipped


_SCHEMA_VERSION = "from gateway.ledger.schema import SCHEMA_VERSION; print(SCHEMA_VERSION)"


def ledger_copy(workdir: Path, name: str, python: Path | None = None) -> str:
    """A copy of the ledger (so the same key) for another gateway, so its own journal; taken
    back to the schema of `python`'s build (an older build refuses a newer ledger)."""
    copy = workdir / f"{name}.db"
    shutil.copyfile(workdir / "ledger.db", copy)
    if python is not None:
        version = subprocess.run(
            [str(python), "-c", _SCHEMA_VERSION], capture_output=True, text=True, check=True
        ).stdout.strip()
        with open_ledger(f"sqlite:///{copy}") as conn:
            downgrade(conn, int(version))
    return f"sqlite:///{copy}"


def start_targets(
    settings: Settings,
    workdir: Path,
    key: str,
    services: list[Pinned],
    collector: contextlib.ExitStack,
) -> tuple[Pinned, list[Target]]:
    """Starts the simulator and every target in front of it (each added to `services` as it
    starts, for the caller to stop), and waits until each serves a completion."""
    db_url = f"sqlite:///{workdir / 'ledger.db'}"
    sim = instant_sim(settings, workdir)
    services.append(sim)
    sim_url = sim.wait_listening()
    targets = [Target("direct", sim_url, sim, "the simulator")]
    gateway = gateway_service("gateway", settings, workdir, sim_url, db_url)
    services.append(gateway)
    targets.append(Target("gateway", gateway.wait_listening(), gateway, "this build"))
    if settings.baseline is not None:
        db = ledger_copy(workdir, "baseline", settings.baseline)
        other = gateway_service(
            "baseline", settings, workdir, sim_url, db, python=settings.baseline
        )
        services.append(other)
        what = f"commit {git_commit(settings.baseline.parents[2])}"
        targets.append(Target("baseline", other.wait_listening(), other, what))
    if settings.traced:
        _, endpoint = collector.enter_context(otlp_receiver())
        telemetry = f'[telemetry]\notlp_endpoint = "{endpoint}"\nsample_ratio = 1.0\n'
        db = ledger_copy(workdir, "traced")
        traced = gateway_service("traced", settings, workdir, sim_url, db, extra=telemetry)
        services.append(traced)
        what = "tracing on, `sample_ratio = 1.0`"
        targets.append(Target("traced", traced.wait_listening(), traced, what))
    peers: list[Nginx | VllmRouter] = []
    if settings.vllm_router is not None:
        peers.append(VllmRouter(settings.vllm_router, settings.gateway_core, sim_url, workdir))
        services.append(peers[-1])
    if settings.nginx is not None:
        peers.append(Nginx(settings.nginx, settings.gateway_core, sim_url, workdir))
        services.append(peers[-1])
    targets += [Target(peer.name, peer.url, peer, peer.label) for peer in peers]
    for target in targets:
        wait_serving(target.url + "/v1/completions", key, target.process)
    return sim, targets


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    command = shlex.join(
        ["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)]
    )
    check_environment(settings)
    skipped = find_peers(settings)
    if settings.loadgen == Path():
        settings.loadgen = build_loadgen()
    if not settings.loadgen.is_file():
        raise HarnessError(f"no loadgen binary at {settings.loadgen}")

    stamp = datetime.now(UTC)
    host = machine()
    if float(host["load"]) > 0.5:
        print(f"warning: load average {host['load']}: other work will skew the figures")
    workdir = Path(tempfile.mkdtemp(prefix="tokengate-overhead-"))
    db_url = f"sqlite:///{workdir / 'ledger.db'}"
    key, _ = procs.create_key(db_url, "bench")
    bench = Bench(settings)
    services: list[Pinned] = []
    collector = contextlib.ExitStack()
    try:
        sim, targets = start_targets(settings, workdir, key, services, collector)
        for target in targets:
            core = settings.client_core if target.process is sim else settings.gateway_core
            print(f"{target.name} ({target.what}) {target.url} (core {core})", flush=True)
        print(f"loadgen {settings.loadgen} (core {settings.client_core})", flush=True)
        for round_ in range(settings.rounds):
            bench.measure(targets, sim, key, round_)
    except BaseException:
        print(f"logs and ledger kept in {workdir}", file=sys.stderr)
        raise
    finally:
        for service in reversed(services):
            status = service.stop()
            if not service.stopped_cleanly(status):
                print(
                    f"{service.name} exited with {status}:\n{service.log_tail()}", file=sys.stderr
                )
        collector.close()
    usage = procs.cli("usage", "--db", db_url, "--json", timeout=120)
    shutil.rmtree(workdir, ignore_errors=True)

    OUT.mkdir(parents=True, exist_ok=True)
    raw_name = f"overhead-{stamp:%Y%m%dT%H%M%SZ}{'-quick' if settings.quick else ''}.json"
    meta: dict[str, Any] = {
        "command": command,
        "date": f"{stamp:%Y-%m-%d %H:%M} UTC",
        "commit": git_commit(),
        "machine": host,
        "raw": raw_name,
        "targets": {target.name: target.what for target in targets},
        "skipped": skipped,
    }
    raw = {
        **meta,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()},
        "runs": [vars(run) for run in bench.runs],
        "ledger_usage": json.loads(usage) if usage.strip() else None,
    }
    (OUT / raw_name).write_text(json.dumps(raw, indent=2) + "\n")
    text = section(bench, meta)
    print("\n" + text)
    if settings.quick:
        print(f"(--quick: RESULTS.md left alone; raw reports in benchmarks/out/{raw_name})")
    else:
        write_results(text, BEGIN, END)
        print(f"written to {RESULTS.relative_to(ROOT)} and benchmarks/out/{raw_name}")
    if problems := bench.problems():
        print(f"{len(problems)} run(s) had errors or fell behind their rate", file=sys.stderr)
        return 1
    return 0


def terminate(signum: int, frame: object) -> None:
    """SIGTERM (or SIGHUP) ends the harness like Ctrl-C does: through `main`'s `finally`, which
    stops the simulator, the gateways and the peers. A second one is ignored, so as not to cut
    that short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    try:
        sys.exit(main())
    except (HarnessError, procs.CommandError) as exc:
        print(f"overhead.py: {exc}", file=sys.stderr)
        sys.exit(2)
