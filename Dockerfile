# One image for the API (the default command) and the training worker (`cnnserve worker`).
#
# Base: Debian bookworm's slim Python (any Debian bookworm image with python3 and its venv
# module will do: PYTHON_IMAGE). Debian, so Fashion-MNIST comes from Debian's
# `dataset-fashion-mnist`. The Python packages go into a virtual environment at /opt/venv.
#
# PyTorch: by default the torch wheel pinned in pyproject.toml comes from the package index,
# and PyPI's build of torch 2.14.1 is for CUDA 13.0: it brings its own CUDA runtime, cuDNN and
# NCCL as wheels, and needs an NVIDIA driver 580 or newer on a GPU host (the driver comes in
# through the NVIDIA Container Toolkit). For an older driver, or a CPU-only image, take torch
# and torchvision from PyTorch's own index instead, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126   (driver 525 or newer)
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu     (no CUDA at all)
# Behind a firewall: PIP_INDEX_URL (a mirror), PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS (a
# wheelhouse) and PIP_TRUSTED_HOST are passed to pip as they are.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_TRUSTED_HOST=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_COMPILE=1 \
    MPLBACKEND=Agg \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CNNSERVE_DATA_DIR=/data \
    CNNSERVE_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist

SHELL ["/bin/sh", "-eu", "-c"]

# Fashion-MNIST (the IDX .gz files under /usr/share/datasets/fashion-mnist). To use another
# copy, mount it and point CNNSERVE_FASHION_MNIST_DIR at it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt/* /var/log/dpkg.log

RUN groupadd --system --gid 10001 cnnserve \
    && useradd --system --uid 10001 --gid cnnserve --create-home --home-dir /home/cnnserve \
        --shell /usr/sbin/nologin cnnserve \
    && mkdir -p /app /data \
    && chown cnnserve:cnnserve /data

WORKDIR /app

# Dependencies in their own layer: it is rebuilt only when pyproject.toml (or a build argument)
# changes, not when the code does. The list is read from pyproject.toml so the two cannot
# disagree; the build requirements (setuptools, wheel) come along, so that the code's own
# install below needs no index. Build arguments left empty are unset: pip keeps its defaults.
COPY pyproject.toml ./
RUN for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do \
        if [ -z "$(printenv "$name" || true)" ]; then unset "$name"; fi; \
    done \
    && python3 -m venv /opt/venv \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires'] + ['wheel']))" \
        > /tmp/requirements.txt \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
        grep -E '^(torch|torchvision)==' /tmp/requirements.txt > /tmp/torch.txt; \
        pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt; \
    fi \
    && pip install -r /tmp/requirements.txt \
    && find /opt/venv -depth -type d -name __pycache__ -exec rm -rf {} + \
    && rm -f /tmp/requirements.txt /tmp/torch.txt

# The code last; `--no-deps` because the layer above installed the dependencies, and the
# venv's own setuptools builds it (no index needed for this step).
COPY README.md ./
COPY models ./models
COPY workers ./workers
COPY service ./service
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && find /opt/venv -depth -type d -name __pycache__ -exec rm -rf {} +

USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000

# The API's liveness; the worker serves no HTTP, so compose gives it its own check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["cnnserve", "api", "--host", "0.0.0.0", "--port", "8000"]
