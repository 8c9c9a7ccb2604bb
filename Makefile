# qat: top-level targets. `make pipeline` builds and runs the main pipeline on the default
# model; `make test` runs the test suite (what CI runs). See README.md.

QAT_DATA ?= ../shared/data
# Absolute, because cargo runs each crate's tests from that crate's directory.
override QAT_DATA := $(abspath $(QAT_DATA))
export QAT_DATA
CARGO ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
BIN := $(TARGET_DIR)/release
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYARROW_VERSION := 26.0.1
SAFETENSORS_VERSION := 0.8.0
NUMPY_VERSION := 2.3.5
PY_DEPS := pyarrow==$(PYARROW_VERSION) safetensors==$(SAFETENSORS_VERSION) numpy==$(NUMPY_VERSION)
# The stamp names every pinned version, so changing one reinstalls.
PY_STAMP := $(VENV)/.deps-pyarrow-$(PYARROW_VERSION)-safetensors-$(SAFETENSORS_VERSION)-numpy-$(NUMPY_VERSION)
OUT ?= out

.PHONY: all setup build test test-deps pipeline clean help

all: build

help:
	@echo "make pipeline   build, then run pipelines/llm-qat.mk on $(QAT_DATA)/models/stories260K"
	@echo "make test       the test suite (CI runs exactly this)"
	@echo "make build      release binaries into $(BIN)"

setup: build test-deps

build:
	$(CARGO) build --release --locked --bins

# Python with pyarrow (shards) and safetensors + numpy (packed models), used by the
# foreign-reader tests of the file formats.
test-deps: $(PY_STAMP)
$(PY_STAMP):
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check $(PY_DEPS)
	touch $@

test: test-deps
	QAT_PYTHON=$(abspath $(PYTHON)) $(CARGO) test --release --locked --workspace

pipeline: build
	$(MAKE) -f pipelines/llm-qat.mk BIN=$(BIN) QAT_DATA=$(QAT_DATA) OUT=$(OUT)

clean:
	rm -rf $(OUT)
