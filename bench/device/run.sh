#!/usr/bin/env bash
# One prepared run on a CUDA machine: the GPU tests, then the training benchmark (cnnserve
# 10 epochs x 3 seeds, the d2l way 2 epochs x seed 0), results as JSON into $OUT. Each step has
# its own time limit so a slow one cannot take the others' results with it. Afterwards, here:
#   cp <files_at>/bench-train-cuda-*.json docs/ && python -m bench train --render \
#       docs/bench-train-cuda-lenet.json,docs/bench-train-cuda-resnet18.json,...
# Needs `.device` from bench/device/prepare.sh (carry it). STEP_S scales every limit.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/cnnserve-device-out}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
scale=${STEP_S:-1}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export CNNSERVE_FASHION_MNIST_DIR=$PWD/.device/fashion-mnist
if ! "$py" -c "import pydantic_settings, celery, redis" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/cnnserve-site .device/whl/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/cnnserve-site
fi
limit() { echo $(( $1 * scale )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

status=0
timeout "$(limit 150)" "$py" -m pytest -q -m gpu -p no:cacheprovider tests/workers \
  2>&1 | tee "$out/gpu-tests.log" || status=1

# cheapest first; VGG at 224px is the longest
for model in lenet resnet18 vgg; do
  timeout "$(limit "$([ $model = lenet ] && echo 90 || echo 170)")" \
    "$py" -m bench train --device "$device" --models "$model" --epochs "${EPOCHS:-10}" \
    --d2l-epochs "${D2L_EPOCHS:-2}" --seeds "${SEEDS:-0,1,2}" --d2l-seeds 0 \
    --train-limit "${TRAIN_LIMIT:-all}" --val-limit "${VAL_LIMIT:-all}" \
    --fashion-mnist-dir "$CNNSERVE_FASHION_MNIST_DIR" --no-doc --no-plot \
    --out "$out/bench-train-$device-$model.json" 2>&1 | tail -n 25 || status=1
done
exit $status
