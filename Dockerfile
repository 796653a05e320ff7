# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target gateway -t loomis-gateway .   # HTTP API + CLI, no torch (~200 MB)
#   docker build --target worker  -t loomis-worker  .   # GPU generator: CUDA torch + diffusers
# Both install exactly the versions in requirements/cuda.txt (`make lock` writes it), so an
# image built next month has the same packages as the one tested today.

# --- gateway: the base install only --------------------------------------------------------
FROM python:3.11-slim AS gateway
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOOMIS_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements ./requirements
COPY shared ./shared
COPY services ./services
# The lock as constraints: the base install's packages at the locked versions, no torch.
RUN pip install -c requirements/cuda.txt . \
 && useradd --create-home --uid 10001 loomis \
 && mkdir -p /data && chown loomis /data
USER 10001
EXPOSE 8000
# Migrations run at start (LOOMIS_DB__AUTO_MIGRATE=true).
CMD ["uvicorn", "services.gateway.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# --- worker: CUDA base + the locked CUDA environment (PyPI's torch wheels bundle CUDA 13) -----
FROM nvidia/cuda:13.0.1-base-ubuntu22.04 AS worker
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    LOOMIS_DATA_DIR=/data \
    LOOMIS_MODELS__CACHE_DIR=/models
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
WORKDIR /app
# The whole environment first (one cached layer), then Loomis itself without resolving again.
COPY requirements ./requirements
RUN pip install -r requirements/cuda.txt && pip check
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-deps ".[worker]" \
 && useradd --create-home --uid 10001 loomis \
 && mkdir -p /data /models && chown loomis /data /models
USER 10001
CMD ["python", "-m", "services.generator"]
