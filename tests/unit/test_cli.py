"""The `gateway` command in-process: tenants, keys and usage against a temporary ledger."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gateway.cli import format_table
from gateway.keys import hash_key
from gateway.ledger.apikeys import active_key_snapshot
from gateway.ledger.db import open_ledger
from gateway.ledger.tenants import get_tenant_by_name_or_id
from gateway.ledger.usage import UsageEvent, insert_usage_events
from tests.support.cli_run import run
from tests.support.events import usage_event


def keys_create(capsys: pytest.CaptureFixture[str], db: list[str], tenant: str) -> dict[str, str]:
    """`gateway keys create --tenant TENANT --json`, in process: the new key's record."""
    code, out, _ = run(capsys, "keys", "create", "--tenant", tenant, "--json", *db)
    assert code == 0
    created: dict[str, str] = json.loads(out)
    return created


def test_tenants_create_and_list(capsys: pytest.CaptureFixture[str], db: list[str]) -> None:
    code, out, _ = run(capsys, "tenants", "create", "acme", *db)
    assert code == 0
    assert re.fullmatch(r"created tenant acme \(ten_[0-9a-f]{12}\)\n", out)
    assert run(capsys, "tenants", "create", "0-first", *db)[0] == 0

    code, out, _ = run(capsys, "tenants", "list", *db)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "CREATED", "(UTC)"]
    assert [line.split()[1:3] for line in lines[1:]] == [["0-first", "active"], ["acme", "active"]]

    code, out, _ = run(capsys, "tenants", "list", "--json", *db)
    assert [t["name"] for t in json.loads(out)] == ["0-first", "acme"]


def test_duplicate_and_invalid_tenants_exit_1(
    capsys: pytest.CaptureFixture[str], db: list[str]
) -> None:
    run(capsys, "tenants", "create", "acme", *db)
    code, out, err = run(capsys, "tenants", "create", "acme", *db)
    assert (code, out) == (1, "")
    assert "already exists" in err
    code, _, err = run(capsys, "tenants", "create", "bad name", *db)
    assert code == 1
    assert "invalid tenant name" in err


def test_keys_create_prints_the_key_once(capsys: pytest.CaptureFixture[str], db: list[str]) -> None:
    run(capsys, "tenants", "create", "acme", *db)
    code, out, err = run(capsys, "keys", "create", "--tenant", "acme", "--name", "ci", *db)
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    key = fields["api_key"].strip()
    assert re.fullmatch(r"tg-[A-Za-z0-9_-]{43}", key)
    assert re.fullmatch(r"key_[0-9a-f]{12}", fields["id"].strip())
    assert "not shown again" in err

    code, out, _ = run(capsys, "keys", "list", *db)
    assert code == 0
    assert key not in out
    assert key[:10] in out
    assert fields["id"].strip() in out


def test_keys_list_filters_by_tenant(capsys: pytest.CaptureFixture[str], db: list[str]) -> None:
    run(capsys, "tenants", "create", "acme", *db)
    run(capsys, "tenants", "create", "beta", *db)
    acme_key = keys_create(capsys, db, "acme")
    beta_key = keys_create(capsys, db, "beta")
    code, out, _ = run(capsys, "keys", "list", "--tenant", "beta", "--json", *db)
    assert code == 0
    assert [k["id"] for k in json.loads(out)] == [beta_key["id"]]
    assert "key" not in json.loads(out)[0]
    code, out, _ = run(capsys, "keys", "list", "--tenant", acme_key["tenant_id"], *db)
    assert acme_key["id"] in out
    assert beta_key["id"] not in out


def test_keys_for_unknown_tenants_exit_1(capsys: pytest.CaptureFixture[str], db: list[str]) -> None:
    for argv in (("keys", "create", "--tenant", "nobody"), ("keys", "list", "--tenant", "nobody")):
        code, out, err = run(capsys, *argv, *db)
        assert (code, out) == (1, "")
        assert err == "error: no tenant with name or id 'nobody'\n"


def test_keys_revoke(capsys: pytest.CaptureFixture[str], db: list[str], tmp_path: Path) -> None:
    run(capsys, "tenants", "create", "acme", *db)
    kept = keys_create(capsys, db, "acme")
    gone = keys_create(capsys, db, "acme")
    code, out, _ = run(capsys, "keys", "revoke", gone["id"], *db)
    assert (code, out) == (0, f"revoked key {gone['id']} of tenant acme\n")
    code, out, _ = run(capsys, "keys", "revoke", gone["id"], *db)
    assert code == 0
    assert "already revoked" in out
    code, _, err = run(capsys, "keys", "revoke", "key_000000000000", *db)
    assert code == 1
    assert "no API key" in err
    with open_ledger(db[1]) as conn:
        hashes = [entry["hash"] for entry in active_key_snapshot(conn)["keys"]]
    assert hashes == [hash_key(kept["key"])]


def test_tenants_disable_removes_their_keys_from_the_snapshot(
    capsys: pytest.CaptureFixture[str], db: list[str]
) -> None:
    run(capsys, "tenants", "create", "acme", *db)
    keys_create(capsys, db, "acme")
    assert run(capsys, "tenants", "disable", "acme", *db)[0] == 0
    with open_ledger(db[1]) as conn:
        assert active_key_snapshot(conn) == {"keys": []}
    _, out, _ = run(capsys, "tenants", "list", *db)
    assert "disabled" in out
    assert run(capsys, "tenants", "enable", "acme", *db)[0] == 0
    with open_ledger(db[1]) as conn:
        assert len(active_key_snapshot(conn)["keys"]) == 1


def event(tenant_id: str, model: str, status: str, prompt: int, completion: int) -> UsageEvent:
    """A non-streaming completion's usage with these counts, at the epoch."""
    return usage_event(
        event_id=f"{tenant_id}-{model}-{status}-{prompt}-{completion}",
        request_id="r",
        tenant_id=tenant_id,
        model=model,
        worker=None,
        endpoint="completions",
        stream=False,
        status=status,
        prompt_tokens=prompt,
        cached_tokens=0,
        completion_tokens=completion,
        started_at_ms=0,
        finished_at_ms=1,
    )


@pytest.fixture
def usage_db(capsys: pytest.CaptureFixture[str], db: list[str]) -> list[str]:
    run(capsys, "tenants", "create", "acme", *db)
    run(capsys, "tenants", "create", "beta", *db)
    with open_ledger(db[1]) as conn:
        acme = get_tenant_by_name_or_id(conn, "acme").id
        beta = get_tenant_by_name_or_id(conn, "beta").id
        insert_usage_events(
            conn,
            [
                event(acme, "sim-model", "completed", 1000, 20000),
                event(acme, "sim-model", "cancelled", 7, 3),
                event(beta, "big-model", "completed", 5, 6),
            ],
        )
    return db


def test_usage_table_is_aligned(capsys: pytest.CaptureFixture[str], usage_db: list[str]) -> None:
    code, out, _ = run(capsys, "usage", *usage_db)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        *("TENANT", "MODEL", "REQUESTS", "PROMPT", "CACHED", "COMPLETION"),
        *("COST", "(USD)", "UNPRICED"),
    ]
    assert [line.split() for line in lines[1:]] == [
        ["acme", "sim-model", "2", "1007", "0", "20003", "0", "2"],
        ["beta", "big-model", "1", "5", "0", "6", "0", "1"],
    ]
    # Numbers are right-aligned under their headers: every line ends at the same column.
    assert len({len(line) for line in lines}) == 1


def test_usage_json_tenant_filter_and_status(
    capsys: pytest.CaptureFixture[str], usage_db: list[str]
) -> None:
    code, out, _ = run(capsys, "usage", "--tenant", "beta", "--json", *usage_db)
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 1
    assert rows[0]["tenant_name"] == "beta"
    assert rows[0]["model"] == "big-model"
    assert (rows[0]["requests"], rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        1,
        5,
        6,
    )
    assert "status" not in rows[0]

    code, out, _ = run(capsys, "usage", "--tenant", "acme", "--by-status", "--json", *usage_db)
    by_status = {row["status"]: row["requests"] for row in json.loads(out)}
    assert by_status == {"completed": 1, "cancelled": 1}

    code, _, err = run(capsys, "usage", "--tenant", "nobody", *usage_db)
    assert code == 1
    assert "nobody" in err


def test_config_file_selects_the_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[workers]]\nurl = "http://127.0.0.1:8001"\n'
        f'[storage]\nurl = "sqlite:///{tmp_path / "from-config.db"}"\n'
    )
    assert run(capsys, "tenants", "create", "acme", "--config", str(config))[0] == 0
    assert (tmp_path / "from-config.db").exists()


def test_bad_config_exits_2_with_the_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[workers]]\nurl = "http://127.0.0.1:8001"\n[routing]\nmax_attempts = 0\n')
    code, out, err = run(capsys, "tenants", "list", "--config", str(config))
    assert (code, out) == (2, "")
    assert err == (f"{config}: routing.max_attempts: Input should be greater than or equal to 1\n")
    code, _, err = run(capsys, "serve", "--config", str(tmp_path / "missing.toml"))
    assert code == 2
    assert "cannot read" in err


def test_bad_db_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "tenants", "list", "--db", "mysql://tg:secret@localhost/x")
    assert code == 2
    assert "unsupported database URL" in err
    assert "secret" not in err
    code, _, err = run(capsys, "tenants", "list", "--db", "postgresql://localhost/")
    assert code == 2
    assert "must name a database" in err


def test_default_database_is_data_gateway_db(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "tenants", "create", "acme")[0] == 0
    assert (tmp_path / "data" / "gateway.db").exists()


def test_invalid_sim_settings_exit_2_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sim", "--error-rate", "1.5", "--host", "localhost")
    assert code == 2
    assert "error_rate: Input should be less than or equal to 1" in err
    assert "host: 'localhost' is not an IP address" in err


def test_argparse_errors_and_help_return_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--help")[0] == 0
    assert run(capsys)[0] == 2
    assert run(capsys, "keys", "create")[0] == 2
    code, _, err = run(capsys, "tenants", "list", "--db", "sqlite:///a.db", "--config", "x")
    assert code == 2
    assert "not allowed with" in err


def test_format_table_right_aligns_numbers() -> None:
    table = format_table(("NAME", "N"), [("a", 1), ("bbb", 100)])
    assert table.splitlines() == ["NAME    N", "a       1", "bbb   100"]


def test_journal_dump_reads_a_directory_or_a_configs_and_says_what_it_could_not(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    code, _, err = run(capsys, "journal", "dump", str(journal))
    assert (code, "no journal directory" in err) == (1, True)
    journal.mkdir()
    assert run(capsys, "journal", "dump", str(journal)) == (0, "", "")
    config = tmp_path / "gateway.toml"
    workers = '[[workers]]\nurl = "http://127.0.0.1:8001"\n'
    config.write_text(f'{workers}[journal]\ndir = "{journal}"\n', encoding="utf-8")
    assert run(capsys, "journal", "dump", "--config", str(config)) == (0, "", "")
    # A segment whose only frame was cut short by a crash: no record, and a word on stderr.
    frame_header = (40).to_bytes(4, "little") + (7).to_bytes(4, "little")
    (journal / "journal-0000000003.seg").write_bytes(b"TGJRNL2\n" + frame_header + b"\x03\x00")
    code, out, err = run(capsys, "journal", "dump", str(journal))
    assert (code, out) == (0, "")
    assert "1 segment(s) end in a record cut short" in err
    config.write_text(f"{workers}[journal]\nenabled = false\n", encoding="utf-8")
    code, _, err = run(capsys, "journal", "dump", "--config", str(config))
    assert (code, "the usage journal is off" in err) == (2, True)
