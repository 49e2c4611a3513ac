"""Gateway replicas in front of one simulator, sharing one ledger and, optionally, a real
`redis-server`: what the quota tests start. The tenant's quota policy is in the ledger before the
first replica starts, so no request ever runs without it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.ledger.db import open_ledger, query
from gateway.ledger.quotas import set_tenant_quota
from gateway.quotas import QuotaPolicy
from tests.support import procs
from tests.support.services.redis import RedisServer

__all__ = ["MODEL", "Fleet", "completion", "start_fleet"]

MODEL = "sim-model"


@dataclass
class Fleet:
    """Gateway replicas in front of one simulator, sharing one ledger (and Redis, if given)."""

    gateways: list[procs.Process]
    sim: procs.Process
    db: Path
    key: str
    key_id: str
    tenant: str = "acme"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db}"

    def set_quota(self, **limits: object) -> None:
        with open_ledger(self.db_url) as conn:
            set_tenant_quota(conn, self.tenant, QuotaPolicy.model_validate(limits))

    def url(self, replica: int, path: str = "/v1/completions") -> str:
        return self.gateways[replica % len(self.gateways)].url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def tenant_id(self) -> str:
        with open_ledger(self.db_url) as conn:
            rows = query(conn, "SELECT id FROM tenants WHERE name = ?", (self.tenant,))
        return str(rows[0][0])

    def spent(self) -> int:
        """Prompt, cached and completion tokens of every usage event in the ledger."""
        return sum(
            row["prompt_tokens"] + row["cached_tokens"] + row["completion_tokens"]
            for row in procs.usage_rows(self.db)
        )

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        self.sim.stop()


def start_fleet(
    tmp: Path,
    replicas: int,
    redis: RedisServer | None,
    quota: Mapping[str, object],
    extra: str = "",
    **sim_options: object,
) -> Fleet:
    """`replicas` gateways (with `extra` in each config) in front of one `gateway sim` (with
    `sim_options`); the tenant `acme` has one key and the policy `quota`."""
    sim = procs.start_sim(**sim_options)
    db = tmp / "ledger.db"
    key, key_id = procs.create_key(db, "acme")
    fleet = Fleet(gateways=[], sim=sim, db=db, key=key, key_id=key_id)
    fleet.set_quota(**quota)
    if redis is not None:
        extra += f'[quota]\nredis_url = "{redis.url}"\nreplicas = {replicas}\n'
    for i in range(replicas):
        config = procs.write_config(tmp / f"gateway-{i}.toml", [sim.url], db, extra)
        fleet.gateways.append(procs.start(["serve", "--config", str(config)]))
    return fleet


def completion(max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": MODEL, "prompt": "count to ten", "max_tokens": max_tokens, "stream": stream}
