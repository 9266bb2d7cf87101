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
	@echo "make bench  - measure the hub next to raw Kafka clients on the same broker"
	@echo "make reliability - run the fault suite and record its table in docs/reliability.md"
	@echo "make soak   - the fault suite, each fault injected 5x as often, broker stops of 40 s"

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

# The fault suite also runs in `make test` (tests/faults); this records its numbers in docs/reliability.md.
reliability: install kafka-jars
	EVHUB_RELIABILITY_REPORT=docs/reliability.md $(PY) -m pytest tests/faults

soak: install kafka-jars
	EVHUB_FAULT_RUNS=5 EVHUB_FAULT_STOP_S=40 $(PY) -m pytest tests/faults

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
