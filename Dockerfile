# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target gateway -t loomis-gateway .   # HTTP API + CLI, no torch (~200 MB)
#   docker build --target worker  -t loomis-worker  .   # GPU generator: CUDA torch + diffusers

# --- gateway: the base install only --------------------------------------------------------
FROM python:3.11-slim AS gateway
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOOMIS_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install . \
 && useradd --create-home --uid 10001 loomis \
 && mkdir -p /data && chown loomis /data
USER 10001
EXPOSE 8000
# Migrations run at start (LOOMIS_DB__AUTO_MIGRATE=true).
CMD ["uvicorn", "services.gateway.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# --- worker: CUDA runtime + torch from the CUDA index, then the worker extra ----------------
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS worker
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    LOOMIS_DATA_DIR=/data \
    LOOMIS_GENERATOR__MODEL_CACHE=/models
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
# torch first, from the CUDA index, so `.[worker]` finds it satisfied instead of pulling the
# PyPI build.
RUN pip install "torch>=2.3" --index-url "${TORCH_INDEX_URL}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install ".[worker]" \
 && useradd --create-home --uid 10001 loomis \
 && mkdir -p /data /models && chown loomis /data /models
USER 10001
CMD ["python", "-m", "services.generator"]
