"""What the tests and the benchmarks share, each helper defined once.

- `procs`: real processes (`gateway serve`, `gateway sim`, vLLM workers), the `gateway` CLI as a
  process, free ports, API keys, the ledger's rows, a worker's metrics.
- `stack`, `fleet`: a gateway in front of simulators; gateway replicas sharing a ledger and Redis.
- `dashboard`: the Grafana dashboard's metric names, and the names a `/metrics` page exposes.
- `services`: real `redis-server` and PostgreSQL on loopback (`services/install.sh`, which
  `make services` runs, installs them).
- `events`: usage events, times and prices as the tests store them in a ledger.
- `usage_batches`: mixed batches of usage events and what a ledger holds after them.
- `billing_app`: the admin and billing app in process, and a seeded ledger.
- `cli_run`: the `gateway` CLI in process.
- `openai_errors`, `slow_client`: the OpenAI error body; a hostile client's slowness.
- `ledger_versions`: a ledger taken back to an earlier schema.
- `deploy`: `deploy/vllm/serve.sh` run with a stand-in `vllm`.

Benchmarks import it too (`benchmarks/harness.py` puts the repository root on the path).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT"]

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root directory."""
