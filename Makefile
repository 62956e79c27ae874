# The two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv if it is missing and install memstrata with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds on this machine's disk (CUDA build, runs on CPU).
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/memstrata demo

# Two pytest workers (one per core), one test file per worker at a time (module-level caches stay in one
# process), one intra-op thread each so the two do not oversubscribe the cores.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
