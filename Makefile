# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saev-curate demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

# the unit tests only (no Prefect flows or API, no stack, nothing slow; markers in pyproject.toml)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not flow and not stack and not slow"

clean:
	rm -rf $(VENV) .pytest_cache

# The local production-like stack (infra/README.md): Prefect server + process worker, SeaweedFS S3,
# Dask scheduler + GPU=1 worker, all on 127.0.0.1, state and logs in .stack/.
.PHONY: stack-up stack-down deploy

stack-up: $(STAMP)
	$(BIN)/python infra/stack.py up --state .stack

stack-down:
	$(BIN)/python infra/stack.py down --state .stack

deploy: $(STAMP)
	$(BIN)/python deployments/setup.py --stack .stack
