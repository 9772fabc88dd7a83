#!/usr/bin/env bash
# The GPU checks of one device lease, as one command (about 6-8 minutes on one H100/H200):
#
#   make gpu-wheels                      # here, once: the packages the device image lacks, in .whl/gpu
#   device run: bash benchmarks/gpu_checks.sh        carry: [".whl/gpu"], timeout_s: 600
#
# 1. installs the carried wheels into the image's python3 (nothing can be fetched there; --no-deps: the image's
#    torch, numpy, pandas, pyarrow and tokenizers stay), 2. `pytest -m gpu` (tests/test_cuda.py: the CUDA paths
#    against the CPU ones, fsdp on one GPU and, with two, on two), 3. benchmarks/distill_gpu.py: tokens/s, MFU
#    and peak memory of CE and online KD with strategy single, and online KD with strategy fsdp over every GPU.
# Logs and distill_gpu.json land in $OUT (the device run brings them back). On a machine without CUDA the
# tests skip and DISTILL_ARGS must hold a CPU smoke run's arguments (see distill_gpu.py); PY picks the python.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d)}
DISTILL_ARGS=${DISTILL_ARGS:---modes ce,kd_online --fsdp-modes kd_online --steps 10 --warmup 3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
status=0
step() { echo "== $* ($(date -u +%H:%M:%S))"; }

if [ -d .whl/gpu ]; then
  step "install $(ls .whl/gpu | wc -l) carried packages"
  $PY -m pip install -q --no-index --no-deps --no-build-isolation .whl/gpu/* 2>&1 | tail -n 5
fi
step "versions"
$PY -c "import torch, transformers, pydantic, datasets, lm_eval
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '', '| transformers', transformers.__version__)" \
  || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

step "pytest -m gpu"
$PY -m pytest -m gpu tests/test_cuda.py -q -p no:cacheprovider --durations=5 2>&1 | tee "$OUT/pytest_gpu.log" \
  | tail -n 25 || status=1

step "distill_gpu.py $DISTILL_ARGS"
# shellcheck disable=SC2086  # DISTILL_ARGS is a list of arguments
$PY benchmarks/distill_gpu.py $DISTILL_ARGS --name distill_gpu_checks 2>&1 \
  | grep -v -E "Loading weights|Writing model shards|^\s*$" | tee "$OUT/distill_gpu.log" | tail -n 12 || status=1
cp benchmarks/results/distill_gpu_checks.json "$OUT/distill_gpu.json" 2>/dev/null || status=1
rm -f benchmarks/results/distill_gpu_checks.json
step "done (status $status; files in $OUT)"
exit $status
