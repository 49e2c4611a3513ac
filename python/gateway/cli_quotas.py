"""`gateway tenants|keys set-quota|quota|clear-quota` and `gateway prices`: quota policies and the
price book, over the ledger's repository functions."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from gateway.cli_common import UsageError, format_table, format_time, print_json, with_ledger
from gateway.config import describe_error
from gateway.ledger.apikeys import get_key
from gateway.ledger.db import Connection, now_ms
from gateway.ledger.prices import list_prices, set_price
from gateway.ledger.quotas import clear_quota, get_quota, set_key_quota, set_tenant_quota
from gateway.ledger.tenants import get_tenant_by_name_or_id
from gateway.quotas import Price, QuotaPolicy, format_money, parse_money

__all__ = ["add_quota_commands"]


# The integer limits of `set-quota`: option -> (`QuotaPolicy` field, also the option's dest; help).
_LIMIT_OPTIONS = {
    "--rpm": ("requests_per_minute", "requests started per minute"),
    "--tpm": ("tokens_per_minute", "prompt plus completion tokens per minute"),
    "--concurrency": ("max_concurrent", "requests in flight at once"),
    "--max-sequences": ("max_sequences", "sequences (n x prompts) one request may generate"),
    "--token-budget": ("token_budget", "prompt plus completion tokens per period"),
}
_OPTION_OF_FIELD = {field: option for option, (field, _) in _LIMIT_OPTIONS.items()} | {
    "money_budget_micros": "--money-budget",
    "budget_period": "--period",
    "models": "--models",
    "weight": "--weight",
    "priority": "--priority",
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
        return QuotaPolicy(
            budget_period=args.period, weight=args.weight, priority=args.priority, **fields
        )
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
        ("sequences", _limit(policy.max_sequences, " per request")),
        ("token budget", _limit(policy.token_budget, per)),
        ("money budget", _limit(None if money is None else format_money(money), per)),
        ("models", "any" if policy.models is None else ", ".join(policy.models)),
        ("weight", str(policy.weight)),
        ("priority", f"{policy.priority} at most"),
    ]


def _show_quota(conn: Connection, args: argparse.Namespace) -> int:
    subject_id, label = _subject(conn, args)
    policy = get_quota(conn, subject_id)
    if args.json:
        print_json(None if policy is None else policy.model_dump())
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
        f"price of {version.model} from {format_time(version.effective_at)} UTC, "
        "per million tokens: "
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
        print_json(
            [dataclasses.asdict(v) | {"status": status(v.model, v.effective_at)} for v in versions]
        )
        return 0
    rows = [
        (
            v.model,
            format_time(v.effective_at),
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


def add_quota_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    tenants: argparse._SubParsersAction[argparse.ArgumentParser],
    keys: argparse._SubParsersAction[argparse.ArgumentParser],
    database: argparse.ArgumentParser,
    as_json: argparse.ArgumentParser,
) -> None:
    """`tenants|keys set-quota|quota|clear-quota` and `prices set|list`."""
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
    quota.add_argument(
        "--weight",
        type=int,
        default=1,
        metavar="N",
        help="a tenant's share of a busy model's queue against other tenants' (default 1)",
    )
    quota.add_argument(
        "--priority",
        choices=("interactive", "batch"),
        default="interactive",
        help="the most urgent class its requests may take, and that of those asking for none",
    )
    replaces = "Replaces the whole policy: a limit left out is lifted (unlimited)."
    for group, scope, metavar in ((tenants, "tenant", "NAME_OR_ID"), (keys, "key", "KEY_ID")):
        p = group.add_parser(
            "set-quota",
            parents=[database, quota],
            help=f"set a {scope}'s quota policy (replaces it whole)",
            description=f"Sets the quota policy of a {scope}. {replaces}",
        )
        p.add_argument("subject", metavar=metavar)
        p.set_defaults(handler=with_ledger(_set_quota), scope=scope)
        p = group.add_parser("quota", parents=[database, as_json], help=f"show a {scope}'s quota")
        p.add_argument("subject", metavar=metavar)
        p.set_defaults(handler=with_ledger(_show_quota), scope=scope)
        p = group.add_parser(
            "clear-quota", parents=[database], help=f"remove a {scope}'s quota (unlimited)"
        )
        p.add_argument("subject", metavar=metavar)
        p.set_defaults(handler=with_ledger(_clear_quota), scope=scope)

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
    p.set_defaults(handler=with_ledger(_prices_set))
    p = prices.add_parser("list", parents=[database, as_json], help="list every price version")
    p.set_defaults(handler=with_ledger(_prices_list))
