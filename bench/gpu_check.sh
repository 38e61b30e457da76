#!/usr/bin/env bash
# The one unattended GPU check, run on a lent GPU machine from the repo root:
#   GPU-marked tests, the pretrain MFU run, and the merge benchmark on CUDA (ours vs mergekit --cuda).
# The machine has torch/transformers but not our other dependencies: they travel as wheels in
# .whl/ (see bench/README.md), installed here without an index.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v -i warning | tail -3
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
echo "== GPU-marked tests"
timeout "${GPU_TESTS_S:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== pretrain MFU"
timeout "${PRETRAIN_S:-200}" python3 bench/pretrain_gpu.py 2>&1 | tee "$OUT/pretrain_gpu.log" | tail -15
echo "== merge benchmark on cuda"
timeout "${MERGE_S:-300}" python3 bench/merge_vs_mergekit.py --device cuda --workdir /tmp/kruising-bench 2>&1 | tee "$OUT/merge_gpu.log" | tail -40
