"""Tests of the `gateway` package's modules in process: configuration, keys, quotas, the ledger
(a SQLite file and a real PostgreSQL database), the admin and billing apps (ASGI, no socket), the
CLI, the control-plane loops. No gateway or simulator process is started here."""
