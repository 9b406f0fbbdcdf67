"""docs/RESULTS.md shows the committed results files as they are (made by ``nnrelief results --into``):
one table per file, one per group of files whose runs differ only by seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnrelief.reporting.results import load_results, results_tables, update_marked_blocks
from nnrelief.reporting.seeds import seed_groups

DOCS = Path(__file__).resolve().parent.parent / "docs"
FILES = sorted((DOCS / "results").glob("*.json"))
GROUPS = seed_groups({path.stem: load_results(path) for path in FILES})


@pytest.mark.parametrize("name", list(GROUPS))
def test_results_page_shows_the_file(name):
    for data in GROUPS[name]:
        assert data["command"].startswith("nnrelief "), f"{name}: the command that made the run"
    page = (DOCS / "RESULTS.md").read_text()
    refreshed = update_marked_blocks(page, {name: results_tables({name: GROUPS[name]})[name]}, "docs/RESULTS.md")
    files = " ".join(f"docs/results/{stem}.json" for stem in name.split("+"))
    assert refreshed == page, (
        f"docs/RESULTS.md's table of {name} differs from its results file(s): run "
        f"nnrelief results {files} -o docs/figures/{name} --into docs/RESULTS.md"
    )
