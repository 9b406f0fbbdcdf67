"""The zoo's masks are those recorded before the pruning core was restructured (see
tests/zoo_masks.py, which wrote tests/data/zoo_masks.json)."""

import json

import pytest

from zoo_masks import CASES, REFERENCE, SCORES, digest, pruned_masks


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("name", CASES)
def test_zoo_masks_unchanged(name: str, score: str) -> None:
    expected = json.loads(REFERENCE.read_text())[f"{name}/{score}"]
    found = digest(pruned_masks(name, score))
    if found["sha256"] != expected["sha256"]:
        changed = {k: (expected["kept"].get(k), v) for k, v in found["kept"].items() if expected["kept"].get(k) != v}
        missing = sorted(set(expected["kept"]) - set(found["kept"]))
        pytest.fail(f"masks of {name} ({score}) changed: kept (recorded, now) {changed}; masks gone: {missing}")
