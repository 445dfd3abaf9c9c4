# syntax=docker/dockerfile:1
# qlora-job image. Targets:
#   cuda (default, production):  docker build --target cuda -t qlora-job:cuda .     (make image)
#   cpu  (kind e2e, laptops):    docker build --target cpu  -t qlora-job:cpu-dev . (make image-cpu)
# Pin base images by digest through the build arguments, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@sha256:<digest>
# so that a mirror can be swapped in. Air-gapped: put wheels in wheelhouse/ (see its README).

# Digest as published for this tag (multi-arch index); could not be pulled from this build machine.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04@sha256:ac55d124da4882b497f732d8dfd9a702d5447a5f29d08d56da6f64f0a1eb34bc
ARG CPU_IMAGE=python:3.12-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

# cpu stages come first: the classic builder builds every stage before --target, and the
# last stage (cuda, production) is the default target.

#### STAGE: cpu-base ####
FROM ${CPU_IMAGE} AS cpu-base
RUN if ! command -v tini >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends tini ca-certificates && rm -rf /var/lib/apt/lists/*; fi

#### STAGE: cpu-builder ####
FROM cpu-base AS cpu-builder
ARG TORCH_VERSION
ARG CPU_TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md /src/
RUN python3 -m venv /opt/venv \
 && if ls /wheelhouse/*.whl >/dev/null 2>&1; then SRC="--no-index --find-links /wheelhouse"; else SRC="--extra-index-url ${CPU_TORCH_INDEX}"; fi \
 && pip install $SRC "torch==${TORCH_VERSION}" \
 && pip install $SRC $(python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; print(" ".join(p["dependencies"]))')
COPY job/ /src/job/
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then SRC="--no-index --find-links /wheelhouse"; else SRC=""; fi \
 && pip install $SRC --no-deps /src \
 && chmod -R g=u /opt/venv

#### STAGE: cpu (final) ####
# Every cache under /tmp: with readOnlyRootFilesystem only the /tmp emptyDir is writable.
FROM cpu-base AS cpu
COPY --from=cpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/home HF_HOME=/tmp/hf XDG_CACHE_HOME=/tmp/cache TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor HF_HUB_DISABLE_TELEMETRY=1
RUN useradd --uid 1000 --gid 0 --no-create-home --home-dir /tmp/home --shell /usr/sbin/nologin qlora
USER 1000:0
WORKDIR /tmp
LABEL org.opencontainers.image.title="qlora-job" \
      org.opencontainers.image.description="QLoRA fine-tuning job (CPU build, transformers engine)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "job"]

#### STAGE: cuda-base (Python and tini on the CUDA runtime) ####
FROM ${CUDA_IMAGE} AS cuda-base
# Skipped where the base already carries them (air-gapped mirrors of a prepared base).
RUN if ! command -v tini >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
      && rm -rf /var/lib/apt/lists/*; fi

#### STAGE: cuda-builder (dependencies in their own layer, then the project) ####
FROM cuda-base AS cuda-builder
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
COPY wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md /src/
RUN python3 -m venv /opt/venv \
 && if ls /wheelhouse/*.whl >/dev/null 2>&1; then SRC="--no-index --find-links /wheelhouse"; else SRC=""; fi \
 && pip install $SRC "torch==${TORCH_VERSION}" \
 && pip install $SRC $(python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; print(" ".join(p["dependencies"] + p["optional-dependencies"]["gpu"]))')
COPY job/ /src/job/
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then SRC="--no-index --find-links /wheelhouse"; else SRC=""; fi \
 && pip install $SRC --no-deps /src \
 && chmod -R g=u /opt/venv

#### STAGE: cuda (final, default) ####
# Every cache under /tmp: with readOnlyRootFilesystem only the /tmp emptyDir is writable.
FROM cuda-base AS cuda
COPY --from=cuda-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp/home HF_HOME=/tmp/hf XDG_CACHE_HOME=/tmp/cache TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor HF_HUB_DISABLE_TELEMETRY=1 UNSLOTH_DISABLE_STATISTICS=1
# uid 1000, group 0: OpenShift-style arbitrary uids in group 0 read the venv (group = owner
# rights, set in the builder so that no second copy of the venv lands in a layer).
RUN useradd --uid 1000 --gid 0 --no-create-home --home-dir /tmp/home --shell /usr/sbin/nologin qlora
USER 1000:0
WORKDIR /tmp
LABEL org.opencontainers.image.title="qlora-job" \
      org.opencontainers.image.description="QLoRA fine-tuning job (Unsloth on CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# tini is PID 1: it forwards SIGTERM to Python and reaps children (data loader workers).
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "job"]
