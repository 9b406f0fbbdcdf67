"""The package layout: modules that moved into ``pruning/`` and ``compaction/`` keep their old
names, for imports and for files pickled before the move."""

import importlib
import io
import pickle

import pytest

import nnrelief

MOVED = {
    "scores": "pruning.scores", "selection": "pruning.selection", "stats": "pruning.stats", "cleaning": "pruning.cleaning",
    "masks": "pruning.masks", "report": "pruning.report", "choices": "pruning.choices", "diagnostics": "pruning.diagnostics",
    "narrowing": "compaction.narrowing", "indexmaps": "compaction.indexmaps", "export": "compaction.export",
    "opmetrics": "compaction.opmetrics",
}  # fmt: skip


@pytest.mark.parametrize("old, new", MOVED.items())
def test_old_module_names_are_the_moved_modules(old, new):
    assert importlib.import_module(f"nnrelief.{old}") is importlib.import_module(f"nnrelief.{new}")


def test_a_pickle_naming_the_old_module_loads():
    from nnrelief.compaction.narrowing import ChannelMap

    old = pickle.dumps(ChannelMap, protocol=0).replace(b"nnrelief.compaction.narrowing", b"nnrelief.narrowing")
    assert b"nnrelief.narrowing" in old
    assert pickle.load(io.BytesIO(old)) is ChannelMap


def test_the_public_entry_points_stay_where_users_call_them():
    assert nnrelief.prune.__module__ == "nnrelief.pruning.prune"
    assert nnrelief.compact.__module__ == "nnrelief.compaction.compactor"
    from nnrelief.compaction import compact

    assert compact is nnrelief.compact
