"""`make run`'s command, `gateway demo`, end to end: it serves, its key works, and Ctrl-C stops
everything it started."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import openai
import pytest

from tests.support import procs

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (field 4 of /proc/N/stat is the parent)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_serves_with_its_printed_key_and_stops_everything(tmp_path: Path) -> None:
    demo = procs.start(["demo", "--data-dir", str(tmp_path / "data"), "--port", "0"])
    try:
        assert procs.wait_for(lambda: any("tg-" in line for line in demo.output))
        key = next(m.group(0) for line in demo.output if (m := re.search(r"tg-\S+", line)))
        key = key.strip('"')
        sims = _children(demo.proc.pid)
        assert len(sims) == 2, "two simulated workers"
        with openai.OpenAI(base_url=f"{demo.url}/v1", api_key=key, max_retries=0) as client:
            chunks = list(
                client.chat.completions.create(
                    model="sim-model",
                    messages=[{"role": "user", "content": "Say hello"}],
                    max_tokens=3,
                    stream=True,
                )
            )
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 3
        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(timeout=30) == 0
        assert procs.wait_for(lambda: not any(_alive(pid) for pid in sims))
        assert (tmp_path / "data" / "gateway.toml").exists()
        assert len(procs.usage_rows(tmp_path / "data" / "gateway.db")) == 1
    finally:
        demo.stop()
