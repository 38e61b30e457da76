#!/usr/bin/env bash
# The one unattended GPU check, run on a lent GPU machine from the repo root, in under ~8 minutes:
#   1. GPU-marked tests                                   (budget GPU_TESTS_S, default 90 s)
#   2. FSDP pretraining on every GPU: recipes/pretrain/accelerate-fsdp.yaml (FSDP2, bf16, NCCL),
#      6 steps, a sharded checkpoint at step 3, resumed to the same final loss   (FSDP_S, 75 s)
#   3. bench/pretrain_gpu.py: tokens/s and MFU of a ~1B model on one GPU       (PRETRAIN_S, 150 s)
#   4. merge benchmark on CUDA: `merge run --device cuda` vs `mergekit-yaml --cuda` (MERGE_S, 130 s)
# Each step has its own timeout and the script stops starting steps once TOTAL_S (default 470 s)
# would be passed, so it always ends; the figures are in $OUT/*.log and summed up at the end.
# The machine has torch/transformers but not our other dependencies: they travel as wheels in
# .whl/ (see bench/README.md), installed here without an index.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NO_COLOR=1
TOTAL_S=${TOTAL_S:-470}
START=$SECONDS

step() {  # step NAME BUDGET_S COMMAND...: run it under its budget unless the total would pass
    local name=$1 budget=$2
    shift 2
    local left=$((TOTAL_S - (SECONDS - START)))
    if [ "$left" -lt "$budget" ]; then
        echo "== $name: SKIPPED ($left s left of TOTAL_S=$TOTAL_S, it needs $budget s)"
        return
    fi
    echo "== $name (at most $budget s)"
    local t0=$SECONDS
    timeout "$budget" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -15 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | grep -v -i warning | tail -3
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
nvidia-smi -L
NGPU=$(nvidia-smi -L | grep -c '^GPU')
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"

step gpu_tests "${GPU_TESTS_S:-90}" python3 -m pytest -q -m gpu -p no:cacheprovider tests

# FSDP: a tiny model, so the step measures that the path runs (NCCL, bf16 mixed precision, the
# sharded checkpoint, resume, the gathered save), not speed.
FSDP=$OUT/fsdp
rm -rf "$FSDP" && mkdir -p "$FSDP"
cat >"$FSDP/run.yaml" <<EOF
model: {hidden_size: 256, intermediate_size: 512, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 64, max_position_embeddings: 256}
tokenizer: mistral-common
output_dir: $FSDP/run
sources: [{world: nl, documents: 2000}, {world: en, documents: 500}]
context_length: 128
micro_batch: 4
max_steps: 6
checkpoint_every: 3
lr: 0.002
dtype: bfloat16
device: cuda
log_every: 1
progress: false
plot: false
EOF
# resume from the sharded step-3 checkpoint (the run also checkpoints its last step)
sed -e '/^model:/d' -e "\$a resume: $FSDP/run/checkpoints/step-00000003" "$FSDP/run.yaml" >"$FSDP/resume.yaml"
fsdp_check() {
    set -o pipefail  # it runs in its own bash (timeout bash -c fsdp_check)
    local launch=(accelerate launch --config_file recipes/pretrain/accelerate-fsdp.yaml
                  --num_processes "$NGPU" --main_process_port 0 -m pretrain.cli run)
    "${launch[@]}" "$FSDP/run.yaml" --json | tee "$FSDP/first.json" || return 1
    rm -rf "$FSDP/run/model"
    "${launch[@]}" "$FSDP/resume.yaml" --json | tee "$FSDP/resumed.json" || return 1
    python3 - "$FSDP" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM
d = Path(sys.argv[1])
first, resumed = (json.loads(p.read_text().strip().splitlines()[-1]) for p in (d / "first.json", d / "resumed.json"))
shards = sorted(p.name for p in (d / "run/checkpoints/step-00000003/pytorch_model_fsdp_0").iterdir())
model = AutoModelForCausalLM.from_pretrained(d / "run/model")
same = abs(first["final_loss"] - resumed["final_loss"]) <= 2e-2 * abs(first["final_loss"])
print(f"FSDP: final loss {first['final_loss']:.4f}, resumed from step 3: {resumed['final_loss']:.4f} "
      f"({'same' if same else 'DIFFERENT'}), shards {shards}, from_pretrained ok "
      f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")
sys.exit(0 if same else 1)
PY
}
export -f fsdp_check
export FSDP NGPU
step fsdp "${FSDP_S:-75}" bash -c fsdp_check

step pretrain_mfu "${PRETRAIN_S:-150}" python3 bench/pretrain_gpu.py

step merge_cuda "${MERGE_S:-130}" python3 bench/merge_vs_mergekit.py --device cuda --workdir /tmp/kruising-bench

echo "== summary ($((SECONDS - START)) s in all; logs in $OUT)"
grep -h -E "passed|failed|error" "$OUT/gpu_tests.log" 2>/dev/null | tail -1
grep -h "^FSDP:" "$OUT/fsdp.log" 2>/dev/null
tail -1 "$OUT/pretrain_mfu.log" 2>/dev/null
sed -n '/^results (/,/^cat floor/p' "$OUT/merge_cuda.log" 2>/dev/null
grep -h -E "^  (linear|slerp|ties): speed" "$OUT/merge_cuda.log" 2>/dev/null
