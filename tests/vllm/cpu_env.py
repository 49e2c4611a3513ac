"""The real-vLLM tier's environment: vLLM's CPU build in a virtual environment of its own, the tiny
model it serves, and how to start a worker on it.

    python -m tests.vllm.cpu_env        # installs (once) and prints where

It lives in ``$TOKENGATE_VLLM_HOME`` (default ``.cache/vllm-cpu`` in the repository), apart from the
gateway's environment: vLLM brings its own torch, transformers and pins that the gateway must not
inherit. It is rebuilt when ``requirements.txt`` or ``tiny_model.py`` change; a stamp holds their
digest. About 6 GB, two minutes on a fast link.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REQUIREMENTS = HERE / "requirements.txt"
TINY_MODEL = HERE / "tiny_model.py"

SERVED_MODEL = "tiny-llama"
MAX_MODEL_LEN = 512


@dataclass(frozen=True)
class VllmEnv:
    """An installed environment: its interpreter and the model directory."""

    home: Path

    @property
    def python(self) -> Path:
        return self.home / "venv" / "bin" / "python"

    @property
    def model(self) -> Path:
        return self.home / "model"

    def worker_command(self, port: int, *extra: str) -> list[str]:
        """`vllm serve` for the tiny model on 127.0.0.1:`port`.

        The `vllm` console script of the CPU wheel fails (it looks up package metadata named
        `vllm`), so the API server module is run directly. `--enforce-eager` halves start-up on
        2 cores (no graph compilation); the protocol, usage and metrics are the same.
        """
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            SERVED_MODEL,
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--dtype",
            "bfloat16",
            "--enforce-eager",
            "--enable-prompt-tokens-details",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--uvicorn-log-level",
            "warning",
            *extra,
        ]

    def worker_env(self, cpu: int | None = None) -> dict[str, str]:
        """The environment of a worker process; `cpu` pins its compute threads to one core."""
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        # vLLM's "auto" binding puts every worker on the same core; spread them instead.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "auto" if cpu is None else str(cpu)
        env.pop("VIRTUAL_ENV", None)
        return env


def home() -> Path:
    return Path(os.environ.get("TOKENGATE_VLLM_HOME", REPO / ".cache" / "vllm-cpu"))


def digest() -> str:
    h = hashlib.sha256()
    for path in (REQUIREMENTS, TINY_MODEL):
        h.update(path.read_bytes())
    return h.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time (two pytest sessions may start together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure(log: bool = True) -> VllmEnv:
    """The environment, installed first if missing or out of date."""
    env = VllmEnv(home())
    stamp = env.home / "stamp"
    with _locked(env.home / ".lock"):
        if stamp.exists() and stamp.read_text() == digest():
            return env
        venv = env.home / "venv"
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(env.model, ignore_errors=True)
        stamp.unlink(missing_ok=True)

        def run(*args: str | Path) -> None:
            if log:
                print("+", " ".join(map(str, args)), flush=True)
            subprocess.run([str(a) for a in args], check=True)

        run(sys.executable, "-m", "venv", venv)
        run(env.python, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--upgrade", "pip")
        run(
            env.python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-cache-dir",
            "--no-deps",
            "-r",
            REQUIREMENTS,
        )
        run(env.python, TINY_MODEL, env.model)
        stamp.write_text(digest())
    return env


if __name__ == "__main__":
    installed = ensure()
    print(f"python: {installed.python}\nmodel:  {installed.model}")
