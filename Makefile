# Entry points for people and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/projects/v1/*.proto)

.DEFAULT_GOAL := help
.PHONY: help setup proto run flower test tools lint typecheck faults cluster-test cluster-bench bench clean

help:
	@echo "make run    - run the embedded broker, the gateway, a worker and the sample site"
	@echo "make test   - lint, type-check and run the whole test suite"
	@echo "make proto  - regenerate the Python stubs from protos/"
	@echo "make bench  - run the benchmarks (bench/results.json)"
	@echo "make cluster-test - the service on many hosts (network namespaces; root)"
	@echo "make cluster-bench - pages/s with 1, 2 and 4 worker hosts (network namespaces; root)"
	@echo "make flower - run Flower, the Celery monitor, against the configured broker"

# Three distributions, installed together: the generated stubs (protos/), the client and the
# `harvester` command (clients/python/, what a service that calls us installs), the server.
$(STAMP): pyproject.toml constraints.txt protos/pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e protos -e clients/python -e ".[dev,embedded,bench]"
	touch $(STAMP)

setup: $(STAMP)

# googleapis-common-protos ships google/type/*.proto beside its modules: the contract imports
# google/type/date.proto from there (its generated module comes with that package too).
GOOGLEAPIS = $(shell $(BIN)/python -c "import google.type.date_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])")

proto: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) \
	  --python_out=protos --grpc_python_out=protos \
	  --mypy_out=protos --mypy_grpc_out=protos $(PROTO_SRC)
	$(BIN)/python -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) --include_source_info \
	  --include_imports --descriptor_set_out=protos/projects/v1/descriptor_set.binpb $(PROTO_SRC)

run: $(STAMP)
	$(BIN)/python -m devstack

# Flower (the optional extra `.[flower]`) on FLOWER_ADDRESS:FLOWER_PORT, localhost by default; it
# logs "Visit me at http://...". The dev install has it; elsewhere this target installs it.
FLOWER_ADDRESS ?= 127.0.0.1
FLOWER_PORT ?= 5555
flower: $(STAMP)
	@$(BIN)/python -c "import flower" 2>/dev/null || $(BIN)/pip install --quiet -c constraints.txt -e ".[embedded,flower]"
	$(BIN)/celery -A worker.app flower --address=$(FLOWER_ADDRESS) --port=$(FLOWER_PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# System tools the tests drive (Debian's prometheus and chromium), installed when missing.
tools: $(STAMP)
	$(BIN)/python -m tests.support.tools

test: lint typecheck tools
	$(BIN)/pytest

faults: $(STAMP)
	$(BIN)/pytest tests/faults

# Many hosts: each a network namespace on a bridge (root and iproute2 needed; tests/cluster/).
cluster-test: $(STAMP)
	$(BIN)/pytest tests/cluster -m "not cluster_bench"

# The many-hosts throughput figure (1, 2 and 4 worker hosts), in bench/README.md's table format.
cluster-bench: $(STAMP)
	$(BIN)/pytest tests/cluster -m cluster_bench -s

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache .pytest_cache
