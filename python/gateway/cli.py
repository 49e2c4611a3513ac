"""The `gateway` command: argument parsing and output formatting over functions that do the work.

Exit status: 0 success, 1 a user error (unknown tenant or key, name taken, database unusable),
2 a usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import gateway
from gateway.config import ConfigFileError, describe_error, format_validation_error, load_config
from gateway.ledger.apikeys import create_key, get_key, list_keys, revoke_key
from gateway.ledger.db import (
    Connection,
    DatabaseError,
    LedgerError,
    now_ms,
    open_ledger,
    parse_url,
)
from gateway.ledger.prices import list_prices, set_price
from gateway.ledger.quotas import clear_quota, get_quota, set_key_quota, set_tenant_quota
from gateway.ledger.tenants import (
    create_tenant,
    get_tenant_by_name_or_id,
    list_tenants,
    set_tenant_disabled,
)
from gateway.ledger.usage import usage_totals
from gateway.quotas import Price, QuotaPolicy, format_money, parse_money

__all__ = ["DEFAULT_DB_URL", "UsageError", "build_parser", "main"]

DEFAULT_DB_URL = "sqlite:///data/gateway.db"

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command line that cannot be acted on (exit status 2)."""


def _database_url(args: argparse.Namespace) -> str:
    if args.config is not None:
        return load_config(args.config).storage.url
    if args.db is not None:
        try:
            parse_url(args.db)
        except ValueError as exc:
            raise UsageError(f"--db: {exc}") from None
        return str(args.db)
    return DEFAULT_DB_URL


def _ledger(args: argparse.Namespace) -> Any:
    return open_ledger(_database_url(args))


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table; integer columns are right-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(row[i], int) for row in rows) for i in range(len(widths))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _with_ledger(action: Callable[[Connection, argparse.Namespace], int]) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        with _ledger(args) as conn:
            return action(conn, args)

    return handler


def _tenants_create(conn: Connection, args: argparse.Namespace) -> int:
    tenant = create_tenant(conn, args.name)
    if args.json:
        _print_json(dataclasses.asdict(tenant))
    else:
        print(f"created tenant {tenant.name} ({tenant.id})")
    return 0


def _tenants_list(conn: Connection, args: argparse.Namespace) -> int:
    tenants = list_tenants(conn)
    if args.json:
        _print_json([dataclasses.asdict(t) for t in tenants])
        return 0
    rows = [
        (t.id, t.name, "disabled" if t.disabled else "active", _time(t.created_at)) for t in tenants
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
        _print_json({"key": created.key, **dataclasses.asdict(record)})
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
        _print_json([dataclasses.asdict(k) for k in keys])
        return 0
    rows = [
        (
            k.id,
            k.tenant_name,
            k.prefix + "…",
            k.name or "-",
            _time(k.created_at),
            _time(k.revoked_at),
        )
        for k in keys
    ]
    print(format_table(("ID", "TENANT", "PREFIX", "NAME", "CREATED (UTC)", "REVOKED (UTC)"), rows))
    return 0


def _keys_revoke(conn: Connection, args: argparse.Namespace) -> int:
    before = get_key(conn, args.key_id)
    if before.revoked:
        print(f"key {before.id} was already revoked at {_time(before.revoked_at)} UTC")
        return 0
    key = revoke_key(conn, args.key_id)
    print(f"revoked key {key.id} of tenant {key.tenant_name}")
    return 0


# The integer limits of `set-quota`: option -> (`QuotaPolicy` field, also the option's dest; help).
_LIMIT_OPTIONS = {
    "--rpm": ("requests_per_minute", "requests started per minute"),
    "--tpm": ("tokens_per_minute", "prompt plus completion tokens per minute"),
    "--concurrency": ("max_concurrent", "requests in flight at once"),
    "--token-budget": ("token_budget", "prompt plus completion tokens per period"),
}
_OPTION_OF_FIELD = {field: option for option, (field, _) in _LIMIT_OPTIONS.items()} | {
    "money_budget_micros": "--money-budget",
    "budget_period": "--period",
    "models": "--models",
}


def _money(option: str, amount: str) -> int:
    try:
        return parse_money(amount)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _quota_policy(args: argparse.Namespace) -> QuotaPolicy:
    """The policy the `set-quota` options describe; a `UsageError` naming the option if invalid."""
    fields: dict[str, Any] = {field: getattr(args, field) for field, _ in _LIMIT_OPTIONS.values()}
    if args.money_budget is not None:
        fields["money_budget_micros"] = _money("--money-budget", args.money_budget)
    if args.models is not None:
        fields["models"] = args.models.split(",")
    try:
        return QuotaPolicy(budget_period=args.period, **fields)
    except ValidationError as exc:
        problems = []
        for item in exc.errors(include_url=False):
            field, message = describe_error(item)
            problems.append(f"{_OPTION_OF_FIELD.get(field.split('[')[0], field)}: {message}")
        raise UsageError("; ".join(problems)) from None


def _subject(conn: Connection, args: argparse.Namespace) -> tuple[str, str]:
    """The id of the tenant or key a quota command names, and how to call it in messages."""
    if args.scope == "tenant":
        tenant = get_tenant_by_name_or_id(conn, args.subject)
        return tenant.id, f"tenant {tenant.name} ({tenant.id})"
    key = get_key(conn, args.subject)
    return key.id, f"key {key.id} of tenant {key.tenant_name}"


def _set_quota(conn: Connection, args: argparse.Namespace) -> int:
    policy = _quota_policy(args)
    subject_id, label = _subject(conn, args)
    if args.scope == "tenant":
        set_tenant_quota(conn, subject_id, policy)
    else:
        set_key_quota(conn, subject_id, policy)
    print(f"set the quota of {label}")
    return 0


def _limit(value: object, suffix: str = "") -> str:
    return "unlimited" if value is None else f"{value}{suffix}"


def _policy_lines(policy: QuotaPolicy) -> list[tuple[str, str]]:
    per = f" per {policy.budget_period}"
    money = policy.money_budget_micros
    return [
        ("requests/min", _limit(policy.requests_per_minute)),
        ("tokens/min", _limit(policy.tokens_per_minute)),
        ("concurrency", _limit(policy.max_concurrent)),
        ("token budget", _limit(policy.token_budget, per)),
        ("money budget", _limit(None if money is None else format_money(money), per)),
        ("models", "any" if policy.models is None else ", ".join(policy.models)),
    ]


def _show_quota(conn: Connection, args: argparse.Namespace) -> int:
    subject_id, label = _subject(conn, args)
    policy = get_quota(conn, subject_id)
    if args.json:
        _print_json(None if policy is None else policy.model_dump())
    elif policy is None:
        print(f"{label} has no quota: it is unlimited")
    else:
        print(f"quota of {label}")
        for name, value in _policy_lines(policy):
            print(f"  {name:<13} {value}")
    return 0


def _clear_quota(conn: Connection, args: argparse.Namespace) -> int:
    subject_id, label = _subject(conn, args)
    if clear_quota(conn, subject_id):
        print(f"cleared the quota of {label}: it is unlimited")
    else:
        print(f"{label} had no quota")
    return 0


def _instant(text: str) -> int:
    """An ISO 8601 time (UTC unless it says otherwise) as unix milliseconds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--effective-at: {text!r} is not an ISO 8601 time such as 2026-01-01T00:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


def _prices_set(conn: Connection, args: argparse.Namespace) -> int:
    price = Price(
        prompt_per_mtok=_money("--prompt", args.prompt),
        cached_per_mtok=_money("--cached", args.cached),
        completion_per_mtok=_money("--completion", args.completion),
    )
    effective_at = None if args.effective_at is None else _instant(args.effective_at)
    version = set_price(conn, args.model, price, effective_at)
    print(
        f"price of {version.model} from {_time(version.effective_at)} UTC, per million tokens: "
        f"prompt {format_money(price.prompt_per_mtok)}, "
        f"cached {format_money(price.cached_per_mtok)}, "
        f"completion {format_money(price.completion_per_mtok)}"
    )
    return 0


def _prices_list(conn: Connection, args: argparse.Namespace) -> int:
    versions = list_prices(conn)
    now = now_ms()
    current: dict[str, int] = {}
    for version in versions:  # by model, then effective time
        if version.effective_at <= now:
            current[version.model] = version.effective_at

    def status(model: str, effective_at: int) -> str:
        if effective_at > now:
            return "scheduled"
        return "current" if current[model] == effective_at else "superseded"

    if args.json:
        _print_json(
            [dataclasses.asdict(v) | {"status": status(v.model, v.effective_at)} for v in versions]
        )
        return 0
    rows = [
        (
            v.model,
            _time(v.effective_at),
            format_money(v.prompt_per_mtok),
            format_money(v.cached_per_mtok),
            format_money(v.completion_per_mtok),
            status(v.model, v.effective_at),
        )
        for v in versions
    ]
    headers = (
        "MODEL",
        "EFFECTIVE (UTC)",
        "PROMPT/MTOK",
        "CACHED/MTOK",
        "COMPLETION/MTOK",
        "STATUS",
    )
    print(format_table(headers, rows))
    return 0


def _usage(conn: Connection, args: argparse.Namespace) -> int:
    tenant_id = None
    if args.tenant is not None:
        tenant_id = get_tenant_by_name_or_id(conn, args.tenant).id
    totals = usage_totals(conn, tenant_id, by_status=args.by_status)
    if args.json:
        _print_json(
            [
                {k: v for k, v in dataclasses.asdict(t).items() if k != "status" or args.by_status}
                for t in totals
            ]
        )
        return 0
    headers = ["TENANT", "MODEL", *(["STATUS"] if args.by_status else [])]
    headers += ["REQUESTS", "PROMPT", "CACHED", "COMPLETION"]
    rows = [
        (
            t.tenant_name or t.tenant_id,
            t.model,
            *([t.status] if args.by_status else []),
            t.requests,
            t.prompt_tokens,
            t.cached_tokens,
            t.completion_tokens,
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
    return serve.run(config)


def _sim(args: argparse.Namespace) -> int:
    from gateway import sim

    fields = {name: getattr(args, name) for name in sim.SimConfig.model_fields}
    try:
        config = sim.SimConfig(**fields)
    except ValidationError as exc:
        raise UsageError("; ".join(format_validation_error(exc))) from None
    _configure_logging(args.log_level)
    return sim.run(config)


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
    p.set_defaults(handler=_sim)

    p = commands.add_parser(
        "demo", parents=[logs], help="gateway + two simulated workers + a demo key"
    )
    p.add_argument("--data-dir", type=Path, default=Path("data"), metavar="DIR")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(handler=_demo)

    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = tenants.add_parser("create", parents=[database, as_json], help="create a tenant")
    p.add_argument("name")
    p.set_defaults(handler=_with_ledger(_tenants_create))
    p = tenants.add_parser("list", parents=[database, as_json], help="list tenants")
    p.set_defaults(handler=_with_ledger(_tenants_list))
    for action, disabled in (("disable", True), ("enable", False)):
        p = tenants.add_parser(
            action, parents=[database], help=f"{action} a tenant and every one of its keys"
        )
        p.add_argument("tenant", metavar="NAME_OR_ID")
        p.set_defaults(handler=_with_ledger(_tenants_set_disabled(disabled)))

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = keys.add_parser("create", parents=[database, as_json], help="issue a key (shown once)")
    p.add_argument("--tenant", required=True, metavar="NAME_OR_ID")
    p.add_argument("--name", metavar="LABEL", help="a label to recognise the key by")
    p.set_defaults(handler=_with_ledger(_keys_create))
    p = keys.add_parser("list", parents=[database, as_json], help="list keys")
    p.add_argument("--tenant", metavar="NAME_OR_ID")
    p.set_defaults(handler=_with_ledger(_keys_list))
    p = keys.add_parser("revoke", parents=[database], help="revoke a key")
    p.add_argument("key_id", metavar="KEY_ID")
    p.set_defaults(handler=_with_ledger(_keys_revoke))

    quota = argparse.ArgumentParser(add_help=False)
    for option, (field, meaning) in _LIMIT_OPTIONS.items():
        quota.add_argument(option, dest=field, type=int, metavar="N", help=meaning)
    quota.add_argument(
        "--money-budget", metavar="AMOUNT", help="spend per period in currency units, e.g. 12.50"
    )
    quota.add_argument(
        "--period", choices=("day", "month"), default="month", help="the budgets' UTC period"
    )
    quota.add_argument("--models", metavar="A,B,...", help="the only models that may be used")
    replaces = "Replaces the whole policy: a limit left out is lifted (unlimited)."
    for group, scope, metavar in ((tenants, "tenant", "NAME_OR_ID"), (keys, "key", "KEY_ID")):
        p = group.add_parser(
            "set-quota",
            parents=[database, quota],
            help=f"set a {scope}'s quota policy (replaces it whole)",
            description=f"Sets the quota policy of a {scope}. {replaces}",
        )
        p.add_argument("subject", metavar=metavar)
        p.set_defaults(handler=_with_ledger(_set_quota), scope=scope)
        p = group.add_parser("quota", parents=[database, as_json], help=f"show a {scope}'s quota")
        p.add_argument("subject", metavar=metavar)
        p.set_defaults(handler=_with_ledger(_show_quota), scope=scope)
        p = group.add_parser(
            "clear-quota", parents=[database], help=f"remove a {scope}'s quota (unlimited)"
        )
        p.add_argument("subject", metavar=metavar)
        p.set_defaults(handler=_with_ledger(_clear_quota), scope=scope)

    prices = commands.add_parser("prices", help="manage the price book").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    p = prices.add_parser(
        "set",
        parents=[database],
        help="add a model's prices (a new version)",
        description="Adds a version of a model's prices, in currency units per million tokens "
        "(at most 6 decimals), in effect from --effective-at (default now) until the next "
        "version's.",
    )
    p.add_argument("model")
    for kind in ("prompt", "cached", "completion"):
        p.add_argument(
            f"--{kind}", required=True, metavar="AMOUNT", help=f"per million {kind} tokens"
        )
    p.add_argument(
        "--effective-at", metavar="ISO8601", help="e.g. 2026-01-01T00:00:00Z (UTC if no offset)"
    )
    p.set_defaults(handler=_with_ledger(_prices_set))
    p = prices.add_parser("list", parents=[database, as_json], help="list every price version")
    p.set_defaults(handler=_with_ledger(_prices_list))

    p = commands.add_parser(
        "usage", parents=[database, as_json], help="token totals per tenant and model"
    )
    p.add_argument("--tenant", metavar="NAME_OR_ID")
    p.add_argument("--by-status", action="store_true", help="one row per request status too")
    p.set_defaults(handler=_with_ledger(_usage))
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
