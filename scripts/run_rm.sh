#!/usr/bin/env bash
# Stage 3 of the RLHF branch, a pairwise reward model (RM): reward.py. See docs/pipeline.md.
#   bash scripts/run_rm.sh                                # SmolLM2-135M-Instruct, data/preference/
#   BASE_MODEL=./sft-merged DATA_PATH=../shared/datasets/medicalgpt/dpo_zh_500.jsonl \
#     OUTPUT_DIR=./rm-medlora bash scripts/run_rm.sh --load_in_4bit
# Use the policy's prompt template (PROMPT_TEMPLATE; default: the base model's own, chat for SmolLM2). Extra arguments go to reward.py;
# NPROC=4 runs it under torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_MODEL=${BASE_MODEL:-}
DATA_PATH=${DATA_PATH:-data/preference}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-}
OUTPUT_DIR=${OUTPUT_DIR:-./rm-medlora}
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
if [ "${NPROC:-1}" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC"); else LAUNCH=("$PYTHON"); fi
exec "${LAUNCH[@]}" reward.py --base_model "$BASE_MODEL" --data_path "$DATA_PATH" \
  --prompt_template_name "$PROMPT_TEMPLATE" --output_dir "$OUTPUT_DIR" "$@"
