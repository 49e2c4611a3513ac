"""A real PostgreSQL server: a cluster made by `initdb` in a temporary directory, `postgres` on a
free loopback port (its unix socket in that directory), without fsync, removed on exit.

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` system user that
Debian's package creates, and `initdb` and `postgres` run as that user (`setpriv`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import psycopg

from tests.support import procs
from tests.support.services.process import ServerProcess

__all__ = ["PostgresServer", "postgres_bindir"]

USER = "tokengate"
PASSWORD = "tokengate-test"
SYSTEM_USER = "postgres"


def postgres_bindir() -> Path:
    """The directory of `initdb` and `postgres`: on PATH, else Debian's newest
    /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("postgres") is not None:
        return Path(on_path).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.parent.name)],
    )
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: run `make services`")
    return versions[-1].parent


class PostgresServer(ServerProcess):
    """`with PostgresServer() as pg:` starts one; `pg.url` names its `tokengate` database,
    `pg.database()` makes a fresh one for a test and drops it afterwards."""

    # SIGINT is PostgreSQL's fast shutdown: clients are disconnected, not waited for.
    stop_signal = signal.SIGINT
    stop_timeout_s = 30.0

    def __init__(self) -> None:
        super().__init__()
        self._bindir = postgres_bindir()
        self.port = procs.free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="tokengate-pg-"))
        self._log = self._dir / "server.log"
        self._as_owner: list[str] = []
        self.url = self.url_of("tokengate")

    def url_of(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _own_directory(self) -> None:
        """As root, hands the directory to the `postgres` system user, and runs as it."""
        if os.geteuid() != 0:
            return
        try:
            owner = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root, and there is no {SYSTEM_USER!r} user to run PostgreSQL as: "
                "run `make services`"
            ) from None
        os.chown(self._dir, owner.pw_uid, owner.pw_gid)
        self._as_owner = [
            "setpriv",
            f"--reuid={owner.pw_uid}",
            f"--regid={owner.pw_gid}",
            "--init-groups",
            "--",
        ]

    def start(self) -> Self:
        self._own_directory()
        password_file = self._dir / "password"
        password_file.write_text(PASSWORD)
        if self._as_owner:
            shutil.chown(password_file, SYSTEM_USER, SYSTEM_USER)
        data = self._dir / "data"
        subprocess.run(
            [
                *self._as_owner,
                str(self._bindir / "initdb"),
                "--pgdata", str(data),
                "--username", USER,
                "--pwfile", str(password_file),
                "--auth-local", "trust",
                "--auth-host", "scram-sha-256",
                "--encoding", "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=self._dir,
            capture_output=True,
            check=True,
            timeout=120,
        )  # fmt: skip
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    *self._as_owner,
                    str(self._bindir / "postgres"),
                    "-D", str(data),
                    "-p", str(self.port),
                    "-k", str(self._dir),
                    "-c", "listen_addresses=127.0.0.1",
                    "-c", "fsync=off",
                    "-c", "synchronous_commit=off",
                    "-c", "full_page_writes=off",
                    "-c", "max_connections=300",
                    # Every test's CREATE DATABASE copies the template through the WAL: bounded
                    # here, the session's cluster stays near 100 MB instead of growing past 1 GB.
                    "-c", "wal_level=minimal",
                    "-c", "max_wal_senders=0",
                    "-c", "min_wal_size=32MB",
                    "-c", "max_wal_size=64MB",
                ],
                cwd=self._dir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                self.admin("CREATE DATABASE tokengate")
                return self
            except psycopg.OperationalError:
                time.sleep(0.05)
        output = self._log.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"postgres did not answer on port {self.port}:\n{output}")

    def admin(self, sql: str) -> None:
        """Runs one statement, outside any transaction, in the `postgres` database."""
        with psycopg.connect(self.url_of("postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database for the block, dropped after it (its connections cut)."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        self.admin(f"CREATE DATABASE {name}")
        try:
            yield self.url_of(name)
        finally:
            self.admin(f"DROP DATABASE {name} WITH (FORCE)")

    def cut_connections(self, url: str) -> None:
        """Terminates every connection to the database of `url` (one of `url_of`'s), as a server
        restart or a network cut would."""
        database = url.rsplit("/", 1)[1]
        self.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._dir, ignore_errors=True)
