"""Prefix affinity on real vLLM: the workers' own prefix-cache hit rate with each routing policy,
on a multi-turn chat workload, in one run on the same workers.

    python benchmarks/prefix_affinity.py            # writes a section of benchmarks/RESULTS.md
    python benchmarks/prefix_affinity.py --quick    # 8 conversations x 3 turns, prints only

Two vLLM CPU workers (the real-vLLM tier's environment and tiny model, `tests/vllm/cpu_env.py`),
each pinned to its own core, each with a small KV cache (`--block-size 32
--num-gpu-blocks-override 200`: 6,400 tokens) and `VLLM_SERVER_DEV_MODE=1` for `POST
/reset_prefix_cache`. The workload: `--conversations` chats of `--turns` turns, each with a system
prompt of its own of about `--system-tokens` tokens; each turn appends the previous answer and a
new question. `--concurrency` clients take turns from one queue in which a conversation goes back
to the end once its turn is answered, so conversations interleave (between two turns of one,
every other conversation has a turn). Answers are `--max-tokens` long, at temperature 0.

Modes, each after both workers' prefix caches are emptied:
- `least_load`: through a gateway with `routing.policy = "least_load"`;
- `sticky`: each conversation sent always to one worker (conversation i to worker i mod 2),
  directly, with no gateway: the reference;
- `prefix_affinity`: through a gateway with `routing.policy = "prefix_affinity"`;
- `prefix_affinity, 2 replicas`: the same through two gateways (the second lists the workers in
  the other order), requests alternating between them.

The hit rate is the workers' own, `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`
(in tokens), over the mode's requests, both workers summed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from harness import HarnessError, Pinned, Service, git_commit, write_results
from tests.support import procs
from tests.vllm import cpu_env
from tests.vllm.tiny_model import WORDS

BEGIN = "<!-- prefix_affinity.py:begin -->"
END = "<!-- prefix_affinity.py:end -->"
BLOCK_SIZE = 32
GPU_BLOCKS = 200
# A conversation's last turn runs past the tiny model's 512 positions (RoPE extends past them).
MAX_MODEL_LEN = 1024
SEED = 20261205


@dataclass
class Conversation:
    index: int
    messages: list[dict[str, str]]
    turns_left: int
    rng: random.Random

    def question(self) -> str:
        words = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(6, 10)))
        return words.capitalize() + "?"


# Where a request goes: (conversation index, request number) -> base URL.
Pick = Callable[[int, int], str]


@dataclass
class Result:
    """One mode's run."""

    mode: str
    requests: int = 0
    errors: int = 0
    hits: float = 0.0
    queries: float = 0.0
    per_worker: list[float] = field(default_factory=list)
    seconds: float = 0.0
    # The mean `usage.prompt_tokens` of each turn.
    prompt_tokens_by_turn: list[float] = field(default_factory=list)
    # Gateways' `tokengate_affinity_total` over the mode: (hits, spills).
    affinity: tuple[float, float] | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1.0, self.queries)

    @property
    def max_share(self) -> float:
        return max(self.per_worker) / max(1.0, sum(self.per_worker))


def workload(conversations: int, turns: int, system_words: int) -> list[Conversation]:
    out = []
    for i in range(conversations):
        rng = random.Random(SEED * 1000 + i)
        system = " ".join(rng.choice(WORDS) for _ in range(system_words)).capitalize() + "."
        convo = Conversation(i, [{"role": "system", "content": system}], turns, rng)
        convo.messages.append({"role": "user", "content": convo.question()})
        out.append(convo)
    return out


def run_mode(
    result: Result,
    pick: Pick,
    key: str,
    conversations: list[Conversation],
    concurrency: int,
    max_tokens: int,
) -> None:
    """Runs every conversation to its end, `concurrency` requests at a time, interleaved: a
    conversation goes back to the end of the queue once its turn is answered."""
    ready: deque[Conversation] = deque(conversations)
    cond = threading.Condition()
    active = 0
    counter = itertools.count()
    by_turn: list[list[int]] = [[] for _ in range(max(c.turns_left for c in conversations))]

    def client() -> None:
        nonlocal active
        with httpx.Client(timeout=300) as http:
            while True:
                with cond:
                    while not ready and active > 0:
                        cond.wait()
                    if not ready:
                        return
                    convo = ready.popleft()
                    active += 1
                    number = next(counter)
                body = {
                    "model": cpu_env.SERVED_MODEL,
                    "messages": convo.messages,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                }
                headers = {"authorization": f"Bearer {key}"}
                url = pick(convo.index, number)
                response = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                with cond:
                    active -= 1
                    result.requests += 1
                    cond.notify_all()
                    if response.status_code != 200:
                        result.errors += 1
                        print(f"{result.mode}: {response.status_code} {response.text[:200]}")
                        continue
                    answer = response.json()
                    by_turn[len(convo.messages) // 2 - 1].append(answer["usage"]["prompt_tokens"])
                    content = answer["choices"][0]["message"]["content"] or "."
                    convo.messages.append({"role": "assistant", "content": content})
                    convo.turns_left -= 1
                    if convo.turns_left > 0:
                        convo.messages.append({"role": "user", "content": convo.question()})
                        ready.append(convo)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.prompt_tokens_by_turn = [statistics.mean(t) if t else 0.0 for t in by_turn]


def counters(workers: list[str]) -> list[dict[str, float]]:
    """Each worker's prefix-cache counters, finished requests and requests in progress."""
    out = []
    for url in workers:
        metrics = procs.scrape(url)
        out.append(
            {
                "hits": metrics.get("vllm:prefix_cache_hits_total", 0.0),
                "queries": metrics.get("vllm:prefix_cache_queries_total", 0.0),
                "requests": metrics.get("vllm:request_success_total", 0.0),
                "busy": metrics.get("vllm:num_requests_running", 0.0)
                + metrics.get("vllm:num_requests_waiting", 0.0),
            }
        )
    return out


def idle(workers: list[str]) -> bool:
    return all(c["busy"] == 0 for c in counters(workers))


def reset_caches(workers: list[str]) -> None:
    """Empties both prefix caches once the workers are idle."""
    if not procs.wait_for(lambda: idle(workers), 60, 0.2):
        raise HarnessError("the workers did not go idle")
    for url in workers:
        response = httpx.post(f"{url}/reset_prefix_cache", timeout=30)
        if response.status_code != 200:
            raise HarnessError(f"{url}/reset_prefix_cache: {response.status_code} {response.text}")


def affinity_counts(gateways: list[str]) -> tuple[float, float]:
    """`tokengate_affinity_total` summed over `gateways`: (hits, spills)."""
    hits = spills = 0.0
    for url in gateways:
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith("tokengate_affinity_total{"):
                value = float(line.rsplit(" ", 1)[1])
                if 'outcome="hit"' in line:
                    hits += value
                else:
                    spills += value
    return hits, spills


def start_worker(env: cpu_env.VllmEnv, core: int, workdir: Path) -> tuple[Pinned, str]:
    port = procs.free_port()
    argv = env.worker_command(
        port,
        *("--block-size", str(BLOCK_SIZE)),
        *("--num-gpu-blocks-override", str(GPU_BLOCKS)),
        *("--max-model-len", str(MAX_MODEL_LEN)),
    )
    worker_env = {
        **env.worker_env(cpu=core),
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
    }
    return Pinned(f"vllm-{core}", core, argv, workdir, env=worker_env), f"http://127.0.0.1:{port}"


def wait_worker(worker: Pinned, url: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        worker.check_running()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise HarnessError(f"vLLM did not start:\n{worker.log_tail()}")


def start_gateway(
    name: str, workers: list[str], policy: str, db_url: str, key: str, workdir: Path
) -> tuple[Service, str]:
    config = workdir / f"{name}.toml"
    tables = "".join(f'[[workers]]\nurl = "{url}"\n' for url in workers)
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\n\n[storage]\nurl = "{db_url}"\n\n'
        f'[journal]\ndir = "{workdir / name}.journal"\n\n'
        f'[routing]\npolicy = "{policy}"\n\n{tables}'
    )
    args = ["serve", "--config", str(config), "--log-level", "WARNING"]
    gateway = Service(name, 1, args, workdir)
    url = gateway.wait_listening()

    def listed() -> bool:
        models = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}).json()
        return len(models.get("data") or []) > 0

    if not procs.wait_for(listed, timeout=30, interval=0.2):
        raise HarnessError(f"{name} never listed the workers' model:\n{gateway.log_tail()}")
    return gateway, url


def table(results: list[Result]) -> str:
    sticky = next(r for r in results if r.mode == "sticky")
    lines = [
        "| mode | requests | hit rate | vs sticky | requests on worker 0 / 1 | max share"
        " | affinity hits / spills | seconds |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in results:
        affinity = "" if r.affinity is None else f"{r.affinity[0]:.0f} / {r.affinity[1]:.0f}"
        lines.append(
            f"| {r.mode} | {r.requests} | {r.hit_rate:.3f} | {r.hit_rate / sticky.hit_rate:.2f}"
            f" | {r.per_worker[0]:.0f} / {r.per_worker[1]:.0f} | {r.max_share:.0%} | {affinity}"
            f" | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def measure(
    name: str,
    pick: Pick,
    gateways: list[str],
    workers: list[str],
    key: str,
    conversations: list[Conversation],
    args: argparse.Namespace,
) -> Result:
    """One mode, from empty prefix caches."""
    reset_caches(workers)
    before = counters(workers)
    affinity_before = affinity_counts(gateways)
    result = Result(name)
    started = time.monotonic()
    run_mode(result, pick, key, conversations, args.concurrency, args.max_tokens)
    result.seconds = time.monotonic() - started
    procs.wait_for(lambda: idle(workers), 30)
    after = counters(workers)
    pairs = list(zip(after, before, strict=True))
    result.hits = sum(a["hits"] - b["hits"] for a, b in pairs)
    result.queries = sum(a["queries"] - b["queries"] for a, b in pairs)
    result.per_worker = [a["requests"] - b["requests"] for a, b in pairs]
    if "prefix_affinity" in name:
        hits, spills = affinity_counts(gateways)
        result.affinity = (hits - affinity_before[0], spills - affinity_before[1])
    print(json.dumps({**asdict(result), "hit_rate": result.hit_rate}), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="8 x 3 turns; no RESULTS.md")
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--system-words", type=int, default=360, help="about one token each")
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations, args.turns = 8, 3

    env = cpu_env.ensure()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="prefix-affinity-") as tmp:
        workdir = Path(tmp)
        processes: list[Pinned] = []
        try:
            started = [start_worker(env, core, workdir) for core in (0, 1)]
            processes += [worker for worker, _ in started]
            workers = [url for _, url in started]
            for worker, url in started:
                wait_worker(worker, url)
            db_url = f"sqlite:///{workdir / 'ledger.db'}"
            key, _ = procs.create_key(db_url, "bench")
            gateways = {}
            # The second replica lists the workers in the other order: the ring is by URL.
            for name, policy, order in [
                ("least_load", "least_load", workers),
                ("affinity-1", "prefix_affinity", workers),
                ("affinity-2", "prefix_affinity", workers[::-1]),
            ]:
                gateway, url = start_gateway(name, order, policy, db_url, key, workdir)
                processes.append(gateway)
                gateways[name] = url

            # What a system prompt costs in tokens, by the worker's own tokenizer and template.
            sample = workload(1, 1, args.system_words)[0]
            tokenized = httpx.post(
                f"{workers[0]}/tokenize",
                json={"model": cpu_env.SERVED_MODEL, "messages": sample.messages[:1]},
                timeout=30,
            ).json()
            system_tokens = int(tokenized["count"])
            print(f"system prompt: {system_tokens} tokens (chat template included)", flush=True)

            least, first, second = (
                gateways["least_load"],
                gateways["affinity-1"],
                gateways["affinity-2"],
            )
            modes: list[tuple[str, Pick, list[str]]] = [
                ("least_load", lambda i, n: least, [least]),
                ("sticky", lambda i, n: workers[i % 2], []),
                ("prefix_affinity", lambda i, n: first, [first]),
                (
                    "prefix_affinity, 2 replicas",
                    lambda i, n: (first, second)[n % 2],
                    [first, second],
                ),
            ]
            for name, pick, via in modes:
                conversations = workload(args.conversations, args.turns, args.system_words)
                results.append(measure(name, pick, via, workers, key, conversations, args))
        finally:
            for process in reversed(processes):
                process.stop()
    errors = sum(r.errors for r in results)
    if errors:
        raise HarnessError(f"{errors} requests failed")
    text = table(results)
    print(text)
    if args.quick:
        return
    write(results, text, system_tokens, args, argv)


def write(
    results: list[Result],
    text: str,
    system_tokens: int,
    args: argparse.Namespace,
    argv: list[str] | None,
) -> None:
    """The section of RESULTS.md, and the raw results in benchmarks/out/."""
    sticky = next(r for r in results if r.mode == "sticky")
    by_turn = ", ".join(f"{t:.0f}" for t in sticky.prompt_tokens_by_turn)
    command = shlex.join(
        ["python", "benchmarks/prefix_affinity.py", *(sys.argv[1:] if argv is None else argv)]
    )
    stamp = datetime.now(UTC)
    section = "\n".join(
        [
            BEGIN,
            "## Prefix affinity on real vLLM",
            "",
            f"`{command}` — {stamp:%Y-%m-%d %H:%M} UTC, commit {git_commit()}; vLLM 0.32.0 CPU"
            " build, tiny Llama (`tests/vllm/tiny_model.py`), two workers each pinned to its own"
            f" core with `--block-size {BLOCK_SIZE} --num-gpu-blocks-override {GPU_BLOCKS}`"
            f" ({BLOCK_SIZE * GPU_BLOCKS:,} tokens of KV cache each) and `--max-model-len"
            f" {MAX_MODEL_LEN}`; gateways (one tokio thread each) on core 1."
            f" {args.conversations} conversations of {args.turns} turns, {args.concurrency}"
            " requests at a time, interleaved (a conversation's next turn joins the back of the"
            f" queue); each its own system prompt of {system_tokens} tokens (chat template"
            f" included), answers of up to {args.max_tokens} tokens at temperature 0; mean"
            f" prompt tokens by turn (sticky run): {by_turn}. Hit rate:"
            " `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` over the mode's"
            " requests, both workers; requests per worker from `vllm:request_success_total`;"
            " prefix caches emptied (`POST /reset_prefix_cache`) before each mode; the"
            " gateways' `tokengate_affinity_total` for hits and spills.",
            "",
            text,
            "",
            END,
        ]
    )
    write_results(section + "\n", BEGIN, END)
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    raw = [{**asdict(r), "hit_rate": r.hit_rate} for r in results]
    (out / f"prefix_affinity-{stamp:%Y%m%dT%H%M%SZ}.json").write_text(
        json.dumps(raw, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
