"""The example deployment config is valid."""

from __future__ import annotations

from gateway.config import load_config
from tests.support.deploy import DEPLOY


def test_example_config_loads() -> None:
    config = load_config(DEPLOY / "gateway.toml")
    assert [w.url for w in config.workers] == ["http://10.0.0.11:8000", "http://10.0.0.12:8000"]
    assert config.server.port == 8080
