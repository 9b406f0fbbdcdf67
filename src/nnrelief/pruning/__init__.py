"""The pruning pass, one module a stage (see :mod:`.prune` for the way through them).

:mod:`.prune` (``prune()``, the entry point) -> :mod:`.batches` -> statistics (:mod:`.stats`)
-> :mod:`.plan` (scores :mod:`.scores`, per-neuron selection :mod:`.selection`, structure
cleaning :mod:`.cleaning`; layer choices and ``target=`` in :mod:`.choices`) -> :mod:`.apply`
(the masks, held by :mod:`.masks`) -> :mod:`.report`. :mod:`.diagnostics` explains a model or
batch the pass cannot feed.

Nothing is imported here, so that the channel graph (:mod:`nnrelief.analysis`) can read
:mod:`.masks` without loading the pass; ``nnrelief.prune`` is the public entry.
"""
