#!/usr/bin/env bash
# Pack what the GPU machine lacks for bench/device/run.sh into $DEST (default .device, git-ignored):
# the Fashion-MNIST files, and wheels of the packages that the window's code imports and the
# device image does not have (its list: bench/device/image-packages.txt). Run here, in the
# repository's root; then carry `.device` in the device run.
#   PY_VERSION   the device's Python (3.12); tests/bench/test_device_window.py packs for this
#                machine's Python to prove the list complete in a venv like the device's
set -euo pipefail
cd "$(dirname "$0")/../.."
fmnist=${CNNSERVE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
py=${PYTHON:-python3}
dest=${DEST:-.device}
pyver=${PY_VERSION:-3.12}
rm -rf "$dest" && mkdir -p "$dest/whl" "$dest/fashion-mnist"
cp "$fmnist"/*-ubyte.gz "$dest/fashion-mnist/"
# what workers.settings, the engine, bench.train and the GPU tests' conftests import beyond the
# device image: settings and the job contract (pydantic, limits), the job store and Celery app
# (redis, celery); typing-extensions and click at the versions pydantic and Celery need
packages=(
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
  limits deprecated redis celery kombu billiard vine amqp click-didyoumean click-plugins
  click-repl prompt-toolkit wcwidth tzlocal tzdata typing-extensions click
)
# the versions this checkout's venv runs, where it has them, else pip's choice
pins=()
for p in "${packages[@]}"; do
  v=$("$py" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p' || true)
  pins+=("$p${v:+==$v}")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest/whl" "${pins[@]}"
du -sh "$dest"
