# Two commands on a fresh clone: `make demo` and `make test`. Each installs what it needs: a .venv via pip
# (pinned by constraints.txt) and the Kafka broker jars via Maven (cached outside git, see docs/operations.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install kafka-jars lint typecheck test demo bench bench-quick reliability soak clean

help:
	@echo "make demo   - start Kafka and the hub, run the main job on embedded defaults"
	@echo "make test   - install, lint (ruff), type-check (mypy --strict), run every test against a real broker"
	@echo "make bench  - measure the hub next to raw Kafka clients on the same broker (and on a 3-broker cluster)"
	@echo "make reliability - run the fault suites and record their tables in docs/reliability.md"
	@echo "make soak   - the fault suites, each fault injected 5x as often, broker stops of 40 s"

# pip's and setuptools' own chatter goes to .venv/install.log; it is printed only if the install fails.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	@$(PY) -m pip install -q --upgrade pip > $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@$(PY) -m pip install -q -c constraints.txt -e '.[dev]' >> $(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	touch $(STAMP)

install: $(STAMP)

kafka-jars: $(STAMP)
	$(PY) -m services.shared.local_kafka

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: install kafka-jars lint typecheck
	$(PY) -m pytest

demo: install kafka-jars
	$(VENV)/bin/evhub demo

bench: install kafka-jars
	$(PY) -m bench

bench-quick: install kafka-jars
	$(PY) -m bench --quick

# The fault suites also run in `make test` (tests/faults: one broker; tests/cluster: three brokers); this records
# their numbers in docs/reliability.md.
FAULT_TESTS := tests/faults tests/cluster

reliability: install kafka-jars
	EVHUB_RELIABILITY_REPORT=docs/reliability.md $(PY) -m pytest $(FAULT_TESTS)

soak: install kafka-jars
	EVHUB_FAULT_RUNS=5 EVHUB_FAULT_STOP_S=40 $(PY) -m pytest $(FAULT_TESTS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
