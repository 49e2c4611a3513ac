"""The README documents every configuration option with its real default."""

from __future__ import annotations

from gateway.config import options_table
from tests.support import ROOT

README = ROOT / "README.md"


def test_readme_options_table_matches_the_code() -> None:
    text = README.read_text()
    begin, end = "<!-- options:begin -->\n", "\n<!-- options:end -->"
    documented = text[text.index(begin) + len(begin) : text.index(end)]
    assert documented.strip() == options_table().strip()
