"""deploy/vllm: the GPU worker launcher builds the `vllm serve` line the gateway relies on, and the
gateway configuration for the Kubernetes workers is valid. (That vLLM itself accepts the line is
checked in the real-vLLM tier, tests/vllm.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from tests.support.deploy import DEPLOY, recipe_args, serve_sh


def test_serve_sh_passes_the_flags_the_gateway_relies_on(tmp_path: Path) -> None:
    argv = recipe_args(
        tmp_path,
        "--seed",
        "1",
        MODEL="org/model",
        SERVED_MODEL_NAME="model-a",
        MAX_NUM_SEQS="64",
        VLLM_API_KEY="worker-secret",
    )
    assert argv[:2] == ["serve", "org/model"]
    pairs = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert pairs["--served-model-name"] == "model-a"
    assert pairs["--max-num-seqs"] == "64"
    assert pairs["--port"] == "8000"
    for flag in ("--enable-prefix-caching", "--enable-prompt-tokens-details"):
        assert flag in argv
    assert argv[-3:-1] == ["--seed", "1"], "the script's own arguments come last"
    # The worker's key reaches vLLM through its environment, never its command line.
    assert argv[-1] == "key=worker-secret"
    assert not any("worker-secret" in a for a in argv[:-1])


@pytest.mark.parametrize(
    ("args", "env", "complaint"),
    [
        ((), {}, "set MODEL"),
        (("--disable-log-stats",), {"MODEL": "m"}, "--disable-log-stats"),
        ((), {"MODEL": "m", "EXTRA_ARGS": "--disable-log-stats"}, "--disable-log-stats"),
        ((), {"MODEL": "m", "MAX_NUM_SEQS": "0"}, "MAX_NUM_SEQS"),
        ((), {"MODEL": "m", "GPU_MEMORY_UTILIZATION": "1.5"}, "GPU_MEMORY_UTILIZATION"),
    ],
)
def test_serve_sh_refuses_what_would_break_the_gateway(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], complaint: str
) -> None:
    done = serve_sh(tmp_path, *args, **env)
    assert done.returncode == 2
    assert complaint in done.stderr
    assert done.stdout == "", "vllm was not started"


def test_gateway_config_for_the_kubernetes_workers_loads() -> None:
    config = load_config(DEPLOY / "vllm" / "k8s" / "gateway-workers.toml")
    assert config.workers
    ((worker),) = config.workers
    assert worker.url is None
    assert worker.dns == "http://vllm-worker.tokengate.svc.cluster.local:8000"
    assert worker.api_key
