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
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
OUT = ROOT / "benchmarks" / "out"
BEGIN = "<!-- overhead.py:begin -->"
END = "<!-- overhead.py:end -->"
MODEL = "sim-model"
PROMPT = "The quick brown fox jumps over the lazy dog."
MODES = ("completions", "completions, streaming")
NGINX_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


class HarnessError(Exception):
    """The benchmark could not be run (as opposed to a run that measured errors)."""


@dataclass
class Settings:
    rounds: int
    duration_s: float
    warmup_s: float
    concurrency: int
    rate: float
    gateway_core: int
    client_core: int
    loadgen: Path
    quick: bool
    no_nginx: bool
    nginx: Path | None = None  # the binary, once found on PATH
    max_tokens: int = 16  # of every request loadgen sends


# --- processes ---------------------------------------------------------------------------------


class Pinned:
    """A process started in the background under `taskset -c CORE`; its stderr (and, unless read
    by a subclass, its stdout) goes to a log file in the work directory."""

    stop_signal = signal.SIGTERM

    def __init__(
        self,
        name: str,
        core: int,
        argv: list[str],
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        pipe_stdout: bool = False,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log: IO[str] = self.log_path.open("w")
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdout=subprocess.PIPE if pipe_stdout else self._log,
            stderr=self._log,
            text=True,
            cwd=workdir,
            env=env,
        )

    def pids(self) -> list[int]:
        """The processes whose CPU time counts as this one's."""
        return [self.proc.pid]

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far (all threads of all of `pids()`)."""
        ticks = 0
        for pid in self.pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:  # a process that has just exited
                continue
            fields = stat.rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise HarnessError(
                f"{self.name} exited early ({self.proc.returncode}):\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """`stop_signal`, then SIGKILL after 30 s; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()

    def stopped_cleanly(self, status: int | None) -> bool:
        return status in (0, None, -self.stop_signal)


class Service(Pinned):
    """A `gateway` subcommand started in the background, pinned to one core; its stdout is read by
    a thread (to find the listening line), its stderr goes to a log file."""

    def __init__(self, name: str, core: int, args: list[str], workdir: Path) -> None:
        # One core, so one tokio worker thread: a second would only add context switches.
        env = {**os.environ, "TOKENGATE_WORKER_THREADS": "1"}
        argv = [sys.executable, "-m", "gateway", *args]
        super().__init__(name, core, argv, workdir, env=env, pipe_stdout=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_listening(self, timeout_s: float = 60.0) -> str:
        """The base URL from the `... listening on http://HOST:PORT` line."""
        return self.wait_line(r"listening on (http://\S+)", timeout_s)[1].rstrip("/")

    def wait_line(self, pattern: str, timeout_s: float = 60.0) -> re.Match[str]:
        """The first stdout line matching `pattern`, those already read included."""
        for line in self._seen:
            if match := re.search(pattern, line):
                return match
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                read = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if read is None:
                raise HarnessError(f"{self.name} exited early:\n{self.log_tail()}")
            self._seen.append(read)
            line = read
            if match := re.search(pattern, line):
                return match
        raise HarnessError(
            f"{self.name} did not print {pattern!r} within {timeout_s:.0f} s:\n{self.log_tail()}"
        )


class Nginx(Pinned):
    """nginx as a plain reverse proxy in front of `upstream` (a base URL), one worker process,
    in the foreground; its pid file, error log and temp directories live in `workdir/nginx`."""

    # Graceful: the master closes idle keep-alive connections and waits for its worker.
    stop_signal = signal.SIGQUIT

    def __init__(self, binary: Path, core: int, upstream: str, workdir: Path) -> None:
        prefix = workdir / "nginx"
        prefix.mkdir()
        self.port = free_port()
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


def gateway_service(
    name: str, settings: Settings, workdir: Path, sim_url: str, db_url: str, extra: str = ""
) -> Service:
    """`gateway serve` named `name`, in front of `sim_url` with its ledger at `db_url`, on the
    gateway's core; `extra` is TOML appended to its config."""
    config = workdir / f"{name}.toml"
    config.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\n\n'
        f'[[workers]]\nurl = "{sim_url}"\n\n[storage]\nurl = "{db_url}"\n\n{extra}'
    )
    return Service(
        name,
        settings.gateway_core,
        ["serve", "--config", str(config), "--log-level", "WARNING"],
        workdir,
    )


def instant_sim(settings: Settings, workdir: Path) -> Service:
    """`gateway sim` answering at once (no time to first token, none between tokens), 16 tokens
    per answer, on the client's core, with room for every connection of the load."""
    return Service(
        "sim",
        settings.client_core,
        [
            *("sim", "--port", "0", "--model", MODEL, "--ttft-ms", "0", "--itl-ms", "0"),
            *("--max-num-seqs", str(max(1024, settings.concurrency * 2))),
            *("--max-output-tokens", "16", "--log-level", "WARNING"),
        ],
        workdir,
    )


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


def free_port() -> int:
    """A loopback port nothing listens on right now (nginx cannot be told to pick one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_cli(*args: str, workdir: Path) -> str:
    """Runs a short `gateway` command and returns its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise HarnessError(f"gateway {' '.join(args)} failed:\n{done.stderr}{done.stdout}")
    return done.stdout


def create_key(workdir: Path, db_url: str) -> str:
    gateway_cli("tenants", "create", "bench", "--db", db_url, workdir=workdir)
    out = gateway_cli("keys", "create", "--tenant", "bench", "--db", db_url, workdir=workdir)
    match = re.search(r"(?m)(?:^|\s)(tg-\S+)", out)
    if match is None:
        raise HarnessError(f"no tg- key in the output of `gateway keys create`:\n{out}")
    return match.group(1)


def wait_serving(url: str, key: str, process: Pinned, timeout_s: float = 60.0) -> None:
    """Polls until one authenticated completion succeeds (the gateway may still be probing its
    worker right after it starts listening; nginx tells nothing when it is ready), failing early
    when `process`, the one that should answer, has exited."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 16}).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        process.check_running()
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
                return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise HarnessError(f"{url} did not serve within {timeout_s:.0f} s; last answer: {last}")


def build_loadgen() -> Path:
    print("building the load generator: cargo build --release -p gateway-loadgen", flush=True)
    subprocess.run(["cargo", "build", "--release", "-p", "gateway-loadgen"], cwd=ROOT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return (target if target.is_absolute() else ROOT / target) / "release" / "loadgen"


def run_loadgen(
    settings: Settings,
    url: str,
    key: str,
    *,
    stream: bool,
    rate: float | None,
    services: tuple[Pinned, ...] = (),
    grpc_body: Path | None = None,
) -> tuple[dict[str, Any], list[float]]:
    """One loadgen run; returns its report and, for each of `services`, its CPU use over the
    measured window (after the warm-up) as a fraction of one core. With `grpc_body` (a file of
    the protobuf-encoded request) the run speaks gRPC to the method `url` names."""
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "max_tokens": settings.max_tokens}
    if stream:
        body["stream"] = True
    argv = ["taskset", "-c", str(settings.client_core), str(settings.loadgen), "--url", url]
    argv += ["--body", json.dumps(body) if grpc_body is None else f"@{grpc_body}"]
    argv += ["--header", f"authorization: Bearer {key}"]
    if grpc_body is not None:
        argv.append("--grpc")
    argv += ["--duration-s", str(settings.duration_s), "--warmup-s", str(settings.warmup_s)]
    argv += ["--concurrency", str(settings.concurrency)]
    if rate is not None:
        argv += ["--rate", str(rate)]
    if stream:
        argv.append("--stream")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The window is approximate: loadgen's clock starts once its connections are open.
        time.sleep(settings.warmup_s + 0.05)
        cpu0, t0 = [s.cpu_seconds() for s in services], time.monotonic()
        time.sleep(max(settings.duration_s - 0.1, 0.05))
        cpu1, t1 = [s.cpu_seconds() for s in services], time.monotonic()
        stdout, stderr = proc.communicate(timeout=settings.duration_s + 120)
    except BaseException:  # Ctrl-C, SIGTERM, a hung loadgen: do not leave it running
        proc.kill()
        proc.wait()
        raise
    if proc.returncode not in (0, 1):  # 1: the report counts errors, which are shown
        raise HarnessError(f"loadgen failed ({proc.returncode}): {stderr.strip()}")
    report: dict[str, Any] = json.loads(stdout)
    return report, [(b - a) / (t1 - t0) for a, b in zip(cpu0, cpu1, strict=True)]


# --- the measurement ---------------------------------------------------------------------------


@dataclass
class Target:
    """One gateway configuration to measure: who serves, where, with which key."""

    name: str
    gateway: Pinned
    url: str
    key: str


@dataclass
class Saturation:
    """One saturation run's figures; `others_cpu` is the CPU use of each watched service."""

    round: int
    target: str
    rps: float
    gateway_cpu: float
    others_cpu: list[float]
    errors: int


def rotate_saturation(
    settings: Settings, targets: list[Target], *, stream: bool, watch: tuple[Pinned, ...] = ()
) -> list[Saturation]:
    """`settings.rounds` rounds of one saturation run per target, in an order that rotates by
    one each round, so that drift on a shared machine hits every target alike."""
    results = []
    for round_ in range(settings.rounds):
        shift = round_ % len(targets)
        for target in targets[shift:] + targets[:shift]:
            report, cpus = run_loadgen(
                settings,
                target.url,
                target.key,
                stream=stream,
                rate=None,
                services=(target.gateway, *watch),
            )
            result = Saturation(
                round_,
                target.name,
                float(report["rps"]),
                cpus[0],
                cpus[1:],
                int(report["errors"]) + int(report["unsent"]),
            )
            results.append(result)
            others = "".join(
                f"  {s.name} cpu {c:.0%}" for s, c in zip(watch, cpus[1:], strict=True)
            )
            print(
                f"  round {round_ + 1} {target.name:12} {'stream' if stream else 'plain':6} "
                f"{result.rps:>9.0f} req/s  gateway cpu {result.gateway_cpu:.0%}{others}"
                f"  errors {result.errors}",
                flush=True,
            )
    return results


def median_of(results: list[Saturation], target: str, pick: str) -> float:
    values = [float(getattr(r, pick)) for r in results if r.target == target]
    return statistics.median(values) if values else float("nan")


@dataclass
class Run:
    round: int
    mode: str
    kind: str  # "saturation" or "rate"
    target: str  # "direct", "gateway" or "nginx"
    report: dict[str, Any]
    # CPU use over the measured window, as a fraction of one core.
    gateway_cpu: float | None = None
    sim_cpu: float | None = None
    nginx_cpu: float | None = None


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

    def cpu(self, mode: str, target: str = "gateway") -> float:
        """The median CPU use of `target` (gateway or nginx) during its saturation runs."""
        values = []
        for run in self.runs:
            if (run.mode, run.kind, run.target) == (mode, "saturation", target):
                value = run.nginx_cpu if target == "nginx" else run.gateway_cpu
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
    if r["errors"] or r["unsent"]:
        text += f"  ERRORS {r['errors']} unsent {r['unsent']}"
    return text


# --- the report --------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "load": f"{os.getloadavg()[0]:.2f}",
        "nproc": nproc,
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    if head.returncode != 0:
        return "none (no commit yet)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


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
    if problems := bench.problems():
        lines += ["", "**Errors during this run** (figures above include only successes):", ""]
        lines += [f"- {p}" for p in problems]
    lines += ["", f"Raw reports: `benchmarks/out/{meta['raw']}` (not committed).", END, ""]
    return "\n".join(lines)


@dataclass
class Harness:
    """What a comparison benchmark runs in: its command line, start time and machine, a work
    directory, and the services it starts (add them to `services` as they start)."""

    command: str
    stamp: datetime
    host: dict[str, str]
    workdir: Path
    services: list[Pinned] = field(default_factory=list)

    def meta(self, prefix: str, settings: Settings) -> dict[str, Any]:
        return run_meta(prefix, self.command, self.stamp, self.host, settings)


@contextlib.contextmanager
def harness(script: str, settings: Settings, argv: list[str] | None) -> Iterator[Harness]:
    """Checks the machine, builds loadgen if needed and makes a work directory for `script` (a
    file name in benchmarks/); on the way out stops every service, newest first, and removes
    the directory after a clean run (after a failure it stays, with the services' logs)."""
    command = shlex.join(
        ["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]
    )
    check_environment(settings)
    if settings.loadgen == Path():
        settings.loadgen = build_loadgen()
    stamp, host = datetime.now(UTC), machine()
    workdir = Path(tempfile.mkdtemp(prefix=f"tokengate-{Path(script).stem}-"))
    run = Harness(command, stamp, host, workdir)
    try:
        yield run
    except BaseException:
        print(f"logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        for service in reversed(run.services):
            service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def run_meta(
    prefix: str, command: str, stamp: datetime, host: dict[str, str], settings: Settings
) -> dict[str, Any]:
    """What every comparison report states about its run, `raw` naming its file in
    `benchmarks/out/`."""
    return {
        "command": command,
        "date": f"{stamp:%Y-%m-%d %H:%M} UTC",
        "commit": git_commit(),
        "machine": host,
        "raw": f"{prefix}-{stamp:%Y%m%dT%H%M%SZ}{'-quick' if settings.quick else ''}.json",
        "rounds": settings.rounds,
        "duration_s": settings.duration_s,
    }


def publish(
    meta: dict[str, Any], raw: dict[str, Any], text: str, begin: str, end: str, quick: bool
) -> None:
    """Saves the raw report, prints the section, and (unless `quick`) puts it in RESULTS.md."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / meta["raw"]).write_text(json.dumps({**meta, **raw}, indent=2) + "\n")
    print("\n" + text)
    if quick:
        print(f"(--quick: RESULTS.md left alone; raw report in benchmarks/out/{meta['raw']})")
    else:
        write_results(text, begin, end)
        print(f"written to benchmarks/RESULTS.md and benchmarks/out/{meta['raw']}")


def write_results(text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replaces the section between `begin` and `end` in RESULTS.md (`text` carries both
    markers), or appends it."""
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        updated = head + text + ("\n" + tail if tail else "")
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(updated)


# --- main --------------------------------------------------------------------------------------


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
    )


def check_environment(settings: Settings) -> None:
    if shutil.which("taskset") is None:
        raise HarnessError("taskset not found (Debian package util-linux)")
    cores = os.sched_getaffinity(0)
    for core in (settings.gateway_core, settings.client_core):
        if core not in cores:
            raise HarnessError(f"core {core} is not available here (cores: {sorted(cores)})")
    probe = subprocess.run(
        [sys.executable, "-c", "import gateway._core"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise HarnessError(
            f"{sys.executable} cannot import gateway._core; run this with the project's "
            f"interpreter (.venv/bin/python) after building the extension:\n{probe.stderr}"
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
    key = create_key(workdir, db_url)
    bench = Bench(settings)
    services: list[Pinned] = []
    nginx_label: str | None = None
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
    usage = gateway_cli("usage", "--db", db_url, "--json", workdir=workdir)
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
        write_results(text)
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
    except HarnessError as exc:
        print(f"overhead.py: {exc}", file=sys.stderr)
        sys.exit(2)
