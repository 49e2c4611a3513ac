"""Gateway overhead: the gateway in front of `gateway sim` against the simulator addressed directly.

    python benchmarks/overhead.py            # 3 rounds of 10 s runs, about 8 minutes
    python benchmarks/overhead.py --quick    # 1 round of 2 s runs: a smoke test

Run it with the project's interpreter (`.venv/bin/python`, where `gateway._core` is built). In one
run, on the same load, it measures for non-streaming and for streaming completions
(`"max_tokens": 16`, a short prompt; the simulator with `--ttft-ms 0 --itl-ms 0`):

- throughput at saturation: `loadgen --concurrency C` (closed loop), successful requests/s;
- latency at a fixed moderate rate: `loadgen --rate R` (open loop, 1000 req/s by default), p50
  and p99 from the due time of each request; "added" is the gateway's figure minus the direct one.

Pinning (two cores): the gateway runs on core 1 (`taskset -c 1`, its Rust threads and its
Python control plane alike; `TOKENGATE_WORKER_THREADS=1` for it and the simulator, one tokio
worker per pinned core); the simulator and the load generator share core 0 (`taskset -c 0`),
and so do they in the direct runs, which therefore differ from the gateway runs only by the
gateway. The gateway's CPU use during each saturation run is reported beside its throughput:
near 100% means the gateway's core was the bottleneck, well below it means core 0 was.

Auth and metering are on: the harness creates a tenant and an API key with the `gateway` CLI in a
temporary ledger, and every request (direct ones too, so both sides send the same bytes) carries
`Authorization: Bearer <key>`; the gateway meters each request into that ledger.

Another build: `--baseline PATH/.venv/bin/python` runs that checkout's gateway (the previous main,
say, built in a worktree of its own) as one more target, `baseline`, pinned like this one, with a
copy of the ledger, and adds a table of this build against it: two builds compared in one run,
on the same load and the same drift.

Tracing: `--traced` runs this build a second time as one more target, `traced`, pinned like the
gateway, with `[telemetry]` on at `sample_ratio = 1.0` (every request's spans exported over
OTLP/gRPC, to a receiver the harness runs on loopback), and adds a table of the gateway with
tracing off against it.

Reference peer: when `nginx` is on PATH (Debian: `apt-get install -y nginx-light`; the harness
never installs it) and `--no-nginx` is not given, nginx runs as a plain reverse proxy in front of
the same simulator, pinned like the gateway (core 1, one worker process, in the foreground, its
pid file, error log and temp directories in the harness's temp directory, no access log,
keep-alive upstream connections, `proxy_buffering off` so SSE streams flow). It does no auth;
its requests carry the same header all the same. Its column shows what a proxy without auth,
metering or usage parsing reaches on this machine with this pinning. Without nginx the harness
says so and leaves its columns out.

The targets (direct, gateway and nginx) take turns, in an order that rotates by one each round,
so that drift on a shared machine hits all of them; the table reports the median over rounds.
The load generator is `rust/loadgen` (built here with `cargo build --release -p gateway-loadgen`
unless `--loadgen` is given). Results: a section of `benchmarks/RESULTS.md` (replaced on each full
run; `--quick` only prints it) and the raw reports in `benchmarks/out/` (not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
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
from tests.support import procs
from tests.support.ledger_versions import downgrade
from tests.support.otlp import otlp_receiver

BEGIN = "<!-- overhead.py:begin -->"
END = "<!-- overhead.py:end -->"
MODES = ("completions", "completions, streaming")
NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


# --- nginx, the reference peer --------------------------------------------------------------------


class Nginx(Pinned):
    """nginx as a plain reverse proxy in front of `upstream` (a base URL), one worker process,
    in the foreground; its pid file, error log and temp directories live in `workdir/nginx`."""

    # Graceful: the master closes idle keep-alive connections and waits for its worker.
    stop_signal = signal.SIGQUIT

    def __init__(self, binary: Path, core: int, upstream: str, workdir: Path) -> None:
        prefix = workdir / "nginx"
        prefix.mkdir()
        self.port = procs.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = prefix / "nginx.conf"
        config.write_text(nginx_config(prefix, self.port, upstream))
        argv = [str(binary), "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
        test = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise HarnessError(f"nginx -t rejected {config}:\n{test.stderr}{test.stdout}")
        super().__init__("nginx", core, argv, workdir)

    def pids(self) -> list[int]:
        """The master and its worker (a child of the master)."""
        return [self.proc.pid, *self._children()]

    def _children(self) -> list[int]:
        children: list[int] = []
        try:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                children += [int(pid) for pid in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
        return children

    def kill(self) -> None:
        """The worker first (while the master still holds its pid), so that none is left behind."""
        for pid in self._children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        super().kill()


def nginx_version(binary: Path) -> str:
    """`nginx/1.22.1`, from `nginx -v` (which prints to stderr)."""
    done = subprocess.run([str(binary), "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"nginx/\S+", done.stderr + done.stdout)
    return match.group(0) if match else "nginx"


def nginx_config(prefix: Path, port: int, upstream: str) -> str:
    """A plain reverse proxy: keep-alive upstream connections, no response buffering (so SSE
    streams flow), no access log; every path nginx writes lies under `prefix`."""
    server = upstream.removeprefix("http://")
    root = os.geteuid() == 0
    return "\n".join(
        [
            # Run as root, nginx would switch its worker to `nobody`, which cannot reach the
            # harness's private temp directory.
            *(["user root;"] if root else []),
            "worker_processes 1;",
            "daemon off;",
            f"pid {prefix / 'nginx.pid'};",
            f"error_log {prefix / 'error.log'} warn;",
            "events { worker_connections 4096; }",
            "http {",
            "  access_log off;",
            *(f"  {kind}_temp_path {prefix / kind};" for kind in NGINX_TEMP_PATHS),
            f"  upstream sim {{ server {server}; keepalive 128; }}",
            "  server {",
            f"    listen 127.0.0.1:{port} reuseport;",
            "    location / {",
            "      proxy_pass http://sim;",
            "      proxy_http_version 1.1;",
            '      proxy_set_header Connection "";',
            "      proxy_buffering off;",
            "    }",
            "  }",
            "}",
            "",
        ]
    )


# --- the measurement ------------------------------------------------------------------------------


@dataclass
class Run:
    round: int
    mode: str
    kind: str  # "saturation" or "rate"
    target: str  # "direct", "gateway", "baseline" or "nginx"
    report: dict[str, Any]
    # CPU use over the measured window, as a fraction of one core.
    gateway_cpu: float | None = None
    sim_cpu: float | None = None
    nginx_cpu: float | None = None
    baseline_cpu: float | None = None
    traced_cpu: float | None = None


@dataclass
class Bench:
    settings: Settings
    runs: list[Run] = field(default_factory=list)

    def measure(
        self, urls: dict[str, str], key: str, services: dict[str, Pinned], round_: int
    ) -> None:
        """One round: every (mode, kind) on each target in `urls`, in an order that rotates by one
        each round, so that every target goes first, second, ... equally often."""
        names = list(urls)
        shift = round_ % len(names)
        targets = names[shift:] + names[:shift]
        watched = tuple(services.values())
        for mode in MODES:
            stream = "streaming" in mode
            path = "/v1/completions"
            for kind, rate in (("saturation", None), ("rate", self.settings.rate)):
                for target in targets:
                    report, cpus = run_loadgen(
                        self.settings,
                        urls[target] + path,
                        key,
                        stream=stream,
                        rate=rate,
                        services=watched,
                    )
                    cpu = dict(zip(services, cpus, strict=True))
                    run = Run(
                        round_,
                        mode,
                        kind,
                        target,
                        report,
                        gateway_cpu=cpu.get("gateway"),
                        sim_cpu=cpu.get("sim"),
                        nginx_cpu=cpu.get("nginx"),
                        baseline_cpu=cpu.get("baseline"),
                        traced_cpu=cpu.get("traced"),
                    )
                    self.runs.append(run)
                    print(f"  round {round_ + 1} {mode:24} {kind:10} {target:7} {brief(run)}")

    def median(self, mode: str, kind: str, target: str, pick: str) -> float:
        values = []
        for run in self.runs:
            if (run.mode, run.kind, run.target) == (mode, kind, target):
                report = run.report
                values.append(
                    float(report["rps"]) if pick == "rps" else float(report["latency_us"][pick])
                )
        return statistics.median(values) if values else float("nan")

    def round_ratios(
        self, mode: str, target: str = "gateway", other: str = "baseline"
    ) -> list[float]:
        """`target`'s saturation throughput over `other`'s in each round that measured both."""
        rps = {
            (run.round, run.target): float(run.report["rps"])
            for run in self.runs
            if (run.mode, run.kind) == (mode, "saturation")
        }
        rounds = sorted({round_ for round_, _ in rps})
        return [
            rps[(r, target)] / rps[(r, other)]
            for r in rounds
            if rps.get((r, target)) and rps.get((r, other))
        ]

    def cpu(self, mode: str, target: str = "gateway") -> float:
        """The median CPU use of `target` (gateway, baseline or nginx) during its saturation
        runs."""
        values = []
        for run in self.runs:
            if (run.mode, run.kind, run.target) == (mode, "saturation", target):
                value = {
                    "nginx": run.nginx_cpu,
                    "baseline": run.baseline_cpu,
                    "traced": run.traced_cpu,
                }.get(target, run.gateway_cpu)
                if value is not None:
                    values.append(value)
        return statistics.median(values) if values else float("nan")

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
    text += f"  gateway cpu {run.gateway_cpu or 0:.0%}  sim cpu {run.sim_cpu or 0:.0%}"
    if run.nginx_cpu is not None:
        text += f"  nginx cpu {run.nginx_cpu:.0%}"
    if run.traced_cpu is not None:
        text += f"  traced cpu {run.traced_cpu:.0%}"
    if r["errors"] or r["unsent"]:
        text += f"  ERRORS {r['errors']} unsent {r['unsent']}"
    return text


# --- the report -----------------------------------------------------------------------------------


def section(bench: Bench, meta: dict[str, Any]) -> str:
    s = bench.settings
    nginx: str | None = meta["nginx"]
    if nginx is not None:
        proxies = (
            f"Gateway (auth and metering on) and, as a reference, {nginx} (a plain reverse "
            f"proxy: 1 worker, keep-alive upstream connections, no response buffering) each "
            f"pinned to core {s.gateway_core}"
        )
        targets = "three targets (direct, gateway, nginx)"
    else:
        proxies = f"Gateway (auth and metering on) pinned to core {s.gateway_core}"
        targets = "two targets (direct, gateway)"
    lines = [
        BEGIN,
        "## Gateway overhead",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}; machine: nproc "
        f"{meta['machine']['nproc']}, {meta['machine']['cpu']}, Linux {meta['machine']['kernel']}, "
        f"load average {meta['machine']['load']} before the run.",
        "",
        f"{proxies}; `gateway sim` (ttft 0, itl 0) and `loadgen` on core {s.client_core}, for "
        f"the direct runs as well. `/v1/completions`, `max_tokens` 16. Throughput: closed loop, "
        f"{s.concurrency} connections. Latency: open loop at {s.rate:g} req/s (up to "
        f"{s.concurrency} connections), measured from each request's due time. Medians of "
        f"{s.rounds} round(s) of {s.duration_s:g} s after {s.warmup_s:g} s of warm-up, the "
        f"{targets} taking turns in an order that rotates from round to round.",
        "",
    ]
    header = (
        "| mode | direct rps | gateway rps | ratio | gateway CPU | direct p50 / p99 µs "
        "| gateway p50 / p99 µs | added p50 / p99 µs |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if nginx is not None:
        header += " nginx rps | nginx ratio | gateway / nginx | nginx added p50 / p99 µs |"
        rule += "---:|---:|---:|---:|"
    lines += [header, rule]
    for mode in MODES:
        d_rps = bench.median(mode, "saturation", "direct", "rps")
        g_rps = bench.median(mode, "saturation", "gateway", "rps")
        d = [bench.median(mode, "rate", "direct", p) for p in ("p50", "p99")]
        g = [bench.median(mode, "rate", "gateway", p) for p in ("p50", "p99")]
        ratio = g_rps / d_rps if d_rps else float("nan")
        row = (
            f"| {mode} | {d_rps:,.0f} | {g_rps:,.0f} | {ratio:.2f} | {bench.cpu(mode):.0%} "
            f"| {d[0]:,.0f} / {d[1]:,.0f} | {g[0]:,.0f} / {g[1]:,.0f} "
            f"| {g[0] - d[0]:+,.0f} / {g[1] - d[1]:+,.0f} |"
        )
        if nginx is not None:
            n_rps = bench.median(mode, "saturation", "nginx", "rps")
            n = [bench.median(mode, "rate", "nginx", p) for p in ("p50", "p99")]
            n_ratio = n_rps / d_rps if d_rps else float("nan")
            g_over_n = g_rps / n_rps if n_rps else float("nan")
            row += (
                f" {n_rps:,.0f} | {n_ratio:.2f} | {g_over_n:.2f} "
                f"| {n[0] - d[0]:+,.0f} / {n[1] - d[1]:+,.0f} |"
            )
        lines.append(row)
    lines.append("")
    lines.append(
        "gateway CPU: the gateway process's CPU time during its saturation runs, as a share of "
        "one core (100% = its core was the bottleneck)."
    )
    if nginx is not None:
        lines.append(
            "nginx is a plain reverse proxy (no auth, no metering, no usage parsing), measured "
            "here as the ceiling a proxy reaches on this machine with this pinning."
        )
    else:
        lines.append(f"nginx: skipped ({meta['nginx_skipped']}).")
    if meta.get("baseline"):
        lines += baseline_table(bench, meta["baseline"])
    if meta.get("traced"):
        lines += baseline_table(bench, "tracing on, `sample_ratio = 1.0`", other="traced")
    if problems := bench.problems():
        lines += ["", "**Errors during this run** (figures above include only successes):", ""]
        lines += [f"- {p}" for p in problems]
    lines += ["", f"Raw reports: `benchmarks/out/{meta['raw']}` (not committed).", END, ""]
    return "\n".join(lines)


_SCHEMA_VERSION = "from gateway.ledger.schema import SCHEMA_VERSION; print(SCHEMA_VERSION)"


def baseline_table(bench: Bench, baseline: str, other: str = "baseline") -> list[str]:
    """This build against `other`: the `baseline` build, or (`traced`) this build with tracing
    on, measured in the same rounds."""
    what = f"the baseline build ({baseline})" if other == "baseline" else f"{other} ({baseline})"
    lines = [
        "",
        f"This build against {what}, pinned alike and measured in the same rounds:",
        "",
        f"| mode | gateway rps | {other} rps | gateway / {other} | gateway CPU µs / req "
        f"| {other} CPU µs / req | gateway added p50 / p99 µs | {other} added p50 / p99 µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        d = [bench.median(mode, "rate", "direct", p) for p in ("p50", "p99")]
        row = f"| {mode} |"
        rps = {t: bench.median(mode, "saturation", t, "rps") for t in ("gateway", other)}
        row += f" {rps['gateway']:,.0f} | {rps[other]:,.0f} |"
        row += f" {rps['gateway'] / rps[other] if rps[other] else float('nan'):.2f} |"
        for target in ("gateway", other):
            per = bench.cpu(mode, target) * 1e6 / rps[target] if rps[target] else float("nan")
            row += f" {per:,.0f} |"
        for target in ("gateway", other):
            at = [bench.median(mode, "rate", target, p) for p in ("p50", "p99")]
            row += f" {at[0] - d[0]:+,.0f} / {at[1] - d[1]:+,.0f} |"
        lines.append(row)
    lines += [
        "",
        f"Throughput of this build over {other}'s, round by round (one machine's drift "
        "moves both alike within a round):",
    ]
    lines += [
        f"- {mode}: " + ", ".join(f"{ratio:.2f}" for ratio in bench.round_ratios(mode, other=other))
        for mode in MODES
    ]
    return lines


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs; no RESULTS.md")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--duration-s", type=float, help="measured seconds per run (10, quick 2)")
    parser.add_argument("--warmup-s", type=float, help="warm-up seconds per run (2, quick 0.5)")
    parser.add_argument("--concurrency", type=int, default=64, help="loadgen connections")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed rate, req/s")
    parser.add_argument("--gateway-core", type=int, default=1)
    parser.add_argument("--client-core", type=int, default=0, help="simulator and loadgen")
    parser.add_argument("--loadgen", type=Path, help="loadgen binary (default: build it)")
    parser.add_argument(
        "--no-nginx", action="store_true", help="skip the nginx reference (used when on PATH)"
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
        baseline=args.baseline.absolute() if args.baseline else None,
        traced=args.traced,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    command = shlex.join(
        ["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)]
    )
    check_environment(settings)
    if settings.no_nginx:
        nginx_skipped = "--no-nginx"
    elif found := shutil.which("nginx"):
        settings.nginx = Path(found)
        nginx_skipped = ""
    else:
        nginx_skipped = "nginx not found on PATH; Debian: apt-get install -y nginx-light"
    if nginx_skipped:
        print(f"nginx column skipped ({nginx_skipped})", flush=True)
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
    # The baseline's own ledger (a copy, with the same key) and so its own journal.
    baseline_db = workdir / "baseline.db"
    if settings.baseline is not None:
        shutil.copyfile(workdir / "ledger.db", baseline_db)
        # An older build refuses a ledger of a newer schema: take the copy back to its version.
        version = subprocess.run(
            [str(settings.baseline), "-c", _SCHEMA_VERSION],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with open_ledger(f"sqlite:///{baseline_db}") as conn:
            downgrade(conn, int(version))
    # The traced gateway's own ledger (a copy, with the same key) and so its own journal.
    traced_db = workdir / "traced.db"
    if settings.traced:
        shutil.copyfile(workdir / "ledger.db", traced_db)
    bench = Bench(settings)
    services: list[Pinned] = []
    nginx_label: str | None = None
    collector = contextlib.ExitStack()
    try:
        sim = instant_sim(settings, workdir)
        services.append(sim)
        sim_url = sim.wait_listening()
        gateway = gateway_service("gateway", settings, workdir, sim_url, db_url)
        services.append(gateway)
        gateway_url = gateway.wait_listening()
        urls = {"direct": sim_url, "gateway": gateway_url}
        answering: dict[str, Pinned] = {"direct": sim, "gateway": gateway}
        watched: dict[str, Pinned] = {"gateway": gateway, "sim": sim}
        if settings.baseline is not None:
            other = gateway_service(
                "baseline",
                settings,
                workdir,
                sim_url,
                f"sqlite:///{baseline_db}",
                python=settings.baseline,
            )
            services.append(other)
            urls["baseline"] = other.wait_listening()
            answering["baseline"] = watched["baseline"] = other
        if settings.traced:
            _, endpoint = collector.enter_context(otlp_receiver())
            telemetry = f'[telemetry]\notlp_endpoint = "{endpoint}"\nsample_ratio = 1.0\n'
            traced = gateway_service(
                "traced", settings, workdir, sim_url, f"sqlite:///{traced_db}", extra=telemetry
            )
            services.append(traced)
            urls["traced"] = traced.wait_listening()
            answering["traced"] = watched["traced"] = traced
        if settings.nginx is not None:
            nginx_label = nginx_version(settings.nginx)
            nginx = Nginx(settings.nginx, settings.gateway_core, sim_url, workdir)
            services.append(nginx)
            urls["nginx"] = nginx.url
            answering["nginx"] = watched["nginx"] = nginx
        for target, url in urls.items():
            wait_serving(url + "/v1/completions", key, answering[target])
        on_core = f"(core {settings.gateway_core})"
        nginx_at = f"{nginx_label} {urls['nginx']} {on_core}, " if nginx_label else ""
        print(
            f"sim {sim_url} (core {settings.client_core}), gateway {gateway_url} {on_core}, "
            f"{nginx_at}loadgen {settings.loadgen}",
            flush=True,
        )
        for round_ in range(settings.rounds):
            bench.measure(urls, key, watched, round_)
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
        "nginx": nginx_label,
        "nginx_skipped": nginx_skipped or None,
        "baseline": None
        if settings.baseline is None
        else f"commit {git_commit(settings.baseline.parents[2])}",
        "traced": settings.traced,
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
    stops the simulator, the gateway and nginx. A second one is ignored, so as not to cut that
    short."""
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
