"""deploy/grafana/tokengate.json queries only metrics the gateway or vLLM exposes.

The names come from running processes, not from a list: a real gateway in front of a `gateway
sim` worker (which speaks vLLM's `/metrics`), driven so that every labelled family the dashboard
reads has a sample. tests/vllm/test_dashboard.py holds the vLLM names to a real vLLM worker's."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.support import procs
from tests.support.dashboard import (
    DASHBOARD,
    dashboard_metrics,
    exposed_names,
    promql_metrics,
    queries,
)
from tests.support.stack import StackFactory

pytestmark = pytest.mark.e2e

BODY = {"model": "sim-model", "prompt": "the same long prefix " * 8, "max_tokens": 4}

# What the dashboard is for: a panel over each of these (the list).
COVERED = {
    "tokengate_requests_total",
    "tokengate_tokens_total",
    "tokengate_rejected_total",
    "tokengate_queued_requests",
    "tokengate_queue_wait_seconds_bucket",
    "tokengate_worker_ejections_total",
    "tokengate_affinity_total",
    "tokengate_coalesced_calls_total",
    "tokengate_request_duration_seconds_bucket",
    "tokengate_upstream_first_byte_seconds_bucket",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:time_to_first_token_seconds_bucket",
}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "sum by (status) (rate(tokengate_requests_total[$__rate_interval]))",
            {"tokengate_requests_total"},
        ),
        (
            'histogram_quantile(0.95, sum by (le, model) (rate(x_seconds_bucket{a="b(c)"}[5m])))',
            {"x_seconds_bucket"},
        ),
        ("vllm:a / on(instance) group_left(model_name) vllm:b offset 1h", {"vllm:a", "vllm:b"}),
        ("sum without (le) (m1) > bool 2e3 and m2 unless m3", {"m1", "m2", "m3"}),
        (
            'vllm:e2e_request_latency_seconds_count{job=~"$job"}',
            {"vllm:e2e_request_latency_seconds_count"},
        ),
    ],
)
def test_metric_names_are_read_out_of_promql(expr: str, names: set[str]) -> None:
    assert promql_metrics(expr) == names


def test_every_panel_has_a_query_and_the_dashboard_covers_the_gateway_and_vllm() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert len(list(queries(dashboard))) >= len(panels)
    assert set(dashboard_metrics()) >= COVERED


def test_every_metric_the_dashboard_queries_is_exposed(make_stack: StackFactory) -> None:
    stack = make_stack(
        n_sims=1,
        routing='policy = "prefix_affinity"',
        worker="max_concurrency = 1",
    )

    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(
            httpx.post(
                f"{stack.base_url}/completions",
                json=BODY,
                headers={"authorization": f"Bearer {stack.key}"},
                timeout=60,
            )
        )

    # Two at once on a worker that takes one: the second queues, so the queue's labelled
    # families have samples; prefix affinity places both.
    first, second = threading.Thread(target=post), threading.Thread(target=post)
    procs.hold_sim(stack.sims[0], True)
    first.start()
    assert procs.wait_for(lambda: stack.outstanding() == 1)
    second.start()
    queued = "tokengate_queued_requests"
    assert procs.wait_for(lambda: procs.scrape(stack.gateway.url).get(queued) == 1)
    procs.hold_sim(stack.sims[0], False)
    first.join()
    second.join()
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert procs.wait_for(lambda: stack.outstanding() == 0)

    gateway = httpx.get(f"{stack.gateway.url}/metrics", timeout=5).text
    worker = httpx.get(f"{stack.sims[0].url}/metrics", timeout=5).text
    exposed = exposed_names(gateway) | exposed_names(worker)
    assert "tokengate_queue_wait_seconds_bucket" in exposed_names(gateway)
    assert "vllm:time_to_first_token_seconds_bucket" in exposed_names(worker)

    unknown = {
        name: sorted(where) for name, where in dashboard_metrics().items() if name not in exposed
    }
    assert unknown == {}, "queried by the dashboard, exposed by neither the gateway nor vLLM"
