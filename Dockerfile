# syntax=docker/dockerfile:1
# qlora-job image. Targets:
#   cuda (default, production):  make image       (docker build --target cuda -t qlora-job:cuda .)
#   cpu  (kind e2e, laptops):    make image-cpu   (docker build --target cpu  -t qlora-job:cpu-dev .)
# Both build on one base: Debian bookworm with Python 3.11, its headers and a C compiler (Triton
# compiles a launcher at run time), tini. `make base-image` makes it with debootstrap, no registry
# needed; debian:bookworm-slim (pin it by digest) works too, the base stage adds what it lacks.
# The CUDA runtime comes inside the torch wheel's own nvidia-* libraries; the driver is injected
# by the NVIDIA container runtime. Each target installs exactly one lock file, hashes checked:
# requirements/cuda.txt (torch 2.11.0, CUDA 13) or requirements/cpu.txt (torch 2.13.0+cpu).
# Offline (air-gapped, or this build machine): `make wheelhouse` first (see wheelhouse/README.md).
ARG BASE_IMAGE=debian:bookworm-slim

# cpu stages come before cuda: the classic builder builds every stage up to --target, and the
# last stage (cuda, production) is the default target.

#### STAGE: base (both targets) ####
FROM ${BASE_IMAGE} AS base
# uid 1000 is made only where it is free: Ubuntu-based images already have uid 1000 (`ubuntu`), and
# the job needs the uid, not the name. Group 0: arbitrary uids (OpenShift) run in group 0.
RUN set -e; missing=""; \
    for p in python3 python3-venv python3-dev gcc libc6-dev tini ca-certificates; do \
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done; \
    if [ -n "$missing" ]; then apt-get update && apt-get install -y --no-install-recommends $missing \
      && rm -rf /var/lib/apt/lists/*; fi; \
    getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 0 --no-create-home --home-dir /tmp/home \
      --shell /usr/sbin/nologin qlora
# Every cache under /tmp: with readOnlyRootFilesystem only the /tmp emptyDir is writable.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp/home HF_HOME=/tmp/hf XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/triton TORCHINDUCTOR_CACHE_DIR=/tmp/inductor HF_HUB_DISABLE_TELEMETRY=1 \
    CC=gcc

#### STAGE: sources (the wheels and the lock files; only the builders start from it) ####
FROM base AS sources
COPY container/install-venv.sh /usr/local/bin/install-venv
COPY wheelhouse/ /wheelhouse/
COPY requirements/ /src/requirements/

#### STAGE: cpu-builder ####
FROM sources AS cpu-builder
RUN install-venv deps /src/requirements/cpu.txt
COPY pyproject.toml README.md /src/
COPY job/ /src/job/
RUN install-venv project

#### STAGE: cpu (final) ####
FROM base AS cpu
COPY --from=cpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER 1000:0
WORKDIR /tmp
LABEL org.opencontainers.image.title="qlora-job" \
      org.opencontainers.image.description="QLoRA fine-tuning job (CPU build, transformers engine)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "job"]

#### STAGE: cuda-builder ####
FROM sources AS cuda-builder
RUN install-venv deps /src/requirements/cuda.txt
COPY pyproject.toml README.md /src/
COPY job/ /src/job/
RUN install-venv project

#### STAGE: cuda (final, default) ####
FROM base AS cuda
COPY --from=cuda-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH UNSLOTH_DISABLE_STATISTICS=1 \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:0
WORKDIR /tmp
LABEL org.opencontainers.image.title="qlora-job" \
      org.opencontainers.image.description="QLoRA fine-tuning job (Unsloth on CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# tini is PID 1: it forwards SIGTERM to Python and reaps children (data loader workers).
ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "job"]
