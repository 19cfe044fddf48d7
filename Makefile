# The two commands: `make demo` and `make test`. Each creates/updates .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-faults lint typecheck imports check dev clean client-wire

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found (Python 3.11+ is required; set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/atelier demo

dev: $(STAMP)
	$(BIN)/atelier dev

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 4

test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -s -m faults  # -s: each scenario prints its figures (also in .atelier/fault-figures.json)

lint: $(STAMP)
	$(BIN)/ruff check orchestrator workers providers clients tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)  # the import contracts of docs/architecture.md ([tool.importlinter] in pyproject.toml)
	$(BIN)/lint-imports

check: lint typecheck imports test

# The client package carries its own copy of the wire schemas (tests/test_client_package.py compares them):
# after changing orchestrator/wire, copy it over with this.
client-wire:
	for f in orchestrator/wire/*.py; do \
	  case $$f in */__init__.py) continue;; esac; \
	  sed 's/orchestrator\.wire/atelier_client.wire/g' $$f > clients/python/atelier_client/wire/$$(basename $$f); \
	done

clean:
	rm -rf $(VENV) .atelier .pytest_cache .mypy_cache .ruff_cache
