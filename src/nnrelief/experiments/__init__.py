"""The paper's experiments end to end: settings and presets, run folders, the iterative
relief loop (:func:`~nnrelief.experiments.iterative.relieve`), histories and the
comparison with baseline pruning methods."""
