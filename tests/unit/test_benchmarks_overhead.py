"""`benchmarks/overhead.py`'s arithmetic and its peers' set-up: medians, added latency, the
comparison tables, nginx's configuration and the processes a peer's CPU time counts."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import overhead
import peers
from harness import Settings


def settings() -> Settings:
    return Settings(
        rounds=2,
        duration_s=1.0,
        warmup_s=0.0,
        concurrency=8,
        rate=500.0,
        gateway_core=1,
        client_core=0,
        loadgen=Path(),
        quick=True,
        no_nginx=True,
    )


def report(rps: float, p50: float, p99: float) -> dict[str, Any]:
    return {
        "rps": rps,
        "errors": 0,
        "unsent": 0,
        "requests": int(rps),
        "error_kinds": {},
        "latency_us": {"p50": p50, "p99": p99},
    }


def run(round_: int, kind: str, target: str, rps: float, p50: float, cpu: float) -> overhead.Run:
    mode = overhead.MODES[0]
    return overhead.Run(round_, mode, kind, target, report(rps, p50, p50 * 4), cpu, 0.5)


def bench() -> overhead.Bench:
    """Two rounds: the gateway serves 12,000 req/s at 60% of its core (50 µs a request), the
    peer 10,000 at 100% (100 µs); at the fixed rate direct answers in 100 µs, the gateway in 400,
    the peer in 300."""
    b = overhead.Bench(settings())
    for r in (0, 1):
        b.runs += [
            run(r, "saturation", "direct", 40_000.0, 1_000.0, 0.5),
            run(r, "saturation", "gateway", 12_000.0 + 1_000 * r, 5_000.0, 0.6 + 0.05 * r),
            run(r, "saturation", "peer", 10_000.0, 6_000.0, 1.0),
            run(r, "rate", "direct", 500.0, 100.0 + r, 0.0),
            run(r, "rate", "gateway", 500.0, 400.0 + r, 0.1),
            run(r, "rate", "peer", 500.0, 300.0 + r, 0.1),
        ]
    return b


def test_cpu_per_request_is_cpu_time_over_throughput() -> None:
    assert run(0, "saturation", "gateway", 12_000.0, 1.0, 0.6).pick("cpu_us") == 50.0
    assert math.isnan(run(0, "saturation", "gateway", 0.0, 1.0, 0.6).pick("cpu_us"))


def test_medians_and_added_latency() -> None:
    b = bench()
    mode = overhead.MODES[0]
    assert b.median(mode, "saturation", "gateway", "rps") == 12_500.0
    assert b.median(mode, "rate", "gateway", "p99") == 1_602.0
    assert b.added(mode, "peer", "p50") == 200.0
    assert b.added(mode, "gateway", "p99") == 1_200.0
    assert b.round_ratios(mode, "gateway", "peer") == [1.2, 1.3]
    assert math.isnan(b.median(overhead.MODES[1], "rate", "gateway", "p50"))


def test_comparison_table_has_the_ratios_and_each_added_latency() -> None:
    lines = overhead.comparison_table(bench(), "peer", "the peer 1.0")
    assert (
        lines[1] == "tokengate against the peer 1.0, pinned alike and measured in the same rounds:"
    )
    row = lines[5]
    # req/s 12,500 / 10,000; CPU µs per request 50 / 100.
    assert row == f"| {overhead.MODES[0]} | 1.25 | 0.50 | +300 / +1,200 | +200 / +800 |"
    assert f"- {overhead.MODES[0]}: 1.20, 1.30" in lines
    # At the fixed rate the gateway answers 100 µs after the peer at p50, 400 at p99, each round;
    # the mode no round measured has no line.
    assert f"- {overhead.MODES[0]}: p50 +100, +100 (median +100); p99 +400, +400 (median +400)" in (
        lines
    )
    assert not any(line.startswith(f"- {overhead.MODES[1]}: p50") for line in lines)


def test_round_gaps_pair_the_targets_round_by_round() -> None:
    b = bench()
    mode = overhead.MODES[0]
    assert b.round_gaps(mode, "gateway", "peer", "p50") == [100.0, 100.0]
    assert b.round_gaps(mode, "peer", "direct", "p99") == [800.0, 800.0]
    # A round that measured only one of the two is left out.
    b.runs = [r for r in b.runs if not (r.round == 1 and r.target == "peer")]
    assert b.round_gaps(mode, "gateway", "peer", "p50") == [100.0]


def test_nginx_config_is_one_unbuffered_worker_with_keepalive_upstream(tmp_path: Path) -> None:
    config = peers.nginx_config(tmp_path, 8080, "http://127.0.0.1:9000", root=False)
    for line in (
        "worker_processes 1;",
        "daemon off;",
        "  upstream sim { server 127.0.0.1:9000; keepalive 128; }",
        "    listen 127.0.0.1:8080 reuseport;",
        "      proxy_buffering off;",
    ):
        assert line in config.splitlines()
    assert "user root;" not in config
    assert peers.nginx_config(tmp_path, 8080, "http://x:1", root=True).startswith("user root;\n")


def test_descendants_finds_grandchildren() -> None:
    parent = subprocess.Popen(["sh", "-c", "sh -c 'sleep 60 & wait' & wait"])
    try:
        deadline = time.monotonic() + 30
        found: list[int] = []
        while len(found) < 2 and time.monotonic() < deadline:
            found = peers.descendants(parent.pid)
            time.sleep(0.01)
        assert len(found) == 2
        assert peers.descendants(found[-1]) == []
    finally:
        for pid in reversed(peers.descendants(parent.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        parent.kill()
        parent.wait()
    assert peers.descendants(parent.pid) == []


def test_vllm_router_runs_round_robin_on_its_own_ports() -> None:
    argv = peers.vllm_router_argv(Path("/x/vllm-router"), "http://127.0.0.1:9000", 8080, 8081)
    assert argv[0] == "/x/vllm-router"
    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options == {
        "--worker-urls": "http://127.0.0.1:9000",
        "--policy": "round_robin",
        "--host": "127.0.0.1",
        "--port": "8080",
        "--prometheus-host": "127.0.0.1",
        "--prometheus-port": "8081",
        "--log-level": "warning",
    }


def test_peers_requirements_pin_every_package() -> None:
    """The harness installs them with `pip --no-deps`: each line an exact pin, vllm-router's
    among them."""
    pins = [
        line
        for line in peers.REQUIREMENTS.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all("==" in pin for pin in pins), pins
    assert "vllm-router==0.1.17" in pins
