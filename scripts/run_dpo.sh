#!/usr/bin/env bash
# Stage 3, preference tuning (DPO, IPO, ORPO or SimPO) of the SFT adapter: dpo.py. See docs/pipeline.md.
#   bash scripts/run_dpo.sh                               # ./lora-medlora on data/preference/
#   LORA_WEIGHTS=./lora-medlora DATA_PATH=../shared/datasets/medicalgpt/dpo_zh_500.jsonl LOSS=orpo \
#     OUTPUT_DIR=./orpo-medlora bash scripts/run_dpo.sh --beta 0.1
# BASE_MODEL defaults to the adapter's base; with LORA_WEIGHTS empty a fresh LoRA is trained on BASE_MODEL
# (default: SmolLM2-135M-Instruct). Extra arguments go to dpo.py; NPROC=4 runs it under torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
LORA_WEIGHTS=${LORA_WEIGHTS-./lora-medlora}
BASE_MODEL=${BASE_MODEL:-}
DATA_PATH=${DATA_PATH:-data/preference}
LOSS=${LOSS:-dpo}
OUTPUT_DIR=${OUTPUT_DIR:-./dpo-medlora}
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
if [ "${NPROC:-1}" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC"); else LAUNCH=("$PYTHON"); fi
exec "${LAUNCH[@]}" dpo.py --base_model "$BASE_MODEL" --lora_weights "$LORA_WEIGHTS" --data_path "$DATA_PATH" \
  --loss "$LOSS" --output_dir "$OUTPUT_DIR" "$@"
