"""One trace from the client through the gateway into vLLM: a request with the client's
`traceparent` through a traced gateway in front of the session's real vLLM workers, which export
their own spans (`--otlp-traces-endpoint`) to the same receiver. vLLM's `llm_request` span is the
child of the gateway's attempt span, in the client's trace, and counts the tokens the gateway
metered."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support import procs
from tests.support.otlp import ReceivedSpan
from tests.vllm.conftest import Fleet
from tests.vllm.cpu_env import SERVED_MODEL

pytestmark = pytest.mark.vllm

GATEWAY_SPANS = {"gateway.request", "gateway.attempt", "gateway.first_byte", "gateway.metering"}


def trace_spans(fleet: Fleet, trace_id: str, names: set[str]) -> dict[str, ReceivedSpan]:
    def arrived() -> bool:
        return names <= {span.name for span in fleet.traces.spans(trace_id)}

    assert procs.wait_for(arrived, timeout=60), [s.name for s in fleet.traces.spans(trace_id)]
    return {span.name: span for span in fleet.traces.spans(trace_id)}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_one_trace_runs_from_the_client_through_the_gateway_into_vllm(
    fleet: Fleet, tmp_path: Path, stream: bool
) -> None:
    db = tmp_path / "ledger.db"
    key, _ = procs.create_key(db, "acme")
    extra = f'[telemetry]\notlp_endpoint = "{fleet.otlp_endpoint}"\nsample_ratio = 1.0\n'
    config = procs.write_config(
        tmp_path / "gateway.toml", [w.url for w in fleet.workers], db, extra
    )
    gateway = procs.start(["serve", "--config", str(config)], env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    trace_id = ("4bf92f3577b34da6a3ce929d0e0e473" + ("7" if stream else "6")).lower()
    client_parent = "00f067aa0ba902b7"
    body: dict[str, object] = {
        "model": SERVED_MODEL,
        "messages": [{"role": "user", "content": "one trace, three services"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    try:
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            headers={
                "authorization": f"Bearer {key}",
                "traceparent": f"00-{trace_id}-{client_parent}-01",
            },
            json=body,
            timeout=120,
        )
        assert response.status_code == 200, response.text
        spans = trace_spans(fleet, trace_id, GATEWAY_SPANS | {"llm_request"})
    finally:
        gateway.stop()

    root, attempt, vllm = spans["gateway.request"], spans["gateway.attempt"], spans["llm_request"]
    assert root.parent_span_id == client_parent
    assert attempt.parent_span_id == root.span_id
    # vLLM's span is the child of the attempt that reached it, in the client's trace.
    assert vllm.parent_span_id == attempt.span_id
    assert vllm.trace_id == trace_id
    assert vllm.service != root.service
    assert attempt.attributes["worker"] == root.attributes["worker"]
    assert root.attributes["worker"] in {w.url for w in fleet.workers}
    # What the gateway metered is what vLLM's own span counted.
    assert root.attributes["usage.source"] == "worker"
    assert root.attributes["usage.prompt_tokens"] == vllm.attributes["gen_ai.usage.prompt_tokens"]
    assert (
        root.attributes["usage.completion_tokens"]
        == vllm.attributes["gen_ai.usage.completion_tokens"]
    )
    assert root.attributes["usage.completion_tokens"] > 0
