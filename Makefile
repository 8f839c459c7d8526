# Two commands do all the set-up (see README):  `make run`  and  `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdpipe-installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## install, then run the whole pipeline on the embedded default (stages/default.yaml)
run: $(STAMP)
	$(BIN)/kdpipe run

## install, then run the test suite (this is what .ci/run calls)
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check kdpipe tests benchmarks
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf runs .pytest_cache
