# Fleet's commands. `make up` serves the example fleet; `make test` runs every test.
# Both create the virtual environment and install what they need on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | cksum | cut -d' ' -f1)

# Ray 2.60 turns token auth on for new local clusters; its CLIs must say so too.
export RAY_AUTH_MODE ?= token
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_SERVE_LOG_TO_STDERR ?= 0

.PHONY: install browser up down test check bench eval schema

$(STAMP): requirements.lock pyproject.toml
	@echo "[1/3] creating $(VENV) ..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[2/3] installing $$(grep -c '==' requirements.lock) pinned packages (requirements.lock; about 3 GB, minutes on a first run) ..."
	@# One line per package as pip takes it; pip's "Location ... is ignored" lines come from this machine's pip config: noise.
	@bash -o pipefail -c '$(BIN)/pip install --progress-bar off --disable-pip-version-check --no-deps -r requirements.lock 2>&1 | { grep -E "^(Collecting|Installing|Successfully|ERROR)" || true; }'
	@echo "[3/3] installing fleet (editable) ..."
	@bash -o pipefail -c '$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }'
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

CONFIG ?= configs/local.yaml

up: install
	$(BIN)/fleet up --config $(CONFIG)

down:
	$(BIN)/fleet down

# The explanation and approvals inbox pages' tests use a real headless browser: Debian's
# chromium (the inbox test drives it with Playwright, whose own browser downloads it never runs).
browser:
	@command -v chromium >/dev/null || { echo "installing chromium (Debian's package) for the browser test ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

test: install browser
	$(BIN)/python -m pytest tests/unit tests/integration tests/evals tests/e2e

# Every agent's eval suites against a running fleet (`make up`'s, on the real engine).
EVAL_URL ?= http://127.0.0.1:8000
eval: install
	$(BIN)/fleet eval --url $(EVAL_URL) --output loadtests/results/$$(date +%F)-eval.json

check: install
	$(BIN)/ruff check serve tests agents loadtests
	$(BIN)/ruff format --check serve tests agents loadtests
	$(BIN)/mypy

bench: install
	$(BIN)/python loadtests/bench.py
	$(BIN)/python loadtests/bench_llm.py
	$(BIN)/python loadtests/report.py
	$(BIN)/python loadtests/bench_governance.py
	$(BIN)/python loadtests/bench_memory.py

schema: install
	$(BIN)/fleet schema -o agents/agent.schema.json
	$(BIN)/fleet schema --policy-input -o docs/policy-input.schema.json
