"""docs/RESULTS.md shows the committed results files as they are (made by ``nnrelief results --into``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nnrelief.reporting.results import load_results, results_markdown, update_marked_blocks

DOCS = Path(__file__).resolve().parent.parent / "docs"
FILES = sorted((DOCS / "results").glob("*.json"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_results_page_shows_the_file(path):
    data = load_results(path)
    assert data["command"].startswith("nnrelief "), f"{path.name}: the command that made the run"
    page = (DOCS / "RESULTS.md").read_text()
    refreshed = update_marked_blocks(page, {path.stem: results_markdown(data)}, "docs/RESULTS.md")
    assert refreshed == page, (
        f"docs/RESULTS.md's table of {path.stem} differs from {path.name}: run "
        f"nnrelief results {path.relative_to(DOCS.parent)} -o docs/figures/{path.stem} --into docs/RESULTS.md"
    )
