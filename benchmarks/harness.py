"""The harness the benchmark scripts share: their settings and command line, pinned processes
(`gateway serve`, `gateway sim`, any other server) with their CPU time, loadgen runs and rotating
saturation rounds, the machine and commit a run states, and publishing a section into
`benchmarks/RESULTS.md` with the raw reports in `benchmarks/out/`.

A library, not a script: `overhead.py`, `grpc_cost.py`, `journal_cost.py`, `progress_cost.py`,
`quota_cost.py`, `ledger_ingest.py`, `vllm_latency.py` and `prefix_affinity.py` import it (each
runs as `python benchmarks/NAME.py`, so this directory is on the path). Importing it puts the
repository's root on the path too, for `tests.support`, the helpers the tests share with the
benchmarks (free ports, the `gateway` CLI, API keys, test servers): import `harness` before
`tests`.
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

# The scripts run as `python benchmarks/NAME.py`: the repository's root is on the path from here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import ROOT, procs

__all__ = [
    "MODEL",
    "OUT",
    "PROMPT",
    "RESULTS",
    "ROOT",
    "Harness",
    "HarnessError",
    "Pinned",
    "Saturation",
    "Service",
    "Settings",
    "SharedRun",
    "Target",
    "build_loadgen",
    "check_environment",
    "gateway_service",
    "git_commit",
    "instant_sim",
    "machine",
    "median_of",
    "open_harness",
    "parse_args",
    "publish",
    "rotate_saturation",
    "run_loadgen",
    "run_meta",
    "share_core",
    "wait_idle",
    "wait_serving",
    "write_results",
]

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
OUT = ROOT / "benchmarks" / "out"
MODEL = "sim-model"
PROMPT = "The quick brown fox jumps over the lazy dog."


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
    no_vllm_router: bool = False
    vllm_router: Path | None = None  # the executable, once installed (benchmarks/peers.py)
    max_tokens: int = 16  # of every request loadgen sends
    # The Python of another build (its venv's `bin/python`), whose gateway runs beside this one.
    baseline: Path | None = None
    # Whether this build runs a second time with tracing on (`overhead.py --traced`).
    traced: bool = False


# --- settings -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None, doc: str | None) -> Settings:
    """A comparison benchmark's command line (`doc` is the script's docstring, whose first
    paragraph `--help` shows): rounds and their length, loadgen's connections and binary; the
    gateway on core 1, the simulator and loadgen on core 0, as `overhead.py` pins them."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s runs; no RESULTS.md")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    parser.add_argument("--duration-s", type=float, help="measured seconds per run (10, quick 2)")
    parser.add_argument("--concurrency", type=int, default=64, help="loadgen connections")
    parser.add_argument("--loadgen", type=Path, help="loadgen binary (default: build it)")
    args = parser.parse_args(argv)
    quick: bool = args.quick
    return Settings(
        rounds=args.rounds or (1 if quick else 3),
        duration_s=args.duration_s or (2.0 if quick else 10.0),
        warmup_s=0.5 if quick else 2.0,
        concurrency=args.concurrency,
        rate=0.0,
        gateway_core=1,
        client_core=0,
        loadgen=args.loadgen.resolve() if args.loadgen else Path(),
        quick=quick,
        no_nginx=True,
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


# --- processes ------------------------------------------------------------------------------------


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

    def thread_seconds(self) -> dict[str, float]:
        """Seconds on a CPU so far by thread name (`comm`), summed over the threads of that
        name in all of `pids()`: the scheduler's own count (`schedstat`), to the nanosecond,
        where `cpu_seconds` counts clock ticks."""
        seconds: dict[str, float] = {}
        for pid in self.pids():
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except FileNotFoundError:
                continue
            for task in tasks:
                try:
                    name = (task / "comm").read_text().strip()
                    ran = int((task / "schedstat").read_text().split()[0])
                except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                    continue  # a thread that has just exited
                seconds[name] = seconds.get(name, 0.0) + ran / 1e9
        return seconds

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

    def __init__(
        self, name: str, core: int, args: list[str], workdir: Path, python: Path | None = None
    ) -> None:
        # One core, so one tokio worker thread: a second would only add context switches.
        env = {**os.environ, "TOKENGATE_WORKER_THREADS": "1"}
        argv = [str(python or sys.executable), "-m", "gateway", *args]
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
        return self.wait_line(procs.LISTENING.pattern, timeout_s)[1].rstrip("/")

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


def gateway_service(
    name: str,
    settings: Settings,
    workdir: Path,
    sim_url: str,
    db_url: str,
    extra: str = "",
    python: Path | None = None,
) -> Service:
    """`gateway serve` named `name`, in front of `sim_url` with its ledger at `db_url`, on the
    gateway's core; `extra` is TOML appended to its config; `python` runs another build's."""
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
        python,
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


# --- loadgen --------------------------------------------------------------------------------------


def build_loadgen() -> Path:
    print("building the load generator: cargo build --release -p gateway-loadgen", flush=True)
    subprocess.run(["cargo", "build", "--release", "-p", "gateway-loadgen"], cwd=ROOT, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return (target if target.is_absolute() else ROOT / target) / "release" / "loadgen"


def start_loadgen(
    settings: Settings,
    url: str,
    key: str,
    *,
    stream: bool,
    rate: float | None,
    grpc_body: Path | None = None,
) -> subprocess.Popen[str]:
    """loadgen started on the client's core against `url` (`run_loadgen` says what it sends);
    `finish_loadgen` reads its report."""
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
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_loadgen(proc: subprocess.Popen[str], settings: Settings) -> dict[str, Any]:
    """The report of a loadgen `start_loadgen` started, once it ends (killed if it outlives its
    run by two minutes, or if the wait is interrupted)."""
    try:
        stdout, stderr = proc.communicate(timeout=settings.warmup_s + settings.duration_s + 120)
    except BaseException:  # Ctrl-C, SIGTERM, a hung loadgen: do not leave it running
        proc.kill()
        proc.wait()
        raise
    if proc.returncode not in (0, 1):  # 1: the report counts errors, which are shown
        raise HarnessError(f"loadgen failed ({proc.returncode}): {stderr.strip()}")
    report: dict[str, Any] = json.loads(stdout)
    return report


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
    measured window (after the warm-up) as a fraction of one core. The report gains
    `threads`: the first service's CPU use over the window by thread name, as fractions of a
    core (`Pinned.thread_seconds`). With `grpc_body` (a file of the protobuf-encoded request)
    the run speaks gRPC to the method `url` names."""
    proc = start_loadgen(settings, url, key, stream=stream, rate=rate, grpc_body=grpc_body)
    try:
        # The window is approximate: loadgen's clock starts once its connections are open.
        time.sleep(settings.warmup_s + 0.05)
        threads0 = services[0].thread_seconds() if services else {}
        cpu0, t0 = [s.cpu_seconds() for s in services], time.monotonic()
        time.sleep(max(settings.duration_s - 0.1, 0.05))
        cpu1, t1 = [s.cpu_seconds() for s in services], time.monotonic()
        threads1 = services[0].thread_seconds() if services else {}
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    report = finish_loadgen(proc, settings)
    report["threads"] = {
        name: (ran - threads0.get(name, 0.0)) / (t1 - t0) for name, ran in threads1.items()
    }
    return report, [(b - a) / (t1 - t0) for a, b in zip(cpu0, cpu1, strict=True)]


@dataclass
class Target:
    """One gateway configuration to measure: who serves, where, with which key."""

    name: str
    gateway: Pinned
    url: str
    key: str


@dataclass
class Saturation:
    """One saturation run's figures; `others_cpu` is the CPU use of each watched service, `p50`
    and `p99` the latencies in µs from each request's send, `threads` the gateway's CPU use by
    thread name (empty in reports of earlier builds)."""

    round: int
    target: str
    rps: float
    gateway_cpu: float
    others_cpu: list[float]
    errors: int
    p50: float
    p99: float
    threads: dict[str, float] = field(default_factory=dict)


def wait_idle(
    services: list[Pinned], *, window_s: float = 0.3, below: float = 0.07, timeout_s: float = 15.0
) -> bool:
    """Waits until each of `services` uses under `below` of a core over `window_s`: what a run
    left behind (a ledger catching up on its events, a journal segment being prepared) done
    before the next run's clock starts, where it would take the core from another target.
    Whether they settled within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = [service.cpu_seconds() for service in services]
        time.sleep(window_s)
        used = [service.cpu_seconds() - b for service, b in zip(services, before, strict=True)]
        if all(u < below * window_s for u in used):
            return True
    return False


def rotate_saturation(
    settings: Settings, targets: list[Target], *, stream: bool, watch: tuple[Pinned, ...] = ()
) -> list[Saturation]:
    """`settings.rounds` rounds of one saturation run per target, in an order that rotates by
    one each round, so that drift on a shared machine hits every target alike; each run begins
    once every target is idle (`wait_idle`)."""
    results = []
    for round_ in range(settings.rounds):
        shift = round_ % len(targets)
        for target in targets[shift:] + targets[:shift]:
            if not wait_idle([t.gateway for t in targets]):
                print("  (the targets did not fall idle before this run)", flush=True)
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
                float(report["latency_us"]["p50"]),
                float(report["latency_us"]["p99"]),
                report["threads"],
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


@dataclass
class SharedRun:
    """One target's figures in a round of `share_core`: the requests it served, its CPU seconds
    by thread name (`Pinned.thread_seconds`), both counted from before its load began until it
    was idle again after it, and its loadgen's throughput and errors."""

    round: int
    target: str
    requests: float
    threads: dict[str, float]
    rps: float
    errors: int

    def cpu_per_request(self, thread: str | None = None) -> float:
        """CPU seconds a request: the process's, or one thread's (0 where it has none)."""
        cpu = sum(self.threads.values()) if thread is None else self.threads.get(thread, 0.0)
        return cpu / self.requests if self.requests else float("nan")


def served(target: Target) -> float:
    """The requests `target`'s gateway has answered so far (`tokengate_requests_total`)."""
    base = target.url.split("/v1/", 1)[0]
    return procs.scrape(base).get("tokengate_requests_total", 0.0)


def share_core(settings: Settings, targets: list[Target], *, stream: bool) -> list[SharedRun]:
    """`settings.rounds` rounds in which every target serves at saturation at the same time, on
    the one core they are pinned to, each driven by a loadgen of its own (closed loop,
    `settings.concurrency` connections). What each one's CPU a request is then measured under
    the same machine at the same moments: the drift that moves one run's throughput by 10
    points from the next run's hits every target alike, so two targets' CPU a request compare
    to about a point where runs that take turns compare to five or more. Each count runs from
    before the load until the target is idle again after it (`wait_idle`), so work a request
    leaves behind (the ledger's write of its event) is counted with it.

    The core serves all of them: each one serves its share of what one alone would, so work done
    once per interval of time (a journal's sync) weighs on each request as many times more as
    there are targets."""
    results = []
    gateways = [target.gateway for target in targets]
    for round_ in range(settings.rounds):
        if not wait_idle(gateways):
            print("  (the targets did not fall idle before this round)", flush=True)
        before = [(target.gateway.thread_seconds(), served(target)) for target in targets]
        started = [
            start_loadgen(settings, target.url, target.key, stream=stream, rate=None)
            for target in targets
        ]
        reports = [finish_loadgen(proc, settings) for proc in started]
        if not wait_idle(gateways):
            print("  (the targets did not fall idle after this round)", flush=True)
        for target, (threads0, served0), report in zip(targets, before, reports, strict=True):
            threads1 = target.gateway.thread_seconds()
            run = SharedRun(
                round_,
                target.name,
                served(target) - served0,
                {name: ran - threads0.get(name, 0.0) for name, ran in threads1.items()},
                float(report["rps"]),
                int(report["errors"]) + int(report["unsent"]),
            )
            results.append(run)
            print(
                f"  round {round_ + 1} {target.name:12} {'stream' if stream else 'plain':6} "
                f"{run.rps:>9.0f} req/s  {run.cpu_per_request() * 1e6:6.2f} µs CPU a request"
                f"  errors {run.errors}",
                flush=True,
            )
    return results


def median_of(results: list[Saturation], target: str, pick: str) -> float:
    values = [float(getattr(r, pick)) for r in results if r.target == target]
    return statistics.median(values) if values else float("nan")


# --- the report -----------------------------------------------------------------------------------


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


def git_commit(repo: Path = ROOT) -> str:
    """`repo`'s commit, marked when its work tree has changes."""
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=repo
    )
    if head.returncode != 0:
        return "none (no commit yet)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=repo,
    ).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


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

    def sqlite_ledger(self, tenant: str = "bench") -> tuple[str, str]:
        """A SQLite ledger in the work directory, with an API key of `tenant`: (its URL, the
        key)."""
        db_url = f"sqlite:///{self.workdir / 'ledger.db'}"
        key, _ = procs.create_key(db_url, tenant)
        return db_url, key

    def start_instant_sim(self, settings: Settings) -> Service:
        """`instant_sim`, started and added to the services."""
        sim = instant_sim(settings, self.workdir)
        self.services.append(sim)
        return sim


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within it, SIGTERM and SIGHUP raise `SystemExit` (128 + the signal, as a shell reports
    a process the signal ended) in the main thread instead of ending the process where it
    stands: the `finally` blocks run, so a benchmark stopped by `kill` or a closed terminal
    stops the services it started. The handlers before it are put back on the way out."""

    def exit_on(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, exit_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def open_harness(script: str, settings: Settings, argv: list[str] | None) -> Iterator[Harness]:
    """Checks the machine, builds loadgen if needed and makes a work directory for `script` (a
    file name in benchmarks/); on the way out, `kill` included (`terminate_raises`), stops
    every service, newest first, and removes the directory after a clean run (after a failure
    it stays, with the services' logs)."""
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
        with terminate_raises():
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


def write_results(text: str, begin: str, end: str) -> None:
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
