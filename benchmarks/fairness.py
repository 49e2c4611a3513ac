"""Fair sharing and priorities when the fleet is full: a quiet tenant's time to first token while
another floods the workers, and interactive requests' under a batch flood, with the gateway's
queue ("fair") and without it ("FIFO": every request straight into the workers' own first-come
queues, as before the scheduler).

    python benchmarks/fairness.py            # about 3 minutes
    python benchmarks/fairness.py --quick    # 5 s runs: a smoke test, RESULTS.md left alone
    python benchmarks/fairness.py --vllm     # the same on two real vLLM CPU workers

Run it with the project's interpreter (`.venv/bin/python`) after `make build`. Two `gateway sim`
workers, each running at most 16 sequences (`--max-num-seqs 16`, further requests wait in its own
queue), 200 ms to first token and 5 ms between tokens; every request streams 8 tokens, so the
fleet serves about 130 requests a second. `loadgen` measures the time to the first token (its
time to the first SSE frame) of the quiet side, sending 10 requests a second on a fixed timetable.
The flood is a closed loop of 96 connections, three times the fleet's 32 sequences, so the fleet
always has a backlog: its rate is whatever the fleet serves, over ten times the quiet side's. Its
requests stream 4, 8, 12 or 16 tokens (a quarter of the connections each), so they do not start
and end in lock-step.

Two gateways over the same workers: "fair" with `workers[].max_concurrency = 16`, so the backlog
waits in the gateway's queue; "FIFO" with `routing.learn_capacity = false` and no
`max_concurrency`, so it waits in the workers' queues. Three runs each:

- alone: the quiet tenant B with nothing else;
- noisy neighbour: tenant A floods, B as before;
- priorities: one tenant C floods with `X-Priority: batch` and sends its quiet requests without a
  header (`interactive`), so only the priority class, not fairness between tenants, separates them.

The gateway runs on core 1; the workers and the load generators on core 0. With `--vllm`, two
vLLM CPU workers (the real-vLLM tier's tiny model, `tests/vllm/cpu_env.py`) with
`--max-num-seqs 4`, one per core, a flood of 24 streams and a quiet side of 2 a second. The fair
gateway also makes a fourth run, with the flood one sequence a worker short of full: nothing
waits, which is the floor that a scheduler that does not preempt cannot beat. Results: a section
of `benchmarks/RESULTS.md` (`--quick` only prints it) and the raw reports in `benchmarks/out/`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    MODEL,
    PROMPT,
    Harness,
    HarnessError,
    Pinned,
    Service,
    Settings,
    open_harness,
    publish,
)
from tests.support import procs
from tests.vllm import cpu_env

BEGIN = "<!-- fairness:begin -->"
END = "<!-- fairness:end -->"


@dataclass(frozen=True)
class Setup:
    """The fleet and the load: simulated workers by default, real vLLM with `--vllm`."""

    name: str
    model: str
    seqs: int  # sequences a worker runs at once
    quiet_rps: float
    flood_connections: int  # three times the fleet's sequences: always a backlog
    begin: str
    end: str


SIM = Setup("sim", MODEL, 16, 10.0, 96, BEGIN, END)
VLLM = Setup(
    "vllm",
    cpu_env.SERVED_MODEL,
    4,
    2.0,
    24,
    "<!-- fairness-vllm:begin -->",
    "<!-- fairness-vllm:end -->",
)
TTFT_MS = 200
ITL_MS = 5
TOKENS = 8
# The flood's requests vary in length, as real traffic does: with one length, closed-loop
# requests would start and end in lock-step waves, and every worker would free its sequences at
# once.
FLOOD_TOKENS = (4, 8, 12, 16)


def parse(argv: list[str] | None) -> tuple[Setup, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="5 s runs; RESULTS.md left alone")
    parser.add_argument("--duration-s", type=float, help="measured seconds per run (20, quick 5)")
    parser.add_argument("--loadgen", type=Path, help="loadgen binary (default: build it)")
    parser.add_argument(
        "--vllm", action="store_true", help="two real vLLM CPU workers instead of simulators"
    )
    args = parser.parse_args(argv)
    quick: bool = args.quick
    setup = VLLM if args.vllm else SIM
    return setup, Settings(
        rounds=1,
        duration_s=args.duration_s or (5.0 if quick else 20.0),
        warmup_s=2.0,
        concurrency=setup.flood_connections,
        rate=setup.quiet_rps,
        gateway_core=1,
        client_core=0,
        loadgen=args.loadgen.resolve() if args.loadgen else Path(),
        quick=quick,
        no_nginx=True,
        max_tokens=TOKENS,
    )


def loadgen(
    setup: Setup,
    settings: Settings,
    url: str,
    key: str,
    *,
    rate: float | None,
    duration_s: float,
    priority: str | None = None,
    tokens: int = TOKENS,
    connections: int | None = None,
) -> subprocess.Popen[str]:
    """A streaming loadgen run of `tokens`-token requests, started in the background on the
    client's core: open loop at `rate`, else `connections` (by default a quarter of the flood's)
    in a closed loop."""
    body = {"model": setup.model, "prompt": PROMPT, "max_tokens": tokens, "stream": True}
    argv = ["taskset", "-c", str(settings.client_core), str(settings.loadgen), "--url", url]
    argv += ["--body", json.dumps(body), "--header", f"authorization: Bearer {key}", "--stream"]
    if priority is not None:
        argv += ["--header", f"x-priority: {priority}"]
    argv += ["--duration-s", str(duration_s), "--warmup-s", str(settings.warmup_s)]
    if rate is None:
        closed = connections or setup.flood_connections // len(FLOOD_TOKENS)
        argv += ["--concurrency", str(closed)]
    else:
        argv += ["--concurrency", "64", "--rate", str(rate)]
    argv += ["--timeout-s", "120"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode not in (0, 1):
        raise HarnessError(f"loadgen failed ({proc.returncode}): {stderr.strip()}")
    result: dict[str, Any] = json.loads(stdout)
    return result


def queue_waits(base_url: str) -> dict[str, tuple[float, float]]:
    """The gateway's `tokengate_queue_wait_seconds` (sum, count) by tenant."""
    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=5).read().decode()
    waits: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        for part, index in (("_sum{", 0), ("_count{", 1)):
            if line.startswith(f"tokengate_queue_wait_seconds{part}"):
                tenant = line.split('tenant="', 1)[1].split('"', 1)[0]
                pair = list(waits.get(tenant, (0.0, 0.0)))
                pair[index] = float(line.rsplit(" ", 1)[1])
                waits[tenant] = (pair[0], pair[1])
    return waits


def measure(
    setup: Setup,
    settings: Settings,
    url: str,
    quiet_key: str,
    flood_key: str | None,
    flood_priority: str | None,
    below_capacity: bool = False,
) -> dict[str, Any]:
    """The quiet side's report, with the flood's beside it when there is one. The flood starts
    first and outlasts the quiet side, so every quiet request meets a full fleet; or, with
    `below_capacity`, a fleet one sequence a worker short of full, so that no request waits
    anywhere and the quiet side meets only engines busy with the flood."""
    floods = []
    if flood_key is not None:
        lengths = FLOOD_TOKENS[1::2] if below_capacity else FLOOD_TOKENS
        # Below capacity: `seqs - 1` streams a worker, over two workers, in two lengths.
        connections = setup.seqs - 1 if below_capacity else None
        floods = [
            loadgen(
                setup,
                settings,
                url,
                flood_key,
                rate=None,
                duration_s=settings.duration_s + 2 * settings.warmup_s,
                priority=flood_priority,
                tokens=tokens,
                connections=connections,
            )
            for tokens in lengths
        ]
    if floods:
        time.sleep(settings.warmup_s)
    quiet = report(
        loadgen(
            setup, settings, url, quiet_key, rate=setup.quiet_rps, duration_s=settings.duration_s
        )
    )
    reports = [report(flood) for flood in floods]
    flood = (
        {
            "rps": sum(r["rps"] for r in reports),
            "errors": sum(r["errors"] for r in reports),
            "runs": reports,
        }
        if reports
        else None
    )
    return {"quiet": quiet, "flood": flood}


def start_gateway(
    run: Harness, name: str, workers: list[str], db_url: str, worker_line: str, routing: str
) -> Service:
    config = run.workdir / f"{name}.toml"
    tables = "".join(f'[[workers]]\nurl = "{url}"\n{worker_line}\n\n' for url in workers)
    config.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\n\n'
        f'[routing]\n{routing}\n\n{tables}[storage]\nurl = "{db_url}"\n'
        f'\n[journal]\ndir = "{run.workdir / name}.journal"\n'
    )
    service = Service(
        name, 1, ["serve", "--config", str(config), "--log-level", "WARNING"], run.workdir
    )
    run.services.append(service)
    return service


def ms(us: float) -> str:
    return f"{us / 1000:.0f}"


def section(
    setup: Setup, meta: dict[str, Any], results: dict[str, dict[str, dict[str, Any]]]
) -> str:
    fleet = (
        f"Two `gateway sim` workers, {setup.seqs} sequences each, {TTFT_MS} ms to first token, "
        f"{ITL_MS} ms between tokens"
        if setup is SIM
        else f"Two real vLLM CPU workers (the tiny model), `--max-num-seqs {setup.seqs}`, one "
        "core each, shared with the gateway and the load generators"
    )
    lines = [
        setup.begin,
        "## Fair sharing and priorities on a full fleet ("
        + ("simulated workers" if setup is SIM else "real vLLM")
        + ")",
        "",
        f"`{meta['command']}` — {meta['date']}, commit {meta['commit']}, "
        f"{meta['machine'].get('cpu', '')}.",
        "",
        f"{fleet}; the quiet side sends {setup.quiet_rps:g} streams of {TOKENS} tokens a second"
        f" for {meta['duration_s']:.0f} s, the flood keeps {setup.flood_connections} streams of"
        f" {', '.join(map(str, FLOOD_TOKENS))} tokens in flight. Time to first token (ms) of the"
        " quiet side; ratio: its p99 over its p99 alone through the same gateway.",
        "",
        "| gateway | run | quiet p50 | quiet p99 | p99 / alone | flood served (req/s) | "
        "flood errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for mode, runs in results.items():
        alone = runs["alone"]["quiet"]["ttfb_us"]["p99"]
        for name, result in runs.items():
            quiet, flood = result["quiet"], result["flood"]
            lines.append(
                f"| {mode} | {name} | {ms(quiet['ttfb_us']['p50'])} | "
                f"{ms(quiet['ttfb_us']['p99'])} | {quiet['ttfb_us']['p99'] / alone:.2f} | "
                + ("—" if flood is None else f"{flood['rps']:.0f}")
                + " | "
                + ("—" if flood is None else str(flood["errors"]))
                + " |"
            )
    lines += ["", setup.end]
    return "\n".join(lines) + "\n"


def start_workers(setup: Setup, settings: Settings, run: Harness) -> list[str]:
    """Two workers running `setup.seqs` sequences each; their base URLs."""
    urls = []
    if setup is SIM:
        for i in range(2):
            sim = Service(
                f"sim{i}",
                settings.client_core,
                [
                    *("sim", "--port", "0", "--model", MODEL, "--ttft-ms", str(TTFT_MS)),
                    *("--itl-ms", str(ITL_MS), "--max-num-seqs", str(setup.seqs)),
                    *("--max-output-tokens", "64", "--log-level", "WARNING"),
                ],
                run.workdir,
            )
            run.services.append(sim)
            urls.append(sim.wait_listening())
        return urls
    env = cpu_env.ensure()
    workers = []
    for core in (0, 1):
        port = procs.free_port()
        argv = env.worker_command(port, "--max-num-seqs", str(setup.seqs))
        worker = Pinned(f"vllm-{core}", core, argv, run.workdir, env=env.worker_env(cpu=core))
        run.services.append(worker)
        workers.append(worker)
        urls.append(f"http://127.0.0.1:{port}")
    for worker, url in zip(workers, urls, strict=True):
        deadline = time.monotonic() + 300
        while not healthy(url):
            worker.check_running()
            if time.monotonic() > deadline:
                raise HarnessError(f"vLLM did not start:\n{worker.log_tail()}")
            time.sleep(0.5)
    return urls


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def wait_listed(url: str, key: str, model: str, gateway: Service) -> None:
    """Until the gateway lists `model` (its workers are probed and up)."""
    request = urllib.request.Request(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gateway.check_running()
        with urllib.request.urlopen(request, timeout=5) as answer:
            if model in answer.read().decode():
                return
        time.sleep(0.2)
    raise HarnessError(f"the gateway never listed {model}:\n{gateway.log_tail()}")


def main(argv: list[str] | None = None) -> None:
    setup, settings = parse(argv)
    with open_harness("fairness.py", settings, argv) as run:
        workers = start_workers(setup, settings, run)
        db_url = procs.ledger_url(run.workdir / "ledger.db")
        keys = {t: procs.create_key(db_url, t)[0] for t in ("tenant-a", "tenant-b", "tenant-c")}
        gateways = {
            "fair": start_gateway(
                run,
                "fair",
                workers,
                db_url,
                f"max_concurrency = {setup.seqs}",
                "learn_capacity = true",
            ),
            "FIFO": start_gateway(run, "fifo", workers, db_url, "", "learn_capacity = false"),
        }
        results: dict[str, dict[str, dict[str, Any]]] = {}
        # Each tenant's (seconds, requests) waited in the gateway's queue, over every run.
        waits: dict[str, dict[str, tuple[float, float]]] = {}
        for mode, gateway in gateways.items():
            base = gateway.wait_listening()
            wait_listed(base, keys["tenant-b"], setup.model, gateway)
            url = f"{base}/v1/completions"
            print(f"{mode}: alone, noisy neighbour, priorities", flush=True)
            results[mode] = {
                "alone": measure(setup, settings, url, keys["tenant-b"], None, None),
                "noisy neighbour (A floods, B quiet)": measure(
                    setup, settings, url, keys["tenant-b"], keys["tenant-a"], None
                ),
                "batch flood (C: batch floods, interactive quiet)": measure(
                    setup, settings, url, keys["tenant-c"], keys["tenant-c"], "batch"
                ),
            }
            if mode == "fair":
                # What no scheduler that does not preempt can beat: nothing waits, and B's
                # requests share the engines' steps with the flood's.
                results[mode]["A holds all but one sequence a worker, nothing waits"] = measure(
                    setup, settings, url, keys["tenant-b"], keys["tenant-a"], None, True
                )
            waits[mode] = queue_waits(base)
        meta = run.meta(f"fairness-{setup.name}", settings)
        publish(
            meta,
            {"results": results, "queue_waits": waits},
            section(setup, meta, results),
            setup.begin,
            setup.end,
            settings.quick,
        )


if __name__ == "__main__":
    main()
