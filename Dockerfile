# ldmprobe GPU image: CUDA runtime + Python 3.11 + Java 17 (TorchServe's frontend) + the project.
#   docker build -t ldmprobe .
#   docker run --gpus all -p 127.0.0.1:8080:8080 -v /weights/sd-v1-4:/models/sd:ro \
#       -v /weights/banks:/banks:ro -v /weights/vgg:/vgg:ro -e MODEL=/models/sd \
#       -e BANK=/banks/sd14.safetensors -e CLASSIFIER=/vgg/vgg16.safetensors -e TINY_DECODER=/vgg/taesd ldmprobe
# Serves the probe and classify models (ARCHIVES). Without MODEL it serves the built-in tiny
# model (fitting a small bank at first start); without CLASSIFIER, a random-init VGG-16 (flagged).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        software-properties-common openjdk-17-jre-headless make curl ca-certificates \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 ldmprobe
WORKDIR /app
COPY requirements.txt pyproject.toml README.md Makefile config.properties ./
COPY ldmprobe ldmprobe
COPY handlers handlers
COPY training training
COPY scripts scripts
COPY docker docker
# The same install as `make install` on a bare machine; xformers is an optional backend on CUDA.
RUN make install PYTHON=python3.11
RUN .venv/bin/pip install xformers || echo "xformers unavailable for this torch build: sdpa only"
RUN mkdir -p model_store runs .cache && chown -R ldmprobe:ldmprobe /app
USER ldmprobe

ENV PATH=/app/.venv/bin:$PATH TORCHINDUCTOR_CACHE_DIR=/app/.cache/inductor
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=1800s --retries=3 CMD ["docker/healthcheck.sh"]
ENTRYPOINT ["docker/entrypoint.sh"]
