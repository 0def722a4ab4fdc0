# GPU image: CUDA runtime + Python 3.11 + Java 17 (TorchServe's frontend) + ldmprobe.
# Build: docker build -t ldmprobe .      Run: docker run --gpus all -p 127.0.0.1:8080:8080 ldmprobe
# Real weights: mount a diffusers-format SD v1.4 folder and pass MODEL=/weights/sd-v1-4.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common openjdk-17-jre-headless make git curl \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt pyproject.toml README.md Makefile config.properties ./
COPY ldmprobe ldmprobe
COPY handlers handlers
COPY training training
COPY docker docker
# Same install as `make install`; xformers is an opt-in attention backend on CUDA.
RUN make install PYTHON=python3.11
RUN .venv/bin/pip install xformers || echo "xformers unavailable for this torch: the sdpa backend only"

ENV PATH=/app/.venv/bin:$PATH TORCHINDUCTOR_CACHE_DIR=/app/.cache/inductor
ENTRYPOINT ["docker/entrypoint.sh"]
