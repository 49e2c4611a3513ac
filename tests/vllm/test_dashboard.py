"""deploy/grafana/tokengate.json's vLLM panels query names a real vLLM worker exposes (the
simulator's names are checked in tests/unit/test_deploy_dashboard.py; these are vLLM's own)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.dashboard import dashboard_metrics, exposed_names
from tests.vllm.conftest import Fleet
from tests.vllm.cpu_env import SERVED_MODEL

pytestmark = pytest.mark.vllm


def test_every_vllm_metric_the_dashboard_queries_is_vllms_own(fleet: Fleet) -> None:
    # One request through each worker's engine, so that every family has its samples.
    for i in range(len(fleet.workers)):
        fleet.direct(i).completions.create(model=SERVED_MODEL, prompt="a b c", max_tokens=2)
    queried = {name for name in dashboard_metrics() if name.startswith("vllm:")}
    assert len(queried) >= 8
    for worker in fleet.workers:
        exposed = exposed_names(httpx.get(f"{worker.url}/metrics", timeout=10).text)
        assert queried - exposed == set(), f"not exposed by vLLM at {worker.url}"
