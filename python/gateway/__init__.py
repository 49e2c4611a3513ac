"""tokengate: a metered, OpenAI-compatible inference gateway in front of vLLM workers.

The data plane is the Rust extension `gateway._core`; nothing here imports it eagerly, so the
control-plane modules (config, keys, ledger, CLI) work without it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokengate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
