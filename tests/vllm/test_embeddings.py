"""`/v1/embeddings` through the gateway in front of a real vLLM worker: the tiny Llama served as an
embedding model by vLLM's CPU build (`--runner pooling --convert embed`: last-token pooling,
normalised). Its answers through the gateway are its own, byte for byte in every encoding; its
errors pass unchanged; the ledger's prompt tokens equal its `vllm:prompt_tokens_total`.

One worker of its own (a pooling runner serves no generation), started once for the module.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import procs
from tests.vllm import cpu_env
from tests.vllm.cpu_env import MAX_MODEL_LEN, SERVED_MODEL

pytestmark = pytest.mark.vllm

MODEL = SERVED_MODEL
CHAT = [{"role": "user", "content": "what does the gateway meter per tenant"}]

# Every input shape vLLM embeds, as the SDK sends it (extra_body for vLLM's chat forms).
SHAPES: dict[str, dict[str, Any]] = {
    "string": {"input": "the gateway routes every request to a worker"},
    "strings": {"input": ["a first text to embed", "and a second", "third"]},
    "token-ids": {"input": [17, 230, 41, 99, 8]},
    "token-id-lists": {"input": [[17, 230], [41, 99, 8, 120]]},
    "chat": {"input": [], "extra_body": {"input": CHAT}},
    "chats": {"input": [], "extra_body": {"input": None, "messages": [CHAT, CHAT[:1]]}},
    "float": {"input": "plain floats", "encoding_format": "float"},
}


@dataclass
class Pooling:
    """One vLLM worker running the tiny model as an embedding model, a gateway in front of it."""

    worker: procs.Process
    gateway: procs.Process
    db: Path
    key: str
    clients: list[openai.OpenAI] = field(default_factory=list)

    def client(self, direct: bool = False) -> openai.OpenAI:
        url = self.worker.url if direct else self.gateway.url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=self.key, max_retries=0, timeout=120.0)
        self.clients.append(client)
        return client

    def post(self, body: dict[str, Any], request_id: str, direct: bool = False) -> httpx.Response:
        url = self.worker.url if direct else self.gateway.url
        headers = {"authorization": f"Bearer {self.key}", "x-request-id": request_id}
        return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=120)

    def prompt_tokens(self) -> int:
        """vLLM's `prompt_tokens_total`, once nothing runs and two scrapes agree."""

        def idle() -> bool:
            metrics = procs.scrape(self.worker.url)
            return metrics["vllm:num_requests_running"] + metrics["vllm:num_requests_waiting"] == 0

        assert procs.wait_for(idle, timeout=30)
        last = -1
        for _ in range(100):
            now = int(procs.scrape(self.worker.url)["vllm:prompt_tokens_total"])
            if now == last:
                return now
            last = now
            time.sleep(0.2)
        return last


@pytest.fixture(scope="module")
def pooling(
    vllm_env: cpu_env.VllmEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pooling]:
    tmp = tmp_path_factory.mktemp("vllm-embed")
    port = procs.free_port()
    command = vllm_env.worker_command(port, "--runner", "pooling", "--convert", "embed")
    cpu = (os.cpu_count() or 1) - 1
    worker = procs.spawn_vllm(command, vllm_env.worker_env(cpu=cpu), port)
    try:
        procs.wait_healthy(worker)
        db = tmp / "ledger.db"
        key, _ = procs.create_key(db, "acme")
        config = procs.write_config(tmp / "gateway.toml", [worker.url], db)
        gateway = procs.start(["serve", "--config", str(config)])
    except BaseException:
        worker.stop()
        raise
    pooling = Pooling(worker=worker, gateway=gateway, db=db, key=key)
    yield pooling
    for client in pooling.clients:
        client.close()
    gateway.stop()
    worker.stop(timeout=30)


def test_embeddings_are_vllms_own_and_metered_to_the_token(pooling: Pooling) -> None:
    """Each shape through the gateway equals vLLM's direct answer (the SDK's reading, then the
    bytes); every request is one `embeddings` event; their prompt tokens sum to the growth of
    vLLM's `prompt_tokens_total`, the binary encodings' included."""
    via, direct = pooling.client(), pooling.client(direct=True)
    before = pooling.prompt_tokens()
    for shape, params in SHAPES.items():
        embedded = [
            c.embeddings.create(model=MODEL, **params).model_dump(exclude={"id", "created"})
            for c in (via, direct)
        ]
        assert embedded[0] == embedded[1], shape
        assert embedded[0]["usage"]["prompt_tokens"] > 0
    requests = len(SHAPES)
    for encoding in ("float", "base64", "bytes", "bytes_only"):
        body = {"model": MODEL, "input": ["same bytes", "as vLLM's"], "encoding_format": encoding}
        request_id = f"relay-{encoding}"
        answers = [pooling.post(body, request_id, to_worker) for to_worker in (False, True)]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].headers["content-type"] == answers[1].headers["content-type"]
        if encoding.startswith("bytes"):
            assert answers[0].content == answers[1].content
        else:
            assert {**answers[0].json(), "created": 0} == {**answers[1].json(), "created": 0}
        if encoding == "bytes":
            metadata = [json.loads(a.headers["metadata"]) for a in answers]
            assert {**metadata[0], "created": 0} == {**metadata[1], "created": 0}
        else:
            assert "metadata" not in answers[0].headers
        requests += 1

    assert procs.wait_for(lambda: len(procs.usage_rows(pooling.db)) == requests, 15)
    after = pooling.prompt_tokens()
    rows = procs.usage_rows(pooling.db)
    assert {(r["endpoint"], r["status"], r["stream"]) for r in rows} == {
        ("embeddings", "completed", 0)
    }
    assert sum(r["completion_tokens"] for r in rows) == 0
    sources = {r["request_id"]: r["usage_source"] for r in rows}
    assert sources.pop("relay-bytes_only") == "gateway", "no usage anywhere: the gateway counted"
    assert set(sources.values()) == {"worker"}
    # Every request went to vLLM twice: through the gateway and directly.
    assert 2 * sum(r["prompt_tokens"] for r in rows) == after - before


def test_vllms_refusals_reach_the_client_as_vllm_sent_them(pooling: Pooling) -> None:
    refusals: dict[str, dict[str, Any]] = {
        "not-matryoshka": {"model": MODEL, "input": "x", "dimensions": 8},
        "empty-prompt": {"model": MODEL, "input": ""},
        "over-the-context": {"model": MODEL, "input": "word " * (MAX_MODEL_LEN + 50)},
        "removed-parameter": {"model": MODEL, "input": "x", "normalize": True},
    }
    for name, body in refusals.items():
        via, direct = (pooling.post(body, name, to_worker) for to_worker in (False, True))
        assert via.status_code == direct.status_code == 400, (name, direct.text)
        assert via.content == direct.content, name
    with pytest.raises(openai.BadRequestError):
        pooling.client().embeddings.create(model=MODEL, input="x", dimensions=8)
    # What no worker takes is refused before one sees it, in the gateway's words.
    refused = pooling.post({"model": MODEL, "input": []}, "empty-list")
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "input"
