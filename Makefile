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
GGUF_VERSION := 0.19.0
# llama.cpp itself (as vendored by llama-cpp-python 0.3.36: ggml 0.25.3), built from the PyPI source archive
# (~4 min on 2 cores, once): tests/gguf_cli.rs runs the exported GGUF files in it.
LLAMA_CPP_PYTHON_VERSION := 0.3.36
# llama-cpp-python's own dependencies are among PY_DEPS; it is installed on its own (below).
PY_DEPS := pyarrow==$(PYARROW_VERSION) safetensors==$(SAFETENSORS_VERSION) numpy==$(NUMPY_VERSION) gguf==$(GGUF_VERSION) \
	diskcache==5.6.3 jinja2==3.1.6 MarkupSafe==3.0.4 typing-extensions==4.16.0
# Only the library: no llava, examples, tests or curl; ggml's portable x86-64 kernels (SSE4.2, AVX,
# AVX2, BMI2, FMA, F16C: its defaults without GGML_NATIVE), not -march=native, which on a VM whose
# CPU advertises AMX that its kernel does not grant compiled tile instructions that trapped
# (tileloadd: invalid opcode, in the Q4_0 tests of tests/gguf_cli.rs).
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF
# The stamp names every pinned version and the llama.cpp build's CPU target, so changing one
# reinstalls; llama-cpp-python is then rebuilt even where installed (--force-reinstall) and
# without pip's wheel cache, which keys a source build by the archive, not by CMAKE_ARGS.
PY_STAMP := $(VENV)/.deps-pyarrow-$(PYARROW_VERSION)-safetensors-$(SAFETENSORS_VERSION)-numpy-$(NUMPY_VERSION)-gguf-$(GGUF_VERSION)-llama-cpp-python-$(LLAMA_CPP_PYTHON_VERSION)-ggml-portable
OUT ?= out

.PHONY: all setup build test test-deps lint pipeline pipeline-gguf pipeline-bitdistiller plots fuzz clean help

all: build

help:
	@echo "make pipeline   build, then run pipelines/llm-qat.mk on $(QAT_DATA)/models/stories260K"
	@echo "make test       the test suite (CI runs exactly this)"
	@echo "make lint       rustfmt check, clippy and rustdoc (warnings are errors) of the workspace"
	@echo "make pipeline-gguf   the pipeline's weight-only students as GGUF, perplexity in llama.cpp itself"
	@echo "make pipeline-bitdistiller   clip -> CAKLD QAT -> pack -> eval (pipelines/bitdistiller.mk)"
	@echo "make plots      FKL vs CAKLD loss curves of the BitDistiller students (PNG, qat-report)"
	@echo "make bench      CPU speed against PyTorch references (bench/RESULTS.md)"
	@echo "make fuzz       cargo-fuzz the readers and the scheme parser (nightly)"
	@echo "make build      release binaries into $(BIN)"
	@echo "make cuda-toolkit build-cuda   CUDA binaries (no GPU needed), packed into $(CUDA_DIST)"
	@echo "make bench-gpu / pipeline-gpu  on a GPU machine: speed vs PyTorch, stories260K on cuda"
	@echo "make sanitize-gpu              on a GPU machine: the CUDA kernel tests under compute-sanitizer"

setup: build test-deps

build:
	$(CARGO) build --release --locked --bins

# Python with pyarrow (shards), safetensors + numpy (packed models), llama.cpp's gguf package
# and llama.cpp itself (GGUF export), used by the foreign-reader tests of the file formats.
test-deps: $(PY_STAMP)
$(PY_STAMP):
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check $(PY_DEPS)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PYTHON) -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps --force-reinstall \
		llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	touch $@

test: test-deps
	QAT_PYTHON=$(abspath $(PYTHON)) $(CARGO) test --release --locked --workspace

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --release --locked --workspace --no-deps

pipeline: build
	$(MAKE) -f pipelines/llm-qat.mk BIN=$(BIN) QAT_DATA=$(QAT_DATA) OUT=$(OUT)

# The pipeline's weight-only students as GGUF files, run in llama.cpp itself (perplexity next to
# qat-eval's); needs the test venv (llama-cpp-python, built by test-deps).
pipeline-gguf: build test-deps
	$(MAKE) -f pipelines/llm-qat.mk gguf BIN=$(BIN) QAT_DATA=$(QAT_DATA) OUT=$(OUT) LLAMA_CPP_PYTHON=$(abspath $(PYTHON))

# BitDistiller: the same cached shards -> qat-clip -> qat-distill --loss cakld -> qat-pack -> qat-eval.
pipeline-bitdistiller: build
	$(MAKE) -f pipelines/bitdistiller.mk BIN=$(BIN) QAT_DATA=$(QAT_DATA) OUT=$(OUT)

# Loss curves of the BitDistiller students trained with both losses (LOSS=fkl and cakld).
plots: build
	$(MAKE) -f pipelines/bitdistiller.mk BIN=$(BIN) QAT_DATA=$(QAT_DATA) OUT=$(OUT) plots

# cargo-fuzz targets (shard reader, packed reader, scheme parser); needs a nightly toolchain and
# cargo-fuzz; FUZZ_SECONDS per target (default 180). See fuzz/README.md.
fuzz:
	bash fuzz/run.sh

clean:
	rm -rf $(OUT)

# CPU speed of qat-sample / qat-distill / qat-eval against PyTorch references, back to back, 2 threads
# (not part of `make test`; ~20-25 min at 3 repeats; installs a pinned torch + transformers venv the first time,
# in $(BENCH_VENV)). Results and method: bench/RESULTS.md. E.g. `make bench BENCH_FLAGS="--repeats 1"`.
BENCH_VENV ?= $(HOME)/.cache/qat/bench-venv
BENCH_FLAGS ?=
.PHONY: bench
bench: build
	BENCH_VENV=$(BENCH_VENV) bash bench/run.sh --bin $(BIN) --data $(QAT_DATA) $(BENCH_FLAGS)

# --- CUDA (README.md, "CUDA"). Nothing here runs in `make test` or CI. ---
# `make cuda-toolkit`: nvcc + headers + libraries from pinned PyPI wheels (CUDA 13.0) into
# $(CUDA_VENV), plus the libcuda link stub (scripts/cuda-toolkit.sh); no GPU needed.
# `make build-cuda`: the binaries with `--features cuda` into $(CUDA_TARGET_DIR) (a separate target
# dir, so CPU builds stay valid), then stripped and packed into $(CUDA_DIST)/qat-cuda-bin.tar.xz
# for carrying to a GPU machine. `make bench-gpu` / `make pipeline-gpu` run ON that machine.
# CUDA_TESTS=1 also packs the unit tests of qat-model, qat-quant, qat-train, qat-sample and qat-clip (their CUDA
# cases check kernels and the clipping search against the CPU; they rebuild candle with the test feature set,
# ~20 more minutes on 2 cores); bench/gpu/run.sh runs them.
CUDA_VENV ?= $(HOME)/.cache/qat/cuda-venv
CUDA_TARGET_DIR ?= target-cuda
CUDA_COMPUTE_CAP ?= 90
CUDA_DIST ?= dist/cuda
CUDA_BIN ?= $(CUDA_DIST)/bin
.PHONY: cuda-toolkit build-cuda bench-gpu pipeline-gpu sanitize-gpu

cuda-toolkit:
	$(CARGO) fetch --locked
	bash scripts/cuda-toolkit.sh $(CUDA_VENV)

build-cuda: cuda-toolkit
	CUDA_HOME=$$(bash scripts/cuda-toolkit.sh $(CUDA_VENV)) && export CUDA_HOME && \
	PATH="$$CUDA_HOME/bin:$$PATH" CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) \
	$(CARGO) build --release --locked --bins --features cuda --target-dir $(CUDA_TARGET_DIR)
	rm -f $(CUDA_TARGET_DIR)/cuda-tests.txt
ifeq ($(CUDA_TESTS),1)
	CUDA_HOME=$$(bash scripts/cuda-toolkit.sh $(CUDA_VENV)) && export CUDA_HOME && \
	PATH="$$CUDA_HOME/bin:$$PATH" CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) \
	$(CARGO) test --release --locked --features cuda --target-dir $(CUDA_TARGET_DIR) -p qat-model -p qat-quant -p qat-train -p qat-sample -p qat-clip --lib \
	    --no-run --message-format=json-render-diagnostics > $(CUDA_TARGET_DIR)/cuda-tests.json
	python3 scripts/test-executables.py < $(CUDA_TARGET_DIR)/cuda-tests.json > $(CUDA_TARGET_DIR)/cuda-tests.txt
endif
	bash scripts/dist-cuda.sh $(CUDA_TARGET_DIR)/release $(CUDA_DIST) $(QAT_DATA) $(CUDA_TARGET_DIR)/cuda-tests.txt

# On the GPU machine, from the repo root, with $(CUDA_DIST)/qat-cuda-bin.tar.xz and $(CUDA_DIST)/data
# carried there (no Rust needed): the speed table against PyTorch (bench/gpu/bench_gpu.py, < 10 min
# on an H100; RECORD=1 appends it to bench/RESULTS.md), and the stories260K pipeline on cuda
# compared with the CPU perplexities. BENCH_GPU_SMOKE=1 make bench-gpu: the harness on the CPU.
BENCH_GPU_FLAGS ?=
bench-gpu:
	BENCH_VENV=$(BENCH_VENV) bash bench/gpu/run.sh bench $(if $(RECORD),--record) $(BENCH_GPU_FLAGS)

pipeline-gpu:
	bash bench/gpu/run.sh pipeline

# The packed CUDA kernel tests (CUDA_TESTS=1) under compute-sanitizer memcheck and racecheck.
sanitize-gpu:
	bash bench/gpu/run.sh sanitize
