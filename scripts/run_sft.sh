#!/usr/bin/env bash
# Stage 2, supervised fine-tuning (SFT) on medical chats: finetune.py. See docs/pipeline.md.
#   bash scripts/run_sft.sh                               # SmolLM2-135M-Instruct, data/sft/, a new adapter
#   LORA_WEIGHTS=./pt-medlora bash scripts/run_sft.sh     # continue the adapter pretrain.py wrote
#   BASE_MODEL=meta-llama/Llama-3.1-8B DATA_PATH=../shared/datasets/chatdoctor/genmedgpt_5k.json \
#     PROMPT_TEMPLATE=chatdoctor OUTPUT_DIR=./lora-chatdoctor bash scripts/run_sft.sh --load_in_4bit
# BASE_MODEL and PROMPT_TEMPLATE default to finetune.py's (SmolLM2, its chat template; with LORA_WEIGHTS the
# adapter's). Extra arguments go to finetune.py; NPROC=4 runs it under torchrun on 4 GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_MODEL=${BASE_MODEL:-}
LORA_WEIGHTS=${LORA_WEIGHTS:-}
DATA_PATH=${DATA_PATH:-data/sft}
PROMPT_TEMPLATE=${PROMPT_TEMPLATE:-}
OUTPUT_DIR=${OUTPUT_DIR:-./lora-medlora}
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
if [ "${NPROC:-1}" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC"); else LAUNCH=("$PYTHON"); fi
exec "${LAUNCH[@]}" finetune.py --base_model "$BASE_MODEL" --lora_weights "$LORA_WEIGHTS" --data_path "$DATA_PATH" \
  --prompt_template_name "$PROMPT_TEMPLATE" --output_dir "$OUTPUT_DIR" "$@"
