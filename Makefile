# Everything goes through the project's own virtualenv, created on first use.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.switchyard-installed
ARGS ?=

.PHONY: up test lint unit fuzz bench fairness scale loadtest install clean

up: $(STAMP)  ## Bring the whole system up: embedded Redis, gateway on :8000, one worker (demo model)
	$(BIN)/switchyard up $(ARGS)

test: $(STAMP) lint  ## The whole suite: lint, types, unit, integration and end-to-end tests
	$(BIN)/pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)  ## Only the tests that start no engine
	$(BIN)/pytest -m "not e2e" $(ARGS)

FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)  ## Schemathesis with fresh random cases (the suite replays a fixed set), e.g. FUZZ_EXAMPLES=2000
	SWITCHYARD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/test_schemathesis.py $(ARGS)

bench: $(STAMP)  ## Switchyard against vLLM's own server, same model and engine settings
	$(BIN)/python -m loadtest compare $(ARGS)

fairness: $(STAMP)  ## Another tenant's TTFT p50/p95 alone and while one tenant floods with 10x its load
	$(BIN)/python -m loadtest fairness $(ARGS)

scale: $(STAMP)  ## 1, 2, 4, 8, 16 simulated workers: tokens/s against N x one worker's, jobs per worker, CPU
	$(BIN)/python -m loadtest scale $(ARGS)

loadtest: $(STAMP)  ## Locust sweep over concurrency levels against a running server, e.g. ARGS="--url http://127.0.0.1:8000"
	$(BIN)/python -m loadtest sweep $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml deploy/install.sh
	deploy/install.sh $(VENV)
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
