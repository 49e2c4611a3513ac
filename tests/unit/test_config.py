"""The configuration file: defaults, field-named validation errors, the core's document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway.config import (
    AdminConfig,
    BillingConfig,
    ConfigFileError,
    ControlConfig,
    GatewayConfig,
    GrpcConfig,
    JournalConfig,
    QuotaConfig,
    RoutingConfig,
    ServerConfig,
    StorageConfig,
    TelemetryConfig,
    TelemetrySettings,
    load_config,
    options_table,
)

MINIMAL = '[[workers]]\nurl = "http://127.0.0.1:8001"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigFileError:
    with pytest.raises(ConfigFileError) as caught:
        load_config(write(tmp_path, text))
    return caught.value


def test_minimal_file_takes_every_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.server == ServerConfig(
        host="127.0.0.1",
        port=8000,
        max_body_bytes=4_194_304,
        drain_seconds=5.0,
        shutdown_grace_seconds=30.0,
    )
    assert [w.url for w in config.workers] == ["http://127.0.0.1:8001"]
    assert config.routing == RoutingConfig(
        health_interval_ms=500, connect_timeout_ms=1000, request_timeout_ms=600_000, max_attempts=3
    )
    assert config.storage == StorageConfig(url="sqlite:///data/gateway.db")
    assert config.control == ControlConfig(key_refresh_ms=500, usage_flush_ms=100, usage_batch=4096)
    assert config.quota == QuotaConfig(
        redis_url=None,
        redis_prefix="tg:",
        redis_timeout_ms=100,
        replicas=1,
        budgets_when_redis_down="reject",
        rate_limits_when_redis_down="local_share",
        lease_ms=900_000,
        default_max_tokens=4096,
    )
    assert config.admin == AdminConfig(
        host="127.0.0.1",
        port=8090,
        token_env="TOKENGATE_ADMIN_TOKEN",
        billing_token_env="TOKENGATE_BILLING_TOKEN",
    )
    assert config.billing == BillingConfig(currency="USD")


def test_full_file_is_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[server]
host = "0.0.0.0"
port = 0
max_body_bytes = 2048
drain_seconds = 0.5
shutdown_grace_seconds = 5

[[workers]]
url = "http://10.0.0.1:8001/"

[[workers]]
url = "http://gpu-2:8000"

[routing]
health_interval_ms = 50
connect_timeout_ms = 200
request_timeout_ms = 1000
max_attempts = 10

[storage]
url = "sqlite:////var/lib/tokengate/ledger.db"

[control]
key_refresh_ms = 1000
usage_flush_ms = 20
usage_batch = 1

[quota]
redis_url = "redis://10.0.0.9:6379/2"
redis_prefix = "gw1:"
redis_timeout_ms = 50
replicas = 3
budgets_when_redis_down = "allow"
rate_limits_when_redis_down = "allow"
lease_ms = 60000
default_max_tokens = 512

[admin]
host = "::1"
port = 0
token_env = "MY_ADMIN_TOKEN"
""",
        )
    )
    assert config.server.port == 0
    assert config.server.shutdown_grace_seconds == 5.0
    assert config.server.drain_seconds == 0.5
    assert [w.url for w in config.workers] == ["http://10.0.0.1:8001", "http://gpu-2:8000"]
    assert config.routing.max_attempts == 10
    assert config.storage.url == "sqlite:////var/lib/tokengate/ledger.db"
    assert config.control.usage_batch == 1
    assert config.quota.redis_url == "redis://10.0.0.9:6379/2"
    assert (config.quota.replicas, config.quota.budgets_when_redis_down) == (3, "allow")
    assert config.admin == AdminConfig(host="::1", port=0, token_env="MY_ADMIN_TOKEN")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[server]\nhost = "localhost"', "server.host: 'localhost' is not an IP address"),
        ("[server]\nport = 70000", "server.port: Input should be less than or equal to 65535"),
        ('[server]\nport = "8000"', "server.port: Input should be a valid integer"),
        (
            "[server]\nmax_body_bytes = 1023",
            "server.max_body_bytes: Input should be greater than or equal to 1024",
        ),
        (
            "[server]\nshutdown_grace_seconds = -1.0",
            "server.shutdown_grace_seconds: Input should be greater than or equal to 0",
        ),
        (
            "[server]\ndrain_seconds = -0.5",
            "server.drain_seconds: Input should be greater than or equal to 0",
        ),
        (
            "[server]\ndrain_seconds = 3601",
            "server.drain_seconds: Input should be less than or equal to 3600",
        ),
        ("[server]\nprot = 1", "server.prot: Extra inputs are not permitted"),
        (
            "[routing]\nhealth_interval_ms = 49",
            "routing.health_interval_ms: Input should be greater than or equal to 50",
        ),
        (
            "[routing]\nconnect_timeout_ms = 0",
            "routing.connect_timeout_ms: Input should be greater than or equal to 1",
        ),
        (
            "[routing]\nrequest_timeout_ms = 0",
            "routing.request_timeout_ms: Input should be greater than or equal to 1",
        ),
        (
            "[routing]\nmax_attempts = 0",
            "routing.max_attempts: Input should be greater than or equal to 1",
        ),
        (
            "[routing]\nmax_attempts = 11",
            "routing.max_attempts: Input should be less than or equal to 10",
        ),
        (
            "[routing]\nbreaker_window = 65",
            "routing.breaker_window: Input should be less than or equal to 64",
        ),
        (
            "[routing]\nbreaker_failure_percent = 0",
            "routing.breaker_failure_percent: Input should be greater than or equal to 1",
        ),
        (
            "[routing]\nbreaker_window = 8",
            "routing: breaker_min_requests must be at most breaker_window",
        ),
        (
            "[routing]\nbreaker_max_backoff_ms = 999",
            "routing: breaker_max_backoff_ms must be at least breaker_backoff_ms",
        ),
        (
            '[routing]\npolicy = "random"',
            "routing.policy: Input should be 'least_load', 'prefix_affinity' or 'round_robin'",
        ),
        (
            "[routing]\naffinity_load_factor = 0.9",
            "routing.affinity_load_factor: Input should be greater than or equal to 1",
        ),
        (
            '[routing.models."tiny"]\npolicy = "sticky"',
            "routing.models.tiny.policy: Input should be 'least_load', 'prefix_affinity' or",
        ),
        (
            '[routing.models."tiny"]\nweight = 2',
            "routing.models.tiny.weight: Extra inputs are not permitted",
        ),
        (
            '[routing.models.""]\npolicy = "round_robin"',
            "routing.models..[key]: String should have at least 1 character",
        ),
        ('[storage]\nurl = "mysql://db/ledger"', "storage.url: unsupported database URL"),
        (
            '[storage]\nurl = "postgresql://tg:secret@db:5432/"',
            "storage.url: PostgreSQL URL 'postgresql://tg:***@db:5432/' must name a database",
        ),
        (
            '[storage]\nurl = "sqlite:///"',
            "storage.url: database URL 'sqlite:///' must name a file",
        ),
        (
            "[control]\nkey_refresh_ms = 1001",
            "control.key_refresh_ms: Input should be less than or equal to 1000",
        ),
        (
            "[control]\nusage_flush_ms = 1",
            "control.usage_flush_ms: Input should be greater than or equal to 10",
        ),
        (
            "[control]\nusage_batch = 0",
            "control.usage_batch: Input should be greater than or equal to 1",
        ),
        ('[quota]\nredis_url = "http://h:6379"', "quota.redis_url: 'http://h:6379' is not a Redis"),
        ('[quota]\nredis_url = "redis://"', "quota.redis_url: 'redis://' is not a Redis URL"),
        ("[quota]\nreplicas = 0", "quota.replicas: Input should be greater than or equal to 1"),
        (
            "[quota]\nlease_ms = 999",
            "quota.lease_ms: Input should be greater than or equal to 1000",
        ),
        (
            '[quota]\nbudgets_when_redis_down = "fail"',
            "quota.budgets_when_redis_down: Input should be 'reject' or 'allow'",
        ),
        (
            "[quota]\ndefault_max_tokens = 0",
            "quota.default_max_tokens: Input should be greater than or equal to 1",
        ),
        ('[admin]\nhost = "localhost"', "admin.host: 'localhost' is not an IP address"),
        ('[admin]\ntoken_env = "A-B"', "admin.token_env: String should match pattern"),
        ('[admin]\nbilling_token_env = ""', "admin.billing_token_env: String should match"),
        ('[billing]\ncurrency = "usd"', "billing.currency: String should match pattern"),
        ('[billing]\ncurrency = "EURO"', "billing.currency: String should match pattern"),
        ("[metrics]\nenabled = true", "metrics: Extra inputs are not permitted"),
    ],
)
def test_each_invalid_option_is_named_with_its_file(
    tmp_path: Path, text: str, expected: str
) -> None:
    error = load_error(tmp_path, MINIMAL + text)
    path = tmp_path / "gateway.toml"
    assert f"{path}: {expected}" in str(error)
    assert error.path == path


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://tokengate:secret@10.0.0.5:5432/ledger",
        "postgres://tokengate@db.internal/ledger?sslmode=require",
    ],
)
def test_storage_may_be_a_postgres_database(tmp_path: Path, url: str) -> None:
    journal = '[journal]\ndir = "/var/lib/tokengate/journal-1"\n'
    config = load_config(write(tmp_path, f'{MINIMAL}[storage]\nurl = "{url}"\n{journal}'))
    assert config.storage.url == url
    # Replicas share a PostgreSQL ledger, never a journal: each must name its own.
    error = load_error(tmp_path, f'{MINIMAL}[storage]\nurl = "{url}"\n')
    assert "journal.dir: required with a PostgreSQL ledger" in str(error)
    off = f'{MINIMAL}[storage]\nurl = "{url}"\n[journal]\nenabled = false\n'
    assert json.loads(load_config(write(tmp_path, off)).core_document())["journal"] is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://10.0.0.1:8001", "is not an http:// URL"),
        ("ftp://10.0.0.1", "is not an http:// URL"),
        ("10.0.0.1:8001", "is not an http:// URL"),
        ("http://10.0.0.1:8001/v1", "must be a worker base URL"),
        ("http://10.0.0.1:8001?x=1", "must be a worker base URL"),
        ("http://10.0.0.1:notaport", "has an invalid port"),
    ],
)
def test_worker_urls_are_checked(tmp_path: Path, url: str, expected: str) -> None:
    error = load_error(tmp_path, MINIMAL + f'[[workers]]\nurl = "{url}"\n')
    assert f"workers[1].url: '{url}' {expected}" in str(error)


def test_at_least_one_worker_is_required(tmp_path: Path) -> None:
    assert "workers: Field required" in str(load_error(tmp_path, "[server]\nport = 1\n"))
    error = load_error(tmp_path, "workers = []\n")
    assert "workers: List should have at least 1 item" in str(error)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL + "[routing]\nmax_attempts = 0\n[server]\nport = -1\n")
    assert len(error.problems) == 2


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    assert "invalid TOML" in str(load_error(tmp_path, "[server\n"))


def test_core_document_has_exactly_the_core_keys(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, MINIMAL + '[server]\nhost = "0.0.0.0"\nport = 9000\n[control]\n')
    )
    document = json.loads(config.core_document(environ={}))
    assert document == {
        "listen": "0.0.0.0:9000",
        "max_body_bytes": 4_194_304,
        "header_read_timeout_ms": 30_000,
        "body_read_timeout_ms": 30_000,
        "workers": [
            {"url": "http://127.0.0.1:8001", "dns": None, "api_key": None, "max_concurrency": None}
        ],
        "routing": {
            "health_interval_ms": 500,
            "load_interval_ms": 100,
            "connect_timeout_ms": 1000,
            "request_timeout_ms": 600_000,
            "stream_idle_timeout_ms": 60_000,
            "max_attempts": 3,
            "queue_timeout_ms": 30_000,
            "max_queued": 1024,
            "max_queued_per_tenant": 256,
            "batch_every": 10,
            "learn_capacity": True,
            "breaker_consecutive_failures": 5,
            "breaker_window": 20,
            "breaker_min_requests": 10,
            "breaker_failure_percent": 40,
            "breaker_backoff_ms": 1000,
            "breaker_max_backoff_ms": 60_000,
            "policy": "least_load",
            "affinity_load_factor": 1.25,
            "affinity_load_floor": 8,
            "coalesce_window_us": 0,
            "coalesce_max_prompts": 16,
            "models": {},
            "discovery_interval_ms": 5000,
            "dns_servers": [],
        },
        "quota": {
            "redis_url": None,
            "redis_prefix": "tg:",
            "redis_timeout_ms": 100,
            "replicas": 1,
            "budgets_when_redis_down": "reject",
            "rate_limits_when_redis_down": "local_share",
            "lease_ms": 900_000,
            "default_max_tokens": 4096,
        },
        "journal": {
            "dir": "data/gateway.usage-journal",
            "segment_bytes": 16_777_216,
            "progress_interval_ms": 100,
            "sync": "interval",
            "sync_interval_ms": 10,
        },
        "grpc_listen": None,
        "telemetry": {"otlp_endpoint": None, "sample_ratio": 1.0, "service_name": "tokengate"},
    }


def test_the_rust_tests_document_is_the_resolved_default(tmp_path: Path) -> None:
    """The core's tests read the document the control plane writes by default (the core has no
    defaults of its own), from a file this test keeps equal to `core_document()`."""
    root = next(p for p in Path(__file__).parents if (p / "Cargo.toml").is_file())
    fixture = root / "rust/core/tests/common/config.json"
    text = '[server]\nhost = "127.0.0.1"\nport = 0\n[journal]\nenabled = false\n'
    text += '[[workers]]\nurl = "http://127.0.0.1:9"\n'
    config = load_config(write(tmp_path, text))
    assert json.loads(fixture.read_text()) == json.loads(config.core_document(environ={}))


def test_routing_policies_reach_the_core_document(tmp_path: Path) -> None:
    text = MINIMAL + (
        '[routing]\npolicy = "round_robin"\naffinity_load_factor = 2\naffinity_load_floor = 0\n'
        '[routing.models."tiny-llama"]\npolicy = "prefix_affinity"\n'
        '[routing.models."org/model:v2"]\npolicy = "least_load"\n'
        '[routing.models."classifier"]\ncoalesce_window_us = 2000\n'
    )
    routing = json.loads(load_config(write(tmp_path, text)).core_document())["routing"]
    assert routing["policy"] == "round_robin"
    assert routing["affinity_load_factor"] == 2.0
    assert routing["affinity_load_floor"] == 0
    assert routing["models"] == {
        "tiny-llama": {"policy": "prefix_affinity", "coalesce_window_us": None},
        "org/model:v2": {"policy": "least_load", "coalesce_window_us": None},
        "classifier": {"policy": None, "coalesce_window_us": 2000},
    }


def test_worker_api_key_reaches_the_core_document(tmp_path: Path) -> None:
    text = (
        '[[workers]]\nurl = "http://10.0.0.1:8000"\napi_key = "vllm-secret"\n'
        '[[workers]]\nurl = "http://10.0.0.2:8000"\n'
    )
    config = load_config(write(tmp_path, text))
    assert json.loads(config.core_document())["workers"] == [
        {
            "url": "http://10.0.0.1:8000",
            "dns": None,
            "api_key": "vllm-secret",
            "max_concurrency": None,
        },
        {"url": "http://10.0.0.2:8000", "dns": None, "api_key": None, "max_concurrency": None},
    ]


def test_a_worker_may_be_a_dns_name_instead_of_a_url(tmp_path: Path) -> None:
    text = (
        '[[workers]]\ndns = "http://vllm.default.svc.cluster.local:8000"\nmax_concurrency = 4\n'
        '[routing]\ndiscovery_interval_ms = 1000\ndns_servers = ["10.96.0.10:53", "[::1]:5353"]\n'
    )
    document = json.loads(load_config(write(tmp_path, text)).core_document())
    assert document["workers"] == [
        {
            "url": None,
            "dns": "http://vllm.default.svc.cluster.local:8000",
            "api_key": None,
            "max_concurrency": 4,
        }
    ]
    assert document["routing"]["discovery_interval_ms"] == 1000
    assert document["routing"]["dns_servers"] == ["10.96.0.10:53", "[::1]:5353"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[workers]]\nmax_concurrency = 2\n", "workers[0]: give exactly one of `url` and `dns`"),
        (
            '[[workers]]\nurl = "http://a:1"\ndns = "http://b:1"\n',
            "workers[0]: give exactly one of `url` and `dns`",
        ),
        ('[[workers]]\ndns = "http://10.0.0.1:80"\n', "names an address, not a DNS name"),
        ('[[workers]]\ndns = "ftp://x:1"\n', "workers[0].dns: 'ftp://x:1' is not an http://"),
        (
            MINIMAL + '[routing]\ndns_servers = ["localhost:53"]\n',
            "routing.dns_servers[0]: 'localhost:53' is not IP:PORT",
        ),
        (MINIMAL + '[routing]\ndns_servers = ["127.0.0.1:0"]\n', "is not IP:PORT"),
        (MINIMAL + "[routing]\ndiscovery_interval_ms = 10\n", "greater than or equal to 100"),
    ],
)
def test_dns_workers_and_servers_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in str(load_error(tmp_path, text))


def test_core_document_brackets_ipv6_hosts(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + '[server]\nhost = "::1"\nport = 1\n'))
    assert json.loads(config.core_document())["listen"] == "[::1]:1"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ValueError, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


def test_options_table_lists_every_option_with_default_and_description() -> None:
    table = options_table()
    rows = [line for line in table.splitlines()[2:] if line]
    options = {row.split("|")[1].strip().strip("`") for row in rows}
    sections: dict[str, type[BaseModel]] = {
        "server": ServerConfig,
        "routing": RoutingConfig,
        "storage": StorageConfig,
        "control": ControlConfig,
        "quota": QuotaConfig,
        "admin": AdminConfig,
        "billing": BillingConfig,
        "grpc": GrpcConfig,
        "journal": JournalConfig,
        "telemetry": TelemetryConfig,
    }
    assert set(GatewayConfig.model_fields) == {*sections, "workers"}
    expected = {
        f"{section}.{name}" for section, model in sections.items() for name in model.model_fields
    }
    assert options == (expected - {"routing.models"}) | {
        "workers[].url",
        "workers[].dns",
        "workers[].api_key",
        "workers[].max_concurrency",
        'routing.models."NAME".policy',
        'routing.models."NAME".coalesce_window_us',
    }
    assert "| `routing.max_attempts` | integer | `3` |" in table
    assert "| `workers[].url` | string or null | `null` |" in table
    assert "| `workers[].api_key` | string or null | `null` |" in table
    assert '| `quota.budgets_when_redis_down` | "reject" or "allow" | `"reject"` |' in table
    for row in rows:
        description = row.split("|")[4].strip()
        assert description, row


def test_the_journal_is_on_by_default_beside_a_sqlite_ledger(tmp_path: Path) -> None:
    default = json.loads(load_config(write(tmp_path, MINIMAL)).core_document())
    assert default["journal"] == {
        "dir": "data/gateway.usage-journal",
        "segment_bytes": 16_777_216,
        "progress_interval_ms": 100,
        "sync": "interval",
        "sync_interval_ms": 10,
    }
    text = (
        MINIMAL + '\n[journal]\ndir = "elsewhere/journal"\nprogress_interval_ms = 1000\n'
        'sync = "always"\nsync_interval_ms = 50\n'
    )
    document = json.loads(load_config(write(tmp_path, text)).core_document())
    assert document["journal"] == {
        "dir": "elsewhere/journal",
        "segment_bytes": 16_777_216,
        "progress_interval_ms": 1000,
        "sync": "always",
        "sync_interval_ms": 50,
    }
    for bad in ('sync = "never"', "sync_interval_ms = 0", "sync_interval_ms = 4611686018427387904"):
        with pytest.raises(ConfigFileError):
            load_config(write(tmp_path, f"{MINIMAL}\n[journal]\n{bad}\n"))
    off = json.loads(
        load_config(write(tmp_path, MINIMAL + "\n[journal]\nenabled = false\n")).core_document()
    )
    assert off["journal"] is None


def test_the_grpc_api_is_off_unless_it_has_a_port(tmp_path: Path) -> None:
    assert json.loads(load_config(write(tmp_path, MINIMAL)).core_document())["grpc_listen"] is None
    text = MINIMAL + '\n[grpc]\nhost = "::1"\nport = 50051\n'
    assert json.loads(load_config(write(tmp_path, text)).core_document())["grpc_listen"] == (
        "[::1]:50051"
    )
    assert "grpc.port" in str(load_error(tmp_path, MINIMAL + "\n[grpc]\nport = 70000\n"))


def test_telemetry_takes_the_file_then_the_otel_environment_then_the_defaults(
    tmp_path: Path,
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_TRACES_SAMPLER_ARG": "0.25",
        "OTEL_SERVICE_NAME": "gw-env",
    }
    unset = load_config(write(tmp_path, MINIMAL)).telemetry
    assert unset.resolve({}) == TelemetrySettings(None, 1.0, "tokengate")
    assert unset.resolve(env) == TelemetrySettings("http://collector:4317", 0.25, "gw-env")
    text = MINIMAL + (
        '[telemetry]\notlp_endpoint = "http://127.0.0.1:4317"\nsample_ratio = 0.5\n'
        'service_name = "gw-file"\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.telemetry.resolve(env) == TelemetrySettings(
        "http://127.0.0.1:4317", 0.5, "gw-file"
    )
    assert json.loads(config.core_document(environ=env))["telemetry"] == {
        "otlp_endpoint": "http://127.0.0.1:4317",
        "sample_ratio": 0.5,
        "service_name": "gw-file",
    }
    # The environment's values are checked as the file's are.
    with pytest.raises(ValueError, match="sample_ratio"):
        unset.resolve({"OTEL_TRACES_SAMPLER_ARG": "1.5"})
    with pytest.raises(ValueError, match="otlp_endpoint"):
        unset.resolve({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"})
    # The traces' own endpoint wins over the shared one; the file's wins over both.
    traces = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}
    assert unset.resolve(traces).otlp_endpoint == "http://traces:4317"
    assert config.telemetry.resolve(traces).otlp_endpoint == "http://127.0.0.1:4317"
    with pytest.raises(ValueError, match="otlp_endpoint"):
        unset.resolve({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "traces:4317"})


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('otlp_endpoint = "https://collector:4317"', "telemetry.otlp_endpoint"),
        ('otlp_endpoint = "http://collector:99999"', "telemetry.otlp_endpoint"),
        ("sample_ratio = 1.5", "telemetry.sample_ratio"),
        ('service_name = ""', "telemetry.service_name"),
        ("exporter = 1", "telemetry.exporter"),
    ],
)
def test_invalid_telemetry_options_are_named(tmp_path: Path, line: str, field: str) -> None:
    error = load_error(tmp_path, f"{MINIMAL}[telemetry]\n{line}\n")
    assert field in str(error)
