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

# Wheels of a hundred megabytes or more, installed one at a time.
LARGE_WHEELS = ("nvidia-", "torch==", "triton==", "vllm", "opencv", "llvmlite", "transformers==")
NEEDS_BYTES = 8 * 2**30


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


def _batches(requirements: str) -> list[list[str]]:
    """The pinned requirements in install order: each large wheel alone, the rest together.

    pip keeps every wheel it downloads until its command ends, so one command for all of them
    needs the wheels (about 3 GB) on disk beside what they unpack to (about 6 GB). One command per
    large wheel keeps at most one of them on disk at a time.
    """
    pins = [line.split("#")[0].strip() for line in requirements.splitlines()]
    pins = [pin for pin in pins if pin]
    large = [pin for pin in pins if pin.startswith(LARGE_WHEELS)]
    rest = [pin for pin in pins if not pin.startswith(LARGE_WHEELS)]
    return [[pin] for pin in large] + [rest]


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

        # pip's downloads go beside the venv, not to /tmp (often a small tmpfs); see `_batches`.
        scratch = env.home / "tmp"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        free = shutil.disk_usage(env.home).free
        if free < NEEDS_BYTES and log:
            print(
                f"warning: {free / 2**30:.1f} GiB free under {env.home}; "
                f"the install needs about {NEEDS_BYTES / 2**30:.0f} GiB",
                flush=True,
            )

        def run(*args: str | Path) -> None:
            if log:
                print("+", " ".join(map(str, args)), flush=True)
            subprocess.run(
                [str(a) for a in args], check=True, env={**os.environ, "TMPDIR": str(scratch)}
            )

        pip = (env.python, "-m", "pip", "install", "--quiet", "--no-cache-dir")
        run(sys.executable, "-m", "venv", venv)
        run(*pip, "--upgrade", "pip")
        for batch in _batches(REQUIREMENTS.read_text()):
            run(*pip, "--no-deps", *batch)
        shutil.rmtree(scratch, ignore_errors=True)
        run(env.python, TINY_MODEL, env.model)
        stamp.write_text(digest())
    return env


if __name__ == "__main__":
    installed = ensure()
    print(f"python: {installed.python}\nmodel:  {installed.model}")
