# syntax=docker/dockerfile:1
# One image for the API (the default command) and the training worker (`cnnserve worker`).
#
# Base: Debian bookworm's slim Python. The torch wheel pinned in pyproject.toml is PyPI's CUDA
# 12 build, which brings its own CUDA runtime, cuDNN and NCCL as wheels; the host's NVIDIA
# driver comes in through the NVIDIA Container Toolkit (`gpus`/device reservations). Being
# Debian also lets us install the Fashion-MNIST files from Debian's `dataset-fashion-mnist`.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    CNNSERVE_DATA_DIR=/data \
    CNNSERVE_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist

# Fashion-MNIST (the IDX .gz files under /usr/share/datasets/fashion-mnist). To use another
# copy, mount it and point CNNSERVE_FASHION_MNIST_DIR at it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 cnnserve \
    && useradd --system --uid 10001 --gid cnnserve --create-home --home-dir /home/cnnserve \
        --shell /usr/sbin/nologin cnnserve \
    && mkdir -p /app /data \
    && chown cnnserve:cnnserve /data

WORKDIR /app

# Dependencies in their own layer: it is rebuilt only when pyproject.toml changes, not when
# the code does. The list is read from pyproject.toml so the two cannot disagree.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code last; `--no-deps` because the layer above already installed them.
COPY README.md ./
COPY models ./models
COPY workers ./workers
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# The API's liveness; the worker serves no HTTP, so compose gives it its own check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["cnnserve", "api", "--host", "0.0.0.0", "--port", "8000"]
