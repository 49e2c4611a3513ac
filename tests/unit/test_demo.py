"""Pieces of `gateway demo` and `gateway sim` that need no running server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import load_config
from gateway.demo import client_examples, ensure_demo_key, write_config
from gateway.keys import hash_key
from gateway.ledger.apikeys import active_key_snapshot
from gateway.ledger.db import open_ledger
from gateway.ledger.tenants import list_tenants
from gateway.sim import SimConfig


def test_demo_config_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data_dir = Path("data dir")
    data_dir.mkdir()
    path = write_config(data_dir, 8123, ["http://127.0.0.1:40001", "http://127.0.0.1:40002"])
    config = load_config(path)
    assert config.server.port == 8123
    assert config.server.drain_seconds == 0
    assert [w.url for w in config.workers] == ["http://127.0.0.1:40001", "http://127.0.0.1:40002"]
    assert config.storage.url == f"sqlite:///{tmp_path / 'data dir' / 'gateway.db'}"


def test_demo_key_reuses_the_demo_tenant(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    first = ensure_demo_key(url)
    second = ensure_demo_key(url)
    with open_ledger(url) as conn:
        assert [t.name for t in list_tenants(conn)] == ["demo"]
        hashes = {entry["hash"] for entry in active_key_snapshot(conn)["keys"]}
    assert hashes == {hash_key(first), hash_key(second)}


def test_client_examples_carry_the_key_and_base_url() -> None:
    text = client_examples("http://127.0.0.1:8000/v1", "tg-secret")
    assert "curl -N http://127.0.0.1:8000/v1/chat/completions" in text
    assert 'Authorization: Bearer tg-secret"' in text
    assert 'OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="tg-secret")' in text
    body = text.split("-d '", 1)[1].split("'", 1)[0]
    assert json.loads(body)["stream"] is True


def test_sim_document_has_the_core_fields_only() -> None:
    config = SimConfig(host="::1", port=0, ttft_ms=50, seed=7)
    assert json.loads(config.core_document()) == {
        "model": "sim-model",
        "max_model_len": 4096,
        "ttft_ms": 50,
        "itl_ms": 0,
        "max_num_seqs": 256,
        "max_output_tokens": 64,
        "error_rate": 0.0,
        "die_rate": 0.0,
        "seed": 7,
        "report_usage": True,
    }
    assert config.listen() == "[::1]:0"
    with pytest.raises(ValidationError, match="die_rate"):
        SimConfig(die_rate=-0.1)
