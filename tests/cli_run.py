"""The `gateway` CLI run in this process, as the CLI tests drive it."""

from __future__ import annotations

import pytest

from gateway.cli import main

__all__ = ["run"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`gateway ARGV...`: its exit status, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err
