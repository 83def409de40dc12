# The two commands of the README: `make demo` runs the switch with simulators, `make test` runs the tests.
# Each creates .venv, installs the project with its extensions, and needs nothing installed by hand.
# scripts/make-venv.sh prefers Debian's /usr/bin/python3.11 (1.3-1.5x faster than the unoptimised pyenv
# python3 on these machines, ../shared/DESIGN.md); any other Python 3.11 works too.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SECONDS ?= 20

.PHONY: demo test lint bench system-deps build clean

$(BIN)/python:
	bash scripts/make-venv.sh $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard _speedups/*.pyx)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

# PostgreSQL (ledger backend tests) and Prometheus (metrics scrape test) come from Debian's packages.
system-deps:
	@bash scripts/system-deps.sh

demo: build
	$(BIN)/switch demo --seconds $(SECONDS)

test: build system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .

bench: build
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/ledger.py

clean:
	rm -rf build $(VENV) switch/_speedups/*.so switch/_speedups/*.c _speedups/*.c
