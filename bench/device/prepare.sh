#!/usr/bin/env bash
# Pack what a bare GPU machine lacks for bench/device/run.sh into .device/ (git-ignored):
# the Fashion-MNIST files and wheels of the packages its Python lacks (it has torch,
# torchvision, numpy, matplotlib, safetensors, pytest and Pillow, but no pydantic or Celery).
# Run here, in the repository root; then carry `.device` in the device run.
set -euo pipefail
cd "$(dirname "$0")/../.."
fmnist=${CNNSERVE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
py=${PYTHON:-python3}
rm -rf .device && mkdir -p .device/whl .device/fashion-mnist
cp "$fmnist"/*-ubyte.gz .device/fashion-mnist/
# what the engine, the GPU tests' conftests and the benchmark import beyond the GPU image
packages=(
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
  redis celery kombu billiard vine amqp click-didyoumean click-plugins click-repl
  prompt-toolkit wcwidth tzlocal typing-extensions click
)
# the versions this checkout's venv runs, where it has them, else pip's choice
pins=()
for p in "${packages[@]}"; do
  v=$("$py" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p' || true)
  pins+=("$p${v:+==$v}")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .device/whl "${pins[@]}"
du -sh .device
