"""Benchmarks: ``python -m benchmarks --config configs/ml-1m.yaml`` (``make bench``).

Runs a fixed suite and writes ``docs/BENCHMARKS.md`` (machine, versions, date, commit, every figure
with what it is the median of) and ``docs/benchmarks.json``. ``BENCH_QUICK=1`` (or ``--quick``)
runs the same code on tiny sizes in about a minute and writes to ``--out`` (default
``$TMPDIR/micrec-bench-quick``, never ``docs/``): it is the smoke test of tests/test_bench.py.

Sections (each figure a median of several repeats; figures that compare two things are measured
side by side in the same run, interleaved):

``preprocessing``
    The Beam job (pipelines/preprocess.py, DirectRunner, the config's ``preprocess`` settings) on
    synthetic logs of growing size (default 0.3 M, 1 M, 3 M, 10 M events; a catalogue of 20 000
    items, 40 events per user). Each run is a child process: wall time of ``preprocess.run`` (data
    generation excluded), events/s, peak RSS from ``os.wait4``'s rusage of that child. Scaling
    exponent = slope of log(time) vs log(events) (least squares over the per-size medians). Runs
    that would not fit the time budget (``--budget-min``, estimated from the fit) or memory are
    skipped and their time extrapolated from the fit, marked as such.
``training``
    Steady-state training step time of the base ICAN model (``cl: []``) and of MicRec (all three
    CL terms) on the config's artifacts (``artifacts/<name>``, with title neighbours; otherwise a
    synthetic fallback, stated in the output): the same fixed batches held in memory (input
    pipeline excluded), the compiled Keras train function, warm-up steps first, then rounds that
    alternate the models (ABBA). Ratio MicRec/base per round, median over rounds. With
    ``--train-breakdown``, one-CL-term variants too, to attribute the overhead.
``title_encoding``
    Titles/s of :class:`micrec_tf.text.encoder.TitleEncoder` (all-MiniLM-L6-v2, the encoder of the
    title-neighbour job) on the artifacts' titles, after one warm-up pass.
``retrieval``
    1 M x 64 clustered synthetic item vectors (1 000 gaussian clusters of lognormal sizes, noise
    as large as the centres so clusters overlap, varying norms; queries from the same mixture):
    brute force (numpy product + argpartition,
    micrec_tf.search.top_k_dot) vs ScaNN (tree + AH + exact reordering), top-500: build
    time, QPS at batch 1 and 256, recall@500 against the exact top 500. The ScaNN query-time
    parameters (leaves to search, reorder candidates) are tuned on a grid over separate tuning
    queries; the pick is the fastest setting with recall >= 0.95 there, then measured on the
    evaluation queries.
``serving``
    The user tower SavedModel as export/serving.py writes it (signature ``serving_default``, raw
    string features), loaded with ``tf.saved_model.load`` in a fresh process as TF Serving loads it:
    latency p50/p99 of single requests, throughput at batch 64 (requests from real test users).
``gpu``
    Training examples/s on GPU, float32 and mixed precision, when TensorFlow sees a GPU; otherwise
    marked not measured.

Runtime on 2 cores: about 4-5 min for training, serving, title encoding and retrieval, then the
preprocessing runs (passes over the sizes: 0.3 M, 1 M, 3 M, 10 M once, then the repeats) until the
budget (``--budget-min``, default 27 min for the whole suite) would be exceeded; a run whose
estimated time does not fit, or whose estimated peak RSS exceeds 80 % of the available memory
(10 M events on DirectRunner needs ~17 GB), is skipped and reported as extrapolated.
``--preprocess-sizes 1e6,3e6,1e7 --preprocess-repeats 3,2,1`` (or ``BENCH_PREPROCESS_SIZES`` /
``BENCH_PREPROCESS_REPEATS``) change the plan; ``--sections`` runs a subset.

Layout: :mod:`benchmarks.harness` (sizes, timing helpers, machine info, child processes), one
module per section (:mod:`~benchmarks.preprocessing`, :mod:`~benchmarks.training`,
:mod:`~benchmarks.title_encoding`, :mod:`~benchmarks.retrieval`, :mod:`~benchmarks.serving`),
:mod:`benchmarks.report` (targets and the markdown) and :mod:`benchmarks.suite` (the run and the
CLI, ``benchmarks/__main__.py``). The package imports the library and the pipelines; nothing in
them imports it.
"""
