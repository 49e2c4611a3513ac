"""The SREs' locustfile runs against a real gateway, over HTTP and gRPC: streams succeed and
TTFT/TPS rows appear."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, procs
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"


def test_locust_headless_run(make_stack: StackFactory, tmp_path: Path) -> None:
    stack = make_stack(n_sims=2, config_extra="[grpc]\nport = 0\n", ttft_ms=5, itl_ms=2)
    grpc_target = procs.wait_line(stack.gateway, r"gRPC API listening on (\S+)")[1]
    prefix = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", "6", "-r", "6", "-t", "4s", "--stop-timeout", "5",
            "--host", stack.gateway.url, "--csv", str(prefix), "--only-summary",
        ],
        env={
            **os.environ,
            "TOKENGATE_API_KEY": stack.key,
            "TOKENGATE_MAX_TOKENS": "8",
            "TOKENGATE_GRPC_TARGET": grpc_target,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with (tmp_path / "run_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    for path in ("/v1/chat/completions", "/v1/completions"):
        post = rows[("POST", path)]
        assert int(post["Request Count"]) > 0
        assert int(post["Failure Count"]) == 0
        assert int(rows[("TTFT", path)]["Request Count"]) > 0
        assert int(rows[("TPS", path)]["Request Count"]) > 0
    grpc_calls = rows[("gRPC", "StreamChatCompletion")]
    assert int(grpc_calls["Request Count"]) > 0
    assert int(grpc_calls["Failure Count"]) == 0
    assert int(rows[("TTFT", "StreamChatCompletion")]["Request Count"]) > 0
    assert int(rows[("TPS", "StreamChatCompletion")]["Request Count"]) > 0
    streams = int(grpc_calls["Request Count"]) + sum(
        int(rows[("POST", p)]["Request Count"]) for p in ("/v1/chat/completions", "/v1/completions")
    )
    assert procs.wait_for(
        lambda: sum(1 for r in procs.usage_rows(stack.db) if r["status"] == "completed") >= streams
    )
