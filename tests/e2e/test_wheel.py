"""The wheel that `maturin build` (and so `pip install .`) makes from the working tree, installed
into a fresh virtual environment: it holds the extension and the gRPC messages compiled from
`protos/` (which the repository never holds), and that environment alone runs `gateway sim`, mints
a key and runs `gateway serve`, which answers over HTTP and, to the wheel's own gRPC client, over
gRPC. And the sdist carries what a wheel build compiles.

The wheel is built once a session, in the repository's target directory, so after `make build`
it is incremental (seconds); the environment installs its dependencies from pip's cache or PyPI.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from gateway.console import ASSETS
from tests.support import procs

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos" / "gateway" / "v1").glob("*.proto"))
MODEL = "wheel-model"
BUILD_TIMEOUT_S = 1800.0  # a build from scratch on two busy cores; incremental takes seconds

# Run by the fresh environment's interpreter in isolated mode (`-I`: neither the working directory
# nor PYTHONPATH on its path), so everything it imports comes from the installed wheel.
CLIENT = """
import json, sys
import gateway, gateway._core, gateway.grpc.v1
from gateway.grpc import GatewayClient
target, key, model = sys.argv[1:]
with GatewayClient(target, key, timeout=30) as client:
    answer = client.complete(model, "hello from the wheel", max_tokens=3)
    models = [m.id for m in client.models()]
print(json.dumps({
    "modules": [gateway.__file__, gateway._core.__file__, gateway.grpc.v1.__file__],
    "text": answer.choices[0].text,
    "completion_tokens": answer.usage.completion_tokens,
    "models": models,
}))
"""


def run(argv: list[str], cwd: Path = ROOT, timeout: float = 600.0) -> str:
    """Runs `argv` to completion; its stdout, or an error with all its output."""
    done = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout
    )
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def maturin(*args: str, timeout: float = 600.0) -> None:
    run([sys.executable, "-m", "maturin", *args], timeout=timeout)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`maturin build --release` of the working tree, into a directory of its own."""
    out = tmp_path_factory.mktemp("wheel")
    maturin(
        "build",
        "--release",
        "--interpreter",
        sys.executable,
        "--out",
        str(out),
        timeout=BUILD_TIMEOUT_S,
    )
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="session")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel (and its dependencies) installed."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", str(root)])
    pip = [str(root / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", "-q", str(wheel)])
    return root


def test_the_wheel_holds_the_extension_the_grpc_messages_and_the_console(wheel: Path) -> None:
    messages = {f"gateway/grpc/v1/{p.stem}_pb2.{ext}" for p in PROTOS for ext in ("py", "pyi")}
    assert len(messages) >= 4, PROTOS
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert messages | {"gateway/grpc/v1/__init__.py"} <= names, sorted(names)
        assert {"gateway/_core.abi3.so", "gateway/_core.pyi", "gateway/py.typed"} <= names
        console = {f"gateway/console/static/{name}" for name in ASSETS}
        assert console <= names, "the console loads nothing from elsewhere: its files ship"
        # The build script's package, not a stale copy `maturin develop` left in python/.
        assert "rust/python/build.rs" in archive.read("gateway/grpc/v1/__init__.py").decode()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        recorded = {line.split(",", 1)[0] for line in archive.read(record).decode().splitlines()}
    assert messages <= recorded


def test_a_fresh_environment_serves_http_and_grpc_from_the_wheel(
    venv: Path, tmp_path: Path
) -> None:
    gateway = (str(venv / "bin" / "gateway"),)
    db = tmp_path / "ledger.db"
    sim = procs.start(["sim", "--port", "0", "--model", MODEL], gateway=gateway)
    server: procs.Process | None = None
    try:
        key, _ = procs.create_key(db, "acme", gateway=gateway)
        config = procs.write_config(tmp_path / "gateway.toml", [sim.url], db, "[grpc]\nport = 0\n")
        server = procs.start(["serve", "--config", str(config)], gateway=gateway)

        answer = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": "hello over HTTP", "max_tokens": 4},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["usage"]["completion_tokens"] == 4
        assert body["choices"][0]["text"]

        target = procs.wait_line(server, r"gRPC API listening on (\S+)")[1]
        python = str(venv / "bin" / "python")
        out = json.loads(run([python, "-I", "-c", CLIENT, target, key, MODEL], cwd=tmp_path))
        assert all(Path(module).is_relative_to(venv) for module in out["modules"]), out
        assert out["completion_tokens"] == 3
        assert out["text"]
        assert MODEL in out["models"]

        # Both requests metered into the ledger by the installed control plane.
        assert procs.wait_for(lambda: len(procs.usage_rows(db)) == 2, timeout=30)
        endpoints = sorted(row["endpoint"] for row in procs.usage_rows(db))
        assert endpoints == ["completions", "completions"]
    finally:
        if server is not None:
            server.stop()
        sim.stop()


def test_the_sdist_carries_the_protos_and_no_generated_module(tmp_path: Path) -> None:
    """What the build scripts compile (`protos/`), with the build scripts; never a generated
    module (those are the build's)."""
    maturin("sdist", "--out", str(tmp_path))
    (sdist,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = {f"protos/gateway/v1/{p.name}" for p in PROTOS}
    needed |= {"rust/core/build.rs", "rust/python/build.rs", "Cargo.lock", "pyproject.toml"}
    assert needed <= names, sorted(names)
    assert not [name for name in names if "grpc/v1/" in name or name.endswith("_pb2.py")]
