"""The gateway in front of real vLLM workers (vLLM's CPU build, a tiny local model), driven with
the official `openai` SDK: answers equal vLLM's own, vLLM's errors pass through, metered tokens
equal vLLM's counters, disconnects are billed for what was relayed, routing reads vLLM's
`/metrics`, and prefix affinity meets vLLM's prefix cache. The last test stops a worker, so it
stays last.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import procs
from tests.support.deploy import recipe_args
from tests.vllm import cpu_env
from tests.vllm.conftest import Fleet
from tests.vllm.cpu_env import MAX_MODEL_LEN, SERVED_MODEL

pytestmark = pytest.mark.vllm

MODEL = SERVED_MODEL
PROMPT = "the gateway routes every request to a worker"
MESSAGES = [{"role": "user", "content": "what does the gateway meter per tenant"}]

# Each case is (endpoint, parameters); all run at temperature 0 or with a seed.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("chat", {"messages": MESSAGES, "max_tokens": 24, "temperature": 0}),
    "chat-stream": (
        "chat",
        {"messages": MESSAGES, "max_tokens": 24, "temperature": 0, "stream": True},
    ),
    "chat-stream-usage": (
        "chat",
        {
            "messages": MESSAGES,
            "max_completion_tokens": 24,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    "chat-n2-seed-stream": (
        "chat",
        {
            "messages": MESSAGES,
            "max_tokens": 16,
            "n": 2,
            "temperature": 0.9,
            "seed": 7,
            "stream": True,
        },
    ),
    "completions": ("completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}),
    "completions-n3-seed": (
        "completions",
        {"prompt": PROMPT, "max_tokens": 16, "n": 3, "temperature": 1.0, "seed": 42},
    ),
    "completions-stream-continuous-usage": (
        "completions",
        {
            "prompt": PROMPT,
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    ),
    "completions-prompts-n2-stream": (
        "completions",
        {
            "prompt": [PROMPT, "a second prompt"],
            "max_tokens": 8,
            "n": 2,
            "temperature": 0.7,
            "seed": 3,
            "stream": True,
        },
    ),
    "completions-vllm-extras": (
        "completions",
        {
            "prompt": PROMPT,
            "max_tokens": 20,
            "temperature": 0.8,
            "seed": 11,
            "logprobs": 2,
            "extra_body": {
                "top_k": 5,
                "min_tokens": 20,
                "ignore_eos": True,
                "repetition_penalty": 1.2,
            },
        },
    ),
}


def call(client: openai.OpenAI, endpoint: str, params: dict[str, Any]) -> Any:
    """The response as plain data without `id` and `created`; a stream as its `digest`."""
    params = {"model": MODEL, **params}
    create: Any = (
        client.chat.completions.create if endpoint == "chat" else client.completions.create
    )
    result = create(**params)
    if not params.get("stream"):
        return result.model_dump(exclude={"id", "created"})
    return digest([chunk.model_dump() for chunk in result])


def digest(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What of a stream is reproducible, in vLLM's own byte order.

    Two things about a real vLLM stream are timing, not content: the order in which the choices
    of one request interleave (several prompts, or `n` > 1), and how many tokens one chunk
    carries (when its HTTP layer lags, vLLM coalesces the deltas of several steps into one
    chunk). So per choice: the whole text, the distinct shapes of its chunks (text, logprobs and
    running usage blanked), its terminal chunk exactly but for the text, and the usage-only
    chunks exactly."""
    texts: dict[int, str] = {}
    shapes: dict[int, set[str]] = {}
    terminal: dict[int, str] = {}
    tail: list[str] = []
    for chunk in chunks:
        chunk = {k: v for k, v in chunk.items() if k not in ("id", "created")}
        if not chunk["choices"]:
            tail.append(json.dumps(chunk))
            continue
        choice = chunk["choices"][0]
        index = choice["index"]
        delta = choice.get("delta") or {}
        texts[index] = texts.get(index, "") + (delta.get("content") or choice.get("text") or "")
        blank = json.loads(json.dumps(chunk))
        blank_choice = blank["choices"][0]
        if blank_choice.get("delta", {}).get("content") is not None:
            blank_choice["delta"]["content"] = "…"
        if blank_choice.get("text") is not None:
            blank_choice["text"] = "…"
        if blank_choice.get("logprobs") is not None:
            blank_choice["logprobs"] = "…"
        if choice.get("finish_reason") is not None:
            terminal[index] = json.dumps(blank)
        else:
            if blank.get("usage") is not None:
                blank["usage"] = "…"
            shapes.setdefault(index, set()).add(json.dumps(blank))
    return {"texts": texts, "shapes": shapes, "terminal": terminal, "tail": tail}


@pytest.mark.parametrize("case", list(CASES))
def test_the_gateway_answers_as_vllm_answers_directly(fleet: Fleet, case: str) -> None:
    endpoint, params = CASES[case]
    direct = call(fleet.direct(0), endpoint, params)
    # Both workers serve the same weights on the same kind of core: the same answer, so the
    # gateway's choice of worker does not matter.
    assert call(fleet.direct(1), endpoint, params) == direct
    assert call(fleet.client(), endpoint, params) == direct


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
@pytest.mark.parametrize("usage", [None, {"include_usage": True}])
def test_streamed_bytes_are_vllms_bytes(
    fleet: Fleet, path: str, usage: dict[str, bool] | None
) -> None:
    """Rule one on the wire: events as vLLM wrote them, key order and the terminal chunk's
    `system_fingerprint` included (see `digest` for what timing changes)."""
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "temperature": 0, "stream": True}
    body |= {"messages": MESSAGES} if path.startswith("chat") else {"prompt": PROMPT}
    if usage is not None:
        body["stream_options"] = usage

    def wire(response: httpx.Response) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        assert response.text.endswith("data: [DONE]\n\n")
        events = [e for e in procs.sse_events(iter(response.text.splitlines())) if e != "[DONE]"]
        return digest([json.loads(event) for event in events])

    direct = wire(raw_post(fleet.workers[0].url, path, body, "unused"))
    assert '"system_fingerprint": "vllm-' in str(
        direct["terminal"] if usage is None else direct["tail"]
    )
    assert wire(raw_post(fleet.gateway.url, path, body, fleet.key)) == direct


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stop_sequences_end_the_answer_as_vllm_ends_it(fleet: Fleet, endpoint: str) -> None:
    base = CASES[endpoint][1]
    choice = call(fleet.direct(0), endpoint, base)["choices"][0]
    free: str = choice["message"]["content"] if endpoint == "chat" else choice["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), f"no stop string to cut {free!r} at"
    params = {**base, "stop": [stop]}
    direct = call(fleet.direct(0), endpoint, params)
    assert direct["choices"][0]["finish_reason"] == "stop"
    assert call(fleet.client(), endpoint, params) == direct
    streamed = call(fleet.client(), endpoint, {**params, "stream": True})
    assert streamed == call(fleet.direct(0), endpoint, {**params, "stream": True})


def raw_post(url: str, path: str, body: dict[str, Any], key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/{path}", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("completions", {"prompt": "word " * (MAX_MODEL_LEN + 50), "max_tokens": 4}),
        ("completions", {"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN * 2}),
        ("chat/completions", {"messages": MESSAGES, "temperature": -1}),
        ("completions", {"prompt": PROMPT, "logprobs": 100}),
        ("completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}),
    ],
    ids=["prompt-over-context", "max-tokens-over-context", "bad-temperature", "logprobs", "so"],
)
def test_vllm_errors_reach_the_client_as_vllm_sent_them(
    fleet: Fleet, path: str, body: dict[str, Any]
) -> None:
    body = {"model": MODEL, **body}
    direct = raw_post(fleet.workers[0].url, path, body, "unused")
    assert 400 <= direct.status_code < 500, direct.text
    through = raw_post(fleet.gateway.url, path, body, fleet.key)
    assert through.status_code == direct.status_code
    assert through.json() == direct.json()
    assert through.headers["content-type"] == direct.headers["content-type"]


def test_over_the_context_the_sdk_raises_vllms_bad_request(fleet: Fleet) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        fleet.client().completions.create(
            model=MODEL, prompt="word " * (MAX_MODEL_LEN + 50), max_tokens=4
        )


def fresh_key(fleet: Fleet, tenant: str) -> tuple[str, str]:
    """A new tenant's key, once the gateway has picked it up (it re-reads keys twice a second)."""
    key, key_id = procs.create_key(fleet.db, tenant)
    models = f"{fleet.gateway.url}/v1/models"
    headers = {"authorization": f"Bearer {key}"}
    assert procs.wait_for(lambda: httpx.get(models, headers=headers).status_code == 200)
    return key, key_id


def rows_for(fleet: Fleet, key_id: str) -> list[Any]:
    return [row for row in procs.usage_rows(fleet.db) if row["key_id"] == key_id]


def mixed_request(client: openai.OpenAI, i: int, request_id: str | None = None) -> int:
    """One of a mix of shapes that all run to their end; returns its `n` (vLLM counts each of its
    prompts `n` times in `prompt_tokens_total`)."""
    endpoint, params = list(CASES.values())[i % len(CASES)]
    max_tokens = 8 + i % 17
    params = {**params, "max_tokens": max_tokens}
    params.pop("max_completion_tokens", None)
    if "extra_body" in params:
        params["extra_body"] = {**params["extra_body"], "min_tokens": max_tokens}
    if request_id is not None:
        params["extra_headers"] = {"x-request-id": request_id}
    call(client, endpoint, params)
    return int(params.get("n", 1))


def test_metered_tokens_equal_vllm_counters(fleet: Fleet) -> None:
    """Guarantee 3 against real vLLM: over a concurrent mixed workload run to its end, the ledger's
    prompt and completion tokens equal the growth of vLLM's own counters, to the token."""
    key, key_id = fresh_key(fleet, "metered")
    client = fleet.client(key)
    prompt_before, generated_before = fleet.settled_counters()
    total = 48
    ids = [f"mixed-{i}-{uuid.uuid4().hex[:6]}" for i in range(total)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        n = dict(
            zip(
                ids, pool.map(lambda i: mixed_request(client, i, ids[i]), range(total)), strict=True
            )
        )
    assert procs.wait_for(lambda: len(rows_for(fleet, key_id)) == total, timeout=15)
    prompt_after, generated_after = fleet.settled_counters()
    rows = rows_for(fleet, key_id)
    assert {row["status"] for row in rows} == {"completed"}
    assert {row["usage_source"] for row in rows} == {"worker"}
    assert len({row["worker"] for row in rows}) == 2, "both workers served"
    assert sum(row["completion_tokens"] for row in rows) == generated_after - generated_before
    # Billed once per request (vLLM's usage, OpenAI's rule for `n`); vLLM's counter counts each
    # prompt once per sequence.
    assert sum(row["prompt_tokens"] * n[row["request_id"]] for row in rows) == (
        prompt_after - prompt_before
    )


def stream_and_leave(url: str, key: str, request_id: str, after: int) -> tuple[int, int]:
    """Streams a long completion, reads `after` token chunks and disconnects. Returns (prompt,
    completion) tokens as the last usage the client read reported them."""
    body = {
        "model": MODEL,
        "prompt": f"{PROMPT} {request_id}",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    headers = {"authorization": f"Bearer {key}", "x-request-id": request_id}
    usage: dict[str, int] = {}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        for seen, payload in enumerate(procs.sse_events(response.iter_lines()), start=1):
            usage = json.loads(payload)["usage"]
            if seen == after:
                break
    return usage["prompt_tokens"], usage["completion_tokens"]


def test_disconnects_are_billed_for_what_was_relayed(fleet: Fleet) -> None:
    """Guarantee 2 against real vLLM: a client that leaves mid-stream is billed for the prompt
    and every token relayed to it; vLLM stops soon after, having generated a few more tokens
    that no one sees and no one is billed for. The gap is measured and bounded."""
    key, key_id = fresh_key(fleet, "leaver")
    client = fleet.client(key)
    prompt_before, generated_before = fleet.settled_counters()
    leavers = [(f"leave-{uuid.uuid4().hex[:8]}", 1 + i % 12) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        left = pool.map(
            lambda job: (job[0], stream_and_leave(fleet.gateway.url, key, job[0], job[1])),
            leavers,
        )
        finished = pool.map(
            lambda i: (f"done-{i}-{key_id}", mixed_request(client, i, f"done-{i}-{key_id}")),
            range(16),
        )
        seen = dict(left)
        n = dict(finished)
    assert procs.wait_for(lambda: len(rows_for(fleet, key_id)) == 32, timeout=15)
    prompt_after, generated_after = fleet.settled_counters()
    rows = {row["request_id"]: row for row in rows_for(fleet, key_id)}
    in_flight = 0
    for request_id, (prompt, completion) in seen.items():
        row = rows[request_id]
        assert row["status"] == "cancelled"
        assert row["prompt_tokens"] == prompt
        # Billed from the last usage the gateway relayed: what the client read, plus what was
        # already written to its connection when it closed (exact equality with what was
        # written is the simulator tier's test, where tokens are paced).
        assert row["completion_tokens"] >= completion, dict(row)
        in_flight += row["completion_tokens"] - completion
    # vLLM counts a prompt once per sequence (see test_metered_tokens_equal_vllm_counters).
    billed_prompt = sum(row["prompt_tokens"] * n.get(rid, 1) for rid, row in rows.items())
    billed_completion = sum(row["completion_tokens"] for row in rows.values())
    assert billed_prompt == prompt_after - prompt_before
    gap = (generated_after - generated_before) - billed_completion
    per_disconnect = gap / len(leavers)
    print(
        f"\n{len(leavers)} disconnects: {gap} tokens generated after the last relayed one"
        f" ({per_disconnect:.2f} each); {in_flight} relayed but unread by the client"
    )
    assert gap >= 0, "billed more than vLLM generated"
    assert per_disconnect <= 4, f"{per_disconnect:.2f} tokens per disconnect"


def tokenized(fleet: Fleet, body: dict[str, Any]) -> int:
    response = httpx.post(f"{fleet.workers[0].url}/tokenize", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return int(response.json()["count"])


def test_vllms_tokenizer_counts_what_its_usage_reports(fleet: Fleet) -> None:
    """What the gateway's own counts (usage_source "gateway", for requests a worker reported no
    usage for) rest on: vLLM's `/tokenize`, given a request's prompt the way the gateway gives
    it, counts the prompt tokens vLLM's usage reports for that request; and the generated text,
    tokenized again without special tokens, gives back the completion tokens."""
    direct = fleet.direct()
    chat = call(direct, "chat", {"messages": MESSAGES, "max_tokens": 24, "temperature": 0})
    assert tokenized(fleet, {"messages": MESSAGES}) == chat["usage"]["prompt_tokens"]
    completion = direct.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert completion.usage is not None
    assert tokenized(fleet, {"prompt": PROMPT}) == completion.usage.prompt_tokens
    again = tokenized(fleet, {"prompt": completion.choices[0].text, "add_special_tokens": False})
    print(f"\ncompletion: {completion.usage.completion_tokens} tokens, {again} re-tokenized")
    # An estimate: text does not always tokenize back to the tokens that made it (this tiny
    # model's random-weight text gives 22 for 24).
    assert (
        abs(again - completion.usage.completion_tokens) <= 0.15 * completion.usage.completion_tokens
    )


# vLLM's own parser and pre-load checks, as `vllm serve` runs them before loading a model.
PARSE_SERVE_ARGS = """
import sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
args = make_arg_parser(FlexibleArgumentParser()).parse_args(sys.argv[1:])
validate_parsed_serve_args(args)
print(args.model, args.max_num_seqs, args.enable_prompt_tokens_details)
"""


def test_vllm_accepts_the_gpu_recipes_command_line(
    vllm_env: cpu_env.VllmEnv, tmp_path: Path
) -> None:
    """deploy/vllm/serve.sh's flags are flags of this vLLM (a renamed or removed one fails)."""
    argv = recipe_args(tmp_path, MODEL="org/model", MAX_NUM_SEQS="64", MAX_MODEL_LEN="4096")
    assert argv[:2] == ["serve", "org/model"]
    flags = ["--model", "org/model", *argv[2:-1]]  # `vllm serve MODEL` is `--model MODEL`

    def parse(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(vllm_env.python), "-c", PARSE_SERVE_ARGS, *args],
            env=vllm_env.worker_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    parsed = parse(*flags)
    assert parsed.returncode == 0, parsed.stderr[-2000:]
    assert parsed.stdout.split()[-3:] == ["org/model", "64", "True"]
    assert parse(*flags, "--disable-log-requests").returncode != 0, "gone in vLLM 0.32"


def gateway_metric(fleet: Fleet, name: str, worker: procs.Process) -> float | None:
    text = httpx.get(f"{fleet.gateway.url}/metrics", timeout=5).text
    prefix = f'{name}{{worker="{worker.url}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def test_prefix_affinity_keeps_a_conversation_where_its_prefix_is_cached(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A second gateway, with `prefix_affinity`, in front of the same workers: every turn of a
    conversation goes to one worker, where vLLM serves the prefix the turns share from its cache
    (`cached_tokens`, in whole blocks of the CPU build's 128 tokens)."""
    workers = [worker.url for worker in fleet.workers]
    routing = 'policy = "prefix_affinity"\n'
    config = procs.write_config(tmp_path / "affinity.toml", workers, fleet.db, routing=routing)
    gateway = procs.start(["serve", "--config", str(config)])
    try:
        client = openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=fleet.key, max_retries=0, timeout=120.0
        )
        # About 330 tokens, opening with words no other test sent: two whole blocks of its own.
        system = f"{uuid.uuid4().hex} " + " ".join([PROMPT] * 25)
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": "what does the gateway meter per tenant"},
        ]
        cached = []
        for turn in range(3):
            answer = client.chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
                extra_headers={"x-request-id": f"affinity-{turn}-{system[:8]}"},
            )
            details = answer.usage.prompt_tokens_details if answer.usage else None
            cached.append(details.cached_tokens if details else None)
            reply = answer.choices[0].message.content or ""
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": f"and then what, step {turn}"})
        client.close()
        assert cached[0] == 0, cached
        assert all(tokens is not None and tokens >= 256 for tokens in cached[1:]), cached
        ids = {f"affinity-{turn}-{system[:8]}" for turn in range(3)}

        def served_by() -> set[str]:
            rows = procs.usage_rows(fleet.db)
            return {row["worker"] for row in rows if row["request_id"] in ids}

        assert procs.wait_for(
            lambda: len([r for r in procs.usage_rows(fleet.db) if r["request_id"] in ids]) == 3
        )
        assert len(served_by()) == 1
    finally:
        gateway.stop()


def test_routing_reads_vllms_own_load(fleet: Fleet) -> None:
    """The gateway scrapes each worker's `/metrics`: requests vLLM runs and its KV-cache use show
    in the gateway's own `/metrics`, and long streams spread over both workers."""
    client = fleet.client()

    def long_stream(i: int) -> int:
        chunks = client.completions.create(
            model=MODEL,
            prompt=f"{PROMPT} {i}",
            max_tokens=300,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return sum(1 for _ in chunks)

    peak: dict[str, float] = {}

    def sample() -> bool:
        for worker in fleet.workers:
            for name in ("running_requests", "kv_cache_usage"):
                value = gateway_metric(fleet, f"tokengate_worker_{name}", worker) or 0.0
                key = f"{name}@{worker.url}"
                peak[key] = max(peak.get(key, 0.0), value)
        return all(value > 0 for value in peak.values()) and len(peak) == 4

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(long_stream, i) for i in range(6)]
        assert procs.wait_for(sample, timeout=30, interval=0.05), peak
        assert all(s.result() > 0 for s in streams)
    # Once vLLM is idle again, so is what the gateway read from it.
    assert procs.wait_for(
        lambda: all(
            gateway_metric(fleet, "tokengate_worker_running_requests", w) == 0
            for w in fleet.workers
        ),
        timeout=10,
    )


def test_a_stopped_worker_leaves_rotation_while_requests_succeed(fleet: Fleet) -> None:
    """Guarantee 7 against real vLLM. Stops worker 0 (SIGTERM) under load; keep this test last.

    The load is non-streaming: a request the stopping worker aborts has relayed nothing yet and is
    retried on the other worker. A stream it cuts after its first event cannot be moved and ends
    with an error event (the simulator tier's `test_worker_failure_mid_stream...`)."""
    key, key_id = fresh_key(fleet, "failover")
    client = fleet.client(key)
    stopped_at: list[float] = []  # monotonic, then wall-clock
    errors: list[BaseException] = []

    # Set if the test fails before the stop: the senders must not outlive it.
    abandoned = threading.Event()

    def keep_sending(worker_id: int) -> int:
        sent = 0
        for i in itertools.count():
            if abandoned.is_set() or (stopped_at and time.monotonic() > stopped_at[0] + 3):
                return sent
            try:
                non_streaming = [
                    c for c in CASES.values() if not c[1].get("stream") and "extra_body" not in c[1]
                ]
                endpoint, params = non_streaming[(worker_id + i) % len(non_streaming)]
                call(client, endpoint, {**params, "max_tokens": 8 + i % 9})
            except Exception as error:  # collected and asserted below
                errors.append(error)
            sent += 1
        return sent

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        senders = [pool.submit(keep_sending, i) for i in range(3)]
        try:
            # Under load: both workers have answered some of it.
            assert procs.wait_for(
                lambda: len({row["worker"] for row in rows_for(fleet, key_id)}) == 2, timeout=30
            )
            fleet.workers[0].stop(timeout=30)
            stopped_at += [time.monotonic(), time.time()]
        finally:
            if not stopped_at:
                abandoned.set()
        total = sum(s.result() for s in senders)
    assert errors == [], errors[:3]
    assert gateway_metric(fleet, "tokengate_worker_healthy", fleet.workers[0]) == 0
    # After the stop every request went to the other worker.
    assert procs.wait_for(lambda: len(rows_for(fleet, key_id)) == total, timeout=15)
    rows = rows_for(fleet, key_id)
    late = [row for row in rows if row["started_at_ms"] > (stopped_at[1] + 1) * 1000]
    assert late
    assert {row["worker"] for row in late} == {fleet.workers[1].url}
    assert {row["status"] for row in rows} == {"completed"}
