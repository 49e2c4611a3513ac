"""`benchmarks/journal_cost.py`'s arithmetic: paired ratios of throughput and of CPU a request,
the interval of their median, and the sections `--saturation-only` and `--shared-core` write."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import journal_cost
from harness import Saturation, SharedRun


def saturation(round_: int, target: str, rps: float, cpu: float) -> Saturation:
    return Saturation(round_, target, rps, cpu, [], 0, 1_000.0, 2_000.0)


def rounds() -> list[Saturation]:
    """Three rounds: `memory` serves 10,000 req/s at 100% of its core (100 µs a request),
    `interval` 9,500, 9,600 and 9,000 at 95% (100 µs, 99 µs, 106 µs), the control as `memory`."""
    runs = []
    for r, (rps, cpu) in enumerate(((9_500.0, 0.95), (9_600.0, 0.95), (9_000.0, 0.95))):
        runs += [
            saturation(r, "memory", 10_000.0, 1.0),
            saturation(r, "interval", rps, cpu),
            saturation(r, journal_cost.CONTROL, 10_000.0, 1.0),
        ]
    return runs


# What a `--saturation-only` run says of itself, for its section.
META = {
    "command": "python benchmarks/journal_cost.py --saturation-only",
    "date": "2026-12-06 15:19 UTC",
    "commit": "abc",
    "machine": {"cpu": "cpu", "nproc": "2", "load": "0.1"},
    "rounds": 3,
    "duration_s": 3.0,
    "raw": "journal-resolved-x.json",
    "journals": "ext4 /dev/vda",
}


def test_paired_ratios_of_throughput_and_of_cpu_a_request() -> None:
    runs = rounds()
    assert journal_cost.paired_ratios(runs, "interval", "memory") == [0.95, 0.96, 0.9]
    cpu = journal_cost.paired_ratios(runs, "interval", "memory", "cpu")
    assert [round(x, 4) for x in cpu] == [1.0, 0.9896, 1.0556]
    # A round missing either target, or whose base served nothing, is left out.
    runs = [r for r in runs if not (r.round == 1 and r.target == "memory")]
    runs.append(saturation(2, "memory", 0.0, 1.0))
    runs = [r for r in runs if not (r.round == 2 and r.rps == 10_000.0 and r.target == "memory")]
    assert journal_cost.paired_ratios(runs, "interval", "memory") == [0.95]


def test_the_median_interval_holds_the_median_and_reads_the_same_each_time() -> None:
    values = [0.91, 0.95, 0.97, 0.93, 1.02, 0.96, 0.94, 0.99, 0.92, 0.98]
    low, high = journal_cost.median_interval(values)
    assert low <= statistics.median(values) <= high
    assert min(values) <= low < high <= max(values)
    assert journal_cost.median_interval(values) == (low, high)
    assert journal_cost.median_interval([0.97] * 5) == (0.97, 0.97)


def test_the_resolved_section_gives_each_ratio_with_its_interval() -> None:
    text = journal_cost.resolved_section({"completions": rounds()}, META)
    assert text.startswith(journal_cost.RESOLVED_BEGIN)
    assert "journals on ext4 /dev/vda." in text
    assert text.rstrip().endswith(journal_cost.RESOLVED_END)
    row = next(line for line in text.splitlines() if line.startswith("| completions |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:3] == ["completions", "10,000", "9,500"]
    assert cells[3].startswith("**0.950** (")
    assert cells[4] == "**1.000** (1.000 to 1.000)"
    assert cells[5].startswith("**1.000** (")
    assert "Errors: 0." in text


def test_the_resolved_section_gives_the_syncers_cpu_a_request_where_threads_were_counted() -> None:
    counted = rounds()
    # The syncer's thread ran 1.9%, 1.92% and 1.8% of a core: 2 µs a request each time.
    for run in counted:
        if run.target == "interval":
            run.threads = {"tokengate": 0.9, journal_cost.SYNCER: run.rps * 2e-6}
    text = journal_cost.resolved_section({"completions": counted}, META)
    assert "completions **2.00 µs**, 2.0% of its CPU a request." in text
    # Reports of builds that did not count threads: no such line.
    assert "syncer" not in journal_cost.resolved_section({"completions": rounds()}, META)


def test_journals_go_in_a_fresh_directory_under_journal_dir_removed_after(tmp_path: Path) -> None:
    with journal_cost.journal_root(None) as root:
        assert root is None
    disk = tmp_path / "disk"
    disk.mkdir()
    with journal_cost.journal_root(disk) as root:
        assert root is not None
        assert root.parent == disk
        (root / "interval-journal").mkdir()
    assert list(disk.iterdir()) == []


def test_the_file_system_is_named_by_type_and_source(tmp_path: Path) -> None:
    named = journal_cost.file_system(tmp_path)
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    assert named != "unknown"
    assert named.split()[0] in {fields[2] for fields in mounts}


def report(*rounds_of: tuple[float, float]) -> dict[str, object]:
    """A `--saturation-only` raw report of one mode: each round `memory` at 10,000 req/s, and
    `interval` and the control at the given throughputs, every gateway at 100% of its core."""
    runs = []
    for r, (interval, control) in enumerate(rounds_of):
        runs += [
            vars(saturation(r, "memory", 10_000.0, 1.0)),
            vars(saturation(r, "interval", interval, 1.0)),
            vars(saturation(r, journal_cost.CONTROL, control, 1.0)),
        ]
    return {"runs": {"completions": runs}}


def test_pooled_rounds_are_paired_within_their_own_run() -> None:
    # Both runs number their rounds from 0: a round of one is never paired with the other's.
    first = report((9_500.0, 10_000.0), (9_000.0, 10_500.0))
    second = report((9_800.0, 9_900.0))
    pooled = journal_cost.pooled_ratios([first, second])
    ratios = pooled["completions"]
    assert ratios["interval rps"] == [0.95, 0.9, 0.98]
    assert ratios[f"{journal_cost.CONTROL} rps"] == [1.0, 1.05, 0.99]
    # At the same share of the core, CPU a request goes as throughput's inverse.
    assert [round(x, 4) for x in ratios["interval cpu"]] == [1.0526, 1.1111, 1.0204]
    table = journal_cost.pooled_table(pooled)
    row = next(line for line in table.splitlines() if line.startswith("| completions |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:2] == ["completions", "3"]
    assert cells[2].startswith("**0.950** (")
    assert cells[3].startswith("**1.000** (")


def test_pool_reads_the_raw_reports_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for name, data in (
        ("a.json", report((9_500.0, 10_000.0))),
        ("b.json", report((9_700.0, 10_000.0))),
    ):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        paths.append(path)
    assert journal_cost.main(["--pool", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "Pooled: a.json, b.json" in out
    assert "| completions | 2 | **0.960** (0.950 to 0.970) |" in out


def shared_rounds() -> list[SharedRun]:
    """Two rounds of `--shared-core`: each gateway serves 20,000 requests at 8,000 req/s (the
    core 24,000 in all). `memory` and the control spend 40 µs a request on the tokio thread and
    8 on Python's; `interval` 42 (round 0) or 43 (round 1) and 8, and its syncer 3 µs."""
    runs = []
    for r, tokio in enumerate((42.0, 43.0)):
        for name, threads in (
            ("memory", {"tokengate": 40.0, "python": 8.0}),
            ("interval", {"tokengate": tokio, "python": 8.0, journal_cost.SYNCER: 3.0}),
            (journal_cost.CONTROL, {"tokengate": 40.0, "python": 8.0}),
        ):
            seconds = {thread: µs * 20_000 / 1e6 for thread, µs in threads.items()}
            runs.append(SharedRun(r, name, 20_000.0, seconds, 8_000.0, 0))
    return runs


def test_a_shared_run_counts_cpu_a_request_by_process_and_by_thread() -> None:
    run = shared_rounds()[1]
    assert run.target == "interval"
    assert run.cpu_per_request() == pytest.approx(53e-6)
    assert run.cpu_per_request(journal_cost.SYNCER) == pytest.approx(3e-6)
    assert run.cpu_per_request("absent") == 0.0
    idle = SharedRun(0, "memory", 0.0, {"tokengate": 0.1}, 0.0, 0)
    assert math.isnan(idle.cpu_per_request())


def test_the_shared_section_gives_the_ratios_of_cpu_a_request_and_where_it_goes() -> None:
    meta = {**META, "command": "python benchmarks/journal_cost.py --shared-core"}
    text = journal_cost.shared_section({"completions": shared_rounds()}, meta)
    assert text.startswith(journal_cost.SHARED_BEGIN)
    assert text.rstrip().endswith(journal_cost.SHARED_END)
    row = next(line for line in text.splitlines() if line.startswith("| completions |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "8,000, 8,000, 8,000"
    assert cells[2] == "48.0, 53.5, 48.0"
    # 48 / 53 and 48 / 54: the median of the two rounds' ratios.
    assert cells[3].startswith(f"**{statistics.median([48 / 53, 48 / 54]):.3f}** (")
    assert cells[4] == "**1.000** (1.000 to 1.000)"
    # On a core of its own the gateway serves the 24,000 req/s the core served: its syncer's
    # 3 µs a request at 8,000 are 1 µs there.
    assert cells[5].startswith(f"**{statistics.median([48 / 51, 48 / 52]):.3f}** (")
    assert "- completions: `tokengate` +2.50, `python` +0.00, `usage-journal` +3.00" in text
    assert "Errors: 0." in text
