# qlora-job: `make demo` runs one job end to end on CPU; `make test` runs the tests.
# Both set up .venv themselves (CPU torch first, then the project).

PYTHON        ?= python3
VENV          ?= .venv
TORCH_VERSION ?= 2.13.0
# Optional extra index for torch, e.g. https://download.pytorch.org/whl/cpu for a CPU-only build.
TORCH_INDEX   ?=
PYTEST_ARGS   ?=
BIN           := $(VENV)/bin
STAMP         := $(VENV)/.installed-$(TORCH_VERSION)

.DEFAULT_GOAL := help

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} /^[a-zA-Z_-]+:.*?##/ { printf "  %-14s %s\n", $$1, $$2 } /^##@/ { printf "\n%s\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: install
install: $(STAMP) ## Create .venv with CPU torch and the project (editable, dev extra)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

.PHONY: demo
demo: install ## Run the job end to end: local S3 server, tiny model, bundled sample data, CPU
	$(BIN)/python -m job.demo

.PHONY: test
test: install ## Run the test suite (CPU; GPU tests are deselected)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: lint
lint: install ## Lint with ruff
	$(BIN)/ruff check job tests bench

.PHONY: docs
docs: install ## Regenerate the variable table in docs/configuration.md from job/settings.py
	$(BIN)/python -c 'import re, subprocess, sys; p = "docs/configuration.md"; t = subprocess.check_output([sys.executable, "-m", "job", "config", "--env-docs", "--markdown"], text=True); s = open(p).read(); open(p, "w").write(re.sub(r"(<!-- env-docs:start -->\n).*(<!-- env-docs:end -->)", lambda m: m.group(1) + t + m.group(2), s, flags=re.S))'

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .work
