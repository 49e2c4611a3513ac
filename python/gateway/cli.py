"""The `gateway` command: argument parsing and output formatting over functions that do the work.

Exit status: 0 success, 1 a user error (unknown tenant or key, name taken, database unusable),
2 a usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

import gateway
from gateway.cli_billing import add_billing_commands
from gateway.cli_common import (
    DEFAULT_DB_URL,
    Handler,
    UsageError,
    currency,
    format_table,
    format_time,
    print_json,
    with_ledger,
)
from gateway.cli_quotas import add_quota_commands
from gateway.config import ConfigFileError, format_validation_error, load_config
from gateway.ledger.apikeys import create_key, get_key, list_keys, revoke_key
from gateway.ledger.db import (
    Connection,
    DatabaseError,
    LedgerError,
)
from gateway.ledger.tenants import (
    create_tenant,
    get_tenant_by_name_or_id,
    list_tenants,
    set_tenant_disabled,
)
from gateway.ledger.usage import usage_totals
from gateway.quotas import format_money

__all__ = ["DEFAULT_DB_URL", "UsageError", "build_parser", "format_table", "main"]


def _tenants_create(conn: Connection, args: argparse.Namespace) -> int:
    tenant = create_tenant(conn, args.name)
    if args.json:
        print_json(dataclasses.asdict(tenant))
    else:
        print(f"created tenant {tenant.name} ({tenant.id})")
    return 0


def _tenants_list(conn: Connection, args: argparse.Namespace) -> int:
    tenants = list_tenants(conn)
    if args.json:
        print_json([dataclasses.asdict(t) for t in tenants])
        return 0
    rows = [
        (t.id, t.name, "disabled" if t.disabled else "active", format_time(t.created_at))
        for t in tenants
    ]
    print(format_table(("ID", "NAME", "STATUS", "CREATED (UTC)"), rows))
    return 0


def _tenants_set_disabled(disabled: bool) -> Callable[[Connection, argparse.Namespace], int]:
    def action(conn: Connection, args: argparse.Namespace) -> int:
        tenant = get_tenant_by_name_or_id(conn, args.tenant)
        set_tenant_disabled(conn, tenant.id, disabled)
        print(f"{'disabled' if disabled else 'enabled'} tenant {tenant.name} ({tenant.id})")
        return 0

    return action


def _keys_create(conn: Connection, args: argparse.Namespace) -> int:
    created = create_key(conn, args.tenant, name=args.name)
    record = created.record
    if args.json:
        print_json({"key": created.key, **dataclasses.asdict(record)})
    else:
        print(f"id:      {record.id}")
        print(f"tenant:  {record.tenant_name} ({record.tenant_id})")
        print(f"api_key: {created.key}")
    print("Store the API key now: it is not shown again.", file=sys.stderr)
    return 0


def _keys_list(conn: Connection, args: argparse.Namespace) -> int:
    tenant_id = None
    if args.tenant is not None:
        tenant_id = get_tenant_by_name_or_id(conn, args.tenant).id
    keys = list_keys(conn, tenant_id)
    if args.json:
        print_json([dataclasses.asdict(k) for k in keys])
        return 0
    rows = [
        (
            k.id,
            k.tenant_name,
            k.prefix + "…",
            k.name or "-",
            format_time(k.created_at),
            format_time(k.revoked_at),
        )
        for k in keys
    ]
    print(format_table(("ID", "TENANT", "PREFIX", "NAME", "CREATED (UTC)", "REVOKED (UTC)"), rows))
    return 0


def _keys_revoke(conn: Connection, args: argparse.Namespace) -> int:
    before = get_key(conn, args.key_id)
    if before.revoked:
        print(f"key {before.id} was already revoked at {format_time(before.revoked_at)} UTC")
        return 0
    key = revoke_key(conn, args.key_id)
    print(f"revoked key {key.id} of tenant {key.tenant_name}")
    return 0


def _usage(conn: Connection, args: argparse.Namespace) -> int:
    tenant_id = None
    if args.tenant is not None:
        tenant_id = get_tenant_by_name_or_id(conn, args.tenant).id
    totals = usage_totals(conn, tenant_id, by_status=args.by_status)
    if args.json:
        print_json(
            [
                {k: v for k, v in dataclasses.asdict(t).items() if k != "status" or args.by_status}
                for t in totals
            ]
        )
        return 0
    headers = ["TENANT", "MODEL", *(["STATUS"] if args.by_status else [])]
    # Disjoint classes: PROMPT is the prompt tokens not served from cache. COST sums the priced
    # requests; UNPRICED counts those of a model that had no price (not in COST).
    cost = f"COST ({currency(args)})"
    headers += ["REQUESTS", "PROMPT", "CACHED", "COMPLETION", cost, "UNPRICED"]
    rows = [
        (
            t.tenant_name or t.tenant_id,
            t.model,
            *([t.status] if args.by_status else []),
            t.requests,
            t.prompt_tokens,
            t.cached_tokens,
            t.completion_tokens,
            format_money(t.cost_micros),
            t.unpriced_requests,
        )
        for t in totals
    ]
    print(format_table(headers, rows))
    return 0


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _serve(args: argparse.Namespace) -> int:
    from gateway import serve

    config = load_config(args.config)
    _configure_logging(args.log_level)
    return serve.run(config, config_path=Path(args.config))


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return value == "on"


def _sim(args: argparse.Namespace) -> int:
    from gateway import sim

    fields = {name: getattr(args, name) for name in sim.SimConfig.model_fields}
    try:
        config = sim.SimConfig(**fields)
    except ValidationError as exc:
        raise UsageError("; ".join(format_validation_error(exc))) from None
    _configure_logging(args.log_level)
    return sim.run(config)


def _journal_dump(args: argparse.Namespace) -> int:
    from gateway import _core

    directory: str | None = args.dir
    if args.config is not None:
        directory = load_config(args.config).journal_dir()
        if directory is None:
            raise UsageError(f"{args.config}: the usage journal is off")
    if directory is None:
        raise UsageError("give the journal's directory, or --config")
    if not Path(directory).is_dir():
        print(f"error: no journal directory at {directory}", file=sys.stderr)
        return 1
    try:
        lines, torn, unreadable = _core.journal_records(directory)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    if torn:
        print(f"{torn} segment(s) end in a record cut short (a crash mid-write)", file=sys.stderr)
    if unreadable:
        print(f"{unreadable} record(s) this version cannot read", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gateway import demo

    _configure_logging(args.log_level)
    return demo.run(args.data_dir, args.port)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each leaf parser sets `handler`."""
    parser = argparse.ArgumentParser(
        prog="gateway", description="tokengate: metered OpenAI-compatible gateway for vLLM."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {gateway.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    database = argparse.ArgumentParser(add_help=False)
    where = database.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, metavar="FILE", help="use this config's storage")
    where.add_argument(
        "--db", metavar="URL", help=f"ledger database URL (default {DEFAULT_DB_URL})"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    p = commands.add_parser("serve", parents=[logs], help="run the gateway")
    p.add_argument("--config", type=Path, metavar="FILE", required=True)
    p.set_defaults(handler=_serve)

    p = commands.add_parser("sim", parents=[logs], help="run a simulated vLLM worker")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--model", default="sim-model")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--ttft-ms", type=int, default=0)
    p.add_argument("--itl-ms", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-output-tokens", type=int, default=64)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--die-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="require this key on /v1 routes, as vLLM does")
    p.add_argument(
        "--usage-reporting",
        dest="report_usage",
        type=_on_off,
        default=True,
        metavar="{on,off}",
        help="off: report no usage, as some OpenAI-compatible servers do",
    )
    p.set_defaults(handler=_sim)

    p = commands.add_parser(
        "demo", parents=[logs], help="gateway + two simulated workers + a demo key"
    )
    p.add_argument("--data-dir", type=Path, default=Path("data"), metavar="DIR")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(handler=_demo)

    journal = commands.add_parser("journal", help="read a usage journal").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = journal.add_parser(
        "dump", help="print its records as JSON lines, oldest first (the gateway may be running)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("dir", nargs="?", metavar="DIR", help="the journal's directory")
    where.add_argument("--config", type=Path, metavar="FILE", help="the journal of this config")
    p.set_defaults(handler=_journal_dump)

    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = tenants.add_parser("create", parents=[database, as_json], help="create a tenant")
    p.add_argument("name")
    p.set_defaults(handler=with_ledger(_tenants_create))
    p = tenants.add_parser("list", parents=[database, as_json], help="list tenants")
    p.set_defaults(handler=with_ledger(_tenants_list))
    for action, disabled in (("disable", True), ("enable", False)):
        p = tenants.add_parser(
            action, parents=[database], help=f"{action} a tenant and every one of its keys"
        )
        p.add_argument("tenant", metavar="NAME_OR_ID")
        p.set_defaults(handler=with_ledger(_tenants_set_disabled(disabled)))

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = keys.add_parser("create", parents=[database, as_json], help="issue a key (shown once)")
    p.add_argument("--tenant", required=True, metavar="NAME_OR_ID")
    p.add_argument("--name", metavar="LABEL", help="a label to recognise the key by")
    p.set_defaults(handler=with_ledger(_keys_create))
    p = keys.add_parser("list", parents=[database, as_json], help="list keys")
    p.add_argument("--tenant", metavar="NAME_OR_ID")
    p.set_defaults(handler=with_ledger(_keys_list))
    p = keys.add_parser("revoke", parents=[database], help="revoke a key")
    p.add_argument("key_id", metavar="KEY_ID")
    p.set_defaults(handler=with_ledger(_keys_revoke))

    add_quota_commands(commands, tenants, keys, database, as_json)

    p = commands.add_parser(
        "usage", parents=[database, as_json], help="token and cost totals per tenant and model"
    )
    p.add_argument("--tenant", metavar="NAME_OR_ID")
    p.add_argument("--by-status", action="store_true", help="one row per request status too")
    p.set_defaults(handler=with_ledger(_usage))

    add_billing_commands(commands, database)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (argparse errors and --help included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigFileError as exc:
        print(exc, file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DatabaseError as exc:
        print(f"error: database: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
