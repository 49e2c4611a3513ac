"""`deploy/vllm/serve.sh`, the GPU worker launcher, run with a stand-in `vllm` that prints the
command line it was given: what the deploy tests and the real-vLLM tier check."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support import ROOT

__all__ = ["DEPLOY", "recipe_args", "serve_sh"]

DEPLOY = ROOT / "deploy"


def serve_sh(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs serve.sh with a stand-in `vllm` that prints the arguments it was given."""
    echo = tmp_path / "vllm"
    echo.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\nprintf "key=%s\\n" "${VLLM_API_KEY:-}"\n')
    echo.chmod(0o755)
    return subprocess.run(
        ["bash", str(DEPLOY / "vllm" / "serve.sh"), *args],
        env={"PATH": os.environ["PATH"], "VLLM": str(echo), **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def recipe_args(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The `vllm` command line serve.sh runs, one argument a line; serve.sh must succeed."""
    done = serve_sh(tmp_path, *args, **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()
