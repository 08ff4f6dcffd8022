#!/usr/bin/env bash
# One prepared GPU window: `python -m bench window` (see bench/window.py), everything into $OUT.
#   here:   bench/device/prepare.sh              (wheels and Fashion-MNIST into .device)
#   there:  bench/device/run.sh  with `.device` carried and timeout_s 540: the plan ends by
#           itself within BUDGET (450 s), its JSON rewritten after every run, every log in $OUT
# Afterwards, here: the JSON's `train` entries are `bench train` reports (python -m bench train
# --render ...). DRY_RUN=1 does the same on a CPU without training (imports, the GPU tests'
# collection, every step's arguments). STEPS=vgg,resnet18 reruns only those steps.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/cnnserve-window}
py=${PYTHON:-python3}
dir=${DEVICE_DIR:-.device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export CNNSERVE_FASHION_MNIST_DIR=${CNNSERVE_FASHION_MNIST_DIR:-$PWD/$dir/fashion-mnist}
if compgen -G "$dir/whl/*.whl" >/dev/null; then
  site=${SITE_DIR:-/tmp/cnnserve-site}
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$dir"/whl/*.whl 2>&1 | tee -a "$out/window.log"
  [ "${PIPESTATUS[0]}" = 0 ] || exit 1
  export PYTHONPATH=$PYTHONPATH:$site
fi
args=(--out "$out" --budget "${BUDGET:-450}" --device "${DEVICE:-cuda}")
[ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
[ -n "${DRY_RUN:-}" ] && args+=(--dry-run)
exec "$py" -m bench window "${args[@]}"
