"""experiments: the paper's reproduction and the studies around it (the top stage of the project).

* :mod:`experiments.reproduce` - the reproduction driver and its CLI
  (``python -m experiments.reproduce --config configs/ml-1m.yaml``, ``make reproduce``);
* :mod:`experiments.variants` - the variants (table rows) and their validation grids;
* :mod:`experiments.run_cache` - :class:`~experiments.run_cache.Runner` and the committed run
  cache under ``docs/results/runs/<name>/``;
* :mod:`experiments.report` - the markdown report, its statistics and plots;
* :mod:`experiments.investigate` - one-knob-at-a-time studies on the validation split;
* :mod:`experiments.reference_rows` - the most-popular and item-kNN reference rows.

It imports the library (``micrec_tf``); nothing in the library imports it.
"""
