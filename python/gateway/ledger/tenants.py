"""Tenants: the parties that hold API keys and are billed for usage.

Names are unique, short and shaped unlike ids, so `get_tenant_by_name_or_id` is never ambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.keys import is_tenant_id, new_tenant_id
from gateway.ledger.changes import record_change
from gateway.ledger.db import (
    ConflictError,
    Connection,
    IntegrityError,
    LedgerError,
    NotFoundError,
    Row,
    execute,
    now_ms,
    query,
    transaction,
)

__all__ = [
    "Tenant",
    "create_tenant",
    "get_tenant_by_name_or_id",
    "list_tenants",
    "set_tenant_disabled",
    "validate_tenant_name",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_COLUMNS = "id, name, created_at, disabled"


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant row. `created_at` is unix milliseconds."""

    id: str
    name: str
    created_at: int
    disabled: bool


def _tenant(row: Row) -> Tenant:
    return Tenant(id=row[0], name=row[1], created_at=row[2], disabled=bool(row[3]))


def validate_tenant_name(name: str) -> str:
    """Accepts 1-64 letters, digits, `.`, `_`, `-`, starting alphanumeric, not shaped like an id."""
    if not _NAME.fullmatch(name):
        raise LedgerError(
            f"invalid tenant name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if is_tenant_id(name):
        raise LedgerError(f"invalid tenant name {name!r}: it looks like a tenant id")
    return name


def create_tenant(conn: Connection, name: str) -> Tenant:
    """Creates an active tenant; `ConflictError` if the name is taken."""
    tenant = Tenant(
        id=new_tenant_id(), name=validate_tenant_name(name), created_at=now_ms(), disabled=False
    )
    try:
        with transaction(conn):
            execute(
                conn,
                f"INSERT INTO tenants ({_COLUMNS}) VALUES (?, ?, ?, ?)",  # noqa: S608
                (tenant.id, tenant.name, tenant.created_at, tenant.disabled),
            )
            record_change(conn, "tenant.created", tenant.id, tenant.id, {"name": tenant.name})
    except IntegrityError as exc:
        raise ConflictError(f"a tenant named {name!r} already exists") from exc
    return tenant


def list_tenants(conn: Connection) -> list[Tenant]:
    """Every tenant, by name."""
    rows = query(conn, f"SELECT {_COLUMNS} FROM tenants ORDER BY name")  # noqa: S608
    return [_tenant(row) for row in rows]


def get_tenant_by_name_or_id(conn: Connection, name_or_id: str) -> Tenant:
    """The tenant with this id or name; `NotFoundError` if there is none."""
    rows = query(
        conn,
        f"SELECT {_COLUMNS} FROM tenants WHERE id = ? OR name = ?",  # noqa: S608
        (name_or_id, name_or_id),
    )
    if not rows:
        raise NotFoundError(f"no tenant with name or id {name_or_id!r}")
    return _tenant(rows[0])


def set_tenant_disabled(conn: Connection, tenant_id: str, disabled: bool) -> Tenant:
    """Disables (or re-enables) a tenant: its keys leave (or rejoin) the core's key snapshot."""
    with transaction(conn):
        if not execute(conn, "UPDATE tenants SET disabled = ? WHERE id = ?", (disabled, tenant_id)):
            raise NotFoundError(f"no tenant with id {tenant_id!r}")
        record_change(
            conn, "tenant.disabled" if disabled else "tenant.enabled", tenant_id, tenant_id
        )
    return get_tenant_by_name_or_id(conn, tenant_id)
