"""The `gateway` CLI run in this process, as the CLI tests drive it."""

from __future__ import annotations

import pytest

from gateway.cli import main

__all__ = ["next_cursor", "run"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`gateway ARGV...`: its exit status, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def next_cursor(err: str) -> str:
    """The cursor on the `next cursor: ` line `gateway export` writes to stderr."""
    (line,) = [line for line in err.splitlines() if line.startswith("next cursor: ")]
    return line.removeprefix("next cursor: ")
