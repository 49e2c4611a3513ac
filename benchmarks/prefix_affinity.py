"""Prefix affinity on real vLLM: the workers' own prefix-cache hit rate with each routing policy,
on a multi-turn chat workload, in one run on the same workers.

    python benchmarks/prefix_affinity.py            # writes a section of benchmarks/RESULTS.md
    python benchmarks/prefix_affinity.py --quick    # 8 conversations x 3 turns, prints only

Two vLLM CPU workers (the real-vLLM tier's environment and tiny model, `tests/vllm/cpu_env.py`),
each pinned to its own core, each with a small KV cache (`--block-size 32
--num-gpu-blocks-override 200`: 6,400 tokens) and `VLLM_SERVER_DEV_MODE=1` for `POST
/reset_prefix_cache`. The workload: `--conversations` chats of `--turns` turns, each with a system
prompt of its own of `--system-words` words (the tiny tokenizer's own words, about a token each);
each turn appends the previous answer and a new question. `--concurrency` clients take turns from
one queue in which a conversation goes back to the end once its turn is answered, so
conversations interleave (between two turns of one, every other conversation has a turn).
Answers are up to `--max-tokens` long, at temperature 0. `--rounds` repeat everything with other
system prompts, so the hash splits the conversations anew.

Modes, each after both workers' prefix caches are emptied:
- `least_load`: through a gateway with `routing.policy = "least_load"`;
- `sticky`: each conversation sent always to one worker (conversation i to worker i mod 2, an even
  split), directly, with no gateway;
- `sticky, ring homes`: each conversation sent always to the worker prefix affinity names for it
  (its first turn sent alone through the gateway, the worker read off its usage event), directly:
  the same split as prefix affinity's;
- `prefix_affinity`: through a gateway with `routing.policy = "prefix_affinity"`
  (`--load-factor`, `--load-floor`);
- `prefix_affinity, 2 replicas`: the same through two gateways (the second lists the workers in
  the other order), requests alternating between them.

The hit rate is the workers' own, `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total`
(in tokens), over the mode's requests, both workers summed.
"""

from __future__ import annotations

import argparse
import ast
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

BEGIN = "<!-- prefix_affinity.py:begin -->"
END = "<!-- prefix_affinity.py:end -->"
BLOCK_SIZE = 32
GPU_BLOCKS = 200
# A conversation's last turn runs past the tiny model's 512 positions (RoPE extends past them).
MAX_MODEL_LEN = 1024
SEED = 20261205


def _tiny_model_words() -> list[str]:
    """The words the tiny model's tokenizer was trained on (about one token each), read from
    `tests/vllm/tiny_model.py` without importing it (it needs torch, which only vLLM's
    environment has)."""
    source = Path(cpu_env.TINY_MODEL).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_WORD_TEXT" for t in node.targets
        ):
            return str(ast.literal_eval(node.value)).split()
    raise HarnessError("no _WORD_TEXT in tests/vllm/tiny_model.py")


WORDS = _tiny_model_words()


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
    round: int = 0
    requests: int = 0
    errors: int = 0
    hits: float = 0.0
    queries: float = 0.0
    per_worker: list[float] = field(default_factory=list)
    # Each worker's own hit rate over the mode.
    hit_rate_per_worker: list[float] = field(default_factory=list)
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


def workload(
    conversations: int, turns: int, system_words: int, seed: int = SEED
) -> list[Conversation]:
    """The conversations of one round, the same for every mode of it."""
    out = []
    for i in range(conversations):
        rng = random.Random(seed * 1000 + i)
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
    name: str,
    workers: list[str],
    routing: str,
    db_url: str,
    key: str,
    workdir: Path,
) -> tuple[Service, str]:
    config = workdir / f"{name}.toml"
    tables = "".join(f'[[workers]]\nurl = "{url}"\n' for url in workers)
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\n\n[storage]\nurl = "{db_url}"\n\n'
        f'[journal]\ndir = "{workdir / name}.journal"\n\n'
        f"[routing]\n{routing}\n\n{tables}"
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
    lines = [
        "| round | mode | hit rate | vs sticky | vs sticky, ring homes | hit rate on worker 0 / 1"
        " | requests on worker 0 / 1 | max share | affinity hits / spills | seconds |",
        "|---:|---|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for r in results:
        balanced = next(x for x in results if x.round == r.round and x.mode == "sticky")
        ring = next(x for x in results if x.round == r.round and x.mode == "sticky, ring homes")
        affinity = "" if r.affinity is None else f"{r.affinity[0]:.0f} / {r.affinity[1]:.0f}"
        rates = " / ".join(f"{rate:.3f}" for rate in r.hit_rate_per_worker)
        lines.append(
            f"| {r.round + 1} | {r.mode} | {r.hit_rate:.3f} | {r.hit_rate / balanced.hit_rate:.2f}"
            f" | {r.hit_rate / ring.hit_rate:.2f} | {rates}"
            f" | {r.per_worker[0]:.0f} / {r.per_worker[1]:.0f} | {r.max_share:.0%} | {affinity}"
            f" | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def ring_homes(
    gateway: str, key: str, db_url: str, conversations: list[Conversation], tag: str
) -> list[str]:
    """The worker prefix affinity places each conversation on when nothing is in flight (its
    home on the ring): each one's first turn sent alone through `gateway`, its worker read from
    the usage event."""
    headers = {"authorization": f"Bearer {key}"}
    for convo in conversations:
        body = {"model": cpu_env.SERVED_MODEL, "messages": convo.messages, "max_tokens": 1}
        request_headers = {**headers, "x-request-id": f"{tag}-{convo.index}"}
        response = httpx.post(
            f"{gateway}/v1/chat/completions", json=body, headers=request_headers, timeout=60
        )
        if response.status_code != 200:
            raise HarnessError(f"probe: {response.status_code} {response.text}")

    def workers() -> dict[str, str]:
        rows = procs.usage_rows(db_url)
        return {row["request_id"]: row["worker"] for row in rows if row["request_id"] in wanted}

    wanted = {f"{tag}-{c.index}" for c in conversations}
    if not procs.wait_for(lambda: len(workers()) == len(wanted), timeout=30):
        raise HarnessError("the probes' usage events did not reach the ledger")
    found = workers()
    return [found[f"{tag}-{c.index}"] for c in conversations]


def measure(
    name: str,
    round_: int,
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
    result = Result(name, round_)
    started = time.monotonic()
    run_mode(result, pick, key, conversations, args.concurrency, args.max_tokens)
    result.seconds = time.monotonic() - started
    procs.wait_for(lambda: idle(workers), 30)
    after = counters(workers)
    pairs = list(zip(after, before, strict=True))
    result.hits = sum(a["hits"] - b["hits"] for a, b in pairs)
    result.queries = sum(a["queries"] - b["queries"] for a, b in pairs)
    result.per_worker = [a["requests"] - b["requests"] for a, b in pairs]
    result.hit_rate_per_worker = [
        (a["hits"] - b["hits"]) / max(1.0, a["queries"] - b["queries"]) for a, b in pairs
    ]
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
    parser.add_argument(
        "--load-factor", type=float, default=1.25, help="routing.affinity_load_factor"
    )
    parser.add_argument("--load-floor", type=int, default=8, help="routing.affinity_load_floor")
    parser.add_argument(
        "--rounds", type=int, default=3, help="each with other system prompts (1 with --quick)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations, args.turns, args.rounds = 8, 3, 1

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
            affinity = (
                f'policy = "prefix_affinity"\naffinity_load_factor = {args.load_factor}\n'
                f"affinity_load_floor = {args.load_floor}\n"
            )
            for name, routing, order in [
                ("least_load", 'policy = "least_load"', workers),
                ("affinity-1", affinity, workers),
                ("affinity-2", affinity, workers[::-1]),
            ]:
                gateway, url = start_gateway(name, order, routing, db_url, key, workdir)
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
            for round_ in range(args.rounds):
                seed = SEED + round_

                def conversations(turns: int, seed: int = seed) -> list[Conversation]:
                    return workload(args.conversations, turns, args.system_words, seed)

                homes = ring_homes(first, key, db_url, conversations(1), f"home-{round_}")
                split = [sum(home == url for home in homes) for url in workers]
                print(f"round {round_ + 1}: ring homes split {split}", flush=True)

                def home(i: int, n: int, homes: list[str] = homes) -> str:
                    return homes[i]

                modes: list[tuple[str, Pick, list[str]]] = [
                    ("least_load", lambda i, n: least, [least]),
                    ("sticky", lambda i, n: workers[i % 2], []),
                    ("sticky, ring homes", home, []),
                    ("prefix_affinity", lambda i, n: first, [first]),
                    (
                        "prefix_affinity, 2 replicas",
                        lambda i, n: (first, second)[n % 2],
                        [first, second],
                    ),
                ]
                for name, pick, via in modes:
                    results.append(
                        measure(
                            name, round_, pick, via, workers, key, conversations(args.turns), args
                        )
                    )
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
    rounds = (
        f"{args.rounds} rounds, each with system prompts of its own," if args.rounds > 1 else ""
    )
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
            f" {rounds} {args.conversations} conversations of {args.turns} turns,"
            f" {args.concurrency}"
            " requests at a time, interleaved (a conversation's next turn joins the back of the"
            f" queue); each its own system prompt of {system_tokens} tokens (chat template"
            f" included), answers of up to {args.max_tokens} tokens at temperature 0; mean"
            f" prompt tokens by turn (first sticky run): {by_turn}. Prefix affinity with"
            f" `affinity_load_factor = {args.load_factor}`, `affinity_load_floor ="
            f" {args.load_floor}`. Hit rate:"
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
