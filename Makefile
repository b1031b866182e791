# Entry points for people and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/projects/v1/*.proto)

.DEFAULT_GOAL := help
.PHONY: help setup proto run test lint typecheck faults bench clean

help:
	@echo "make run    - run the embedded broker, the gateway, a worker and the sample site"
	@echo "make test   - lint, type-check and run the whole test suite"
	@echo "make proto  - regenerate the Python stubs from protos/"
	@echo "make bench  - run the benchmarks (bench/results.json)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,embedded,bench]"
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

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

faults: $(STAMP)
	$(BIN)/pytest tests/faults

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) data .mypy_cache .ruff_cache .pytest_cache
