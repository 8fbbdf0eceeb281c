#!/usr/bin/env bash
# Stage 1, continued pretraining (PT) on plain medical text: pretrain.py. See docs/pipeline.md.
#   bash scripts/run_pt.sh                                # SmolLM2-135M-Instruct (the default model), data/pretrain/
#   BASE_MODEL=Qwen/Qwen2.5-1.5B DATA_PATH=../shared/datasets/medicalgpt/pretrain_fever_zh.txt \
#     OUTPUT_DIR=./pt-fever bash scripts/run_pt.sh --block_size 1024 --load_in_4bit
# BASE_MODEL defaults to pretrain.py's (SmolLM2). Extra arguments go to pretrain.py; NPROC=4 runs it under torchrun on 4 GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_MODEL=${BASE_MODEL:-}
DATA_PATH=${DATA_PATH:-data/pretrain}
OUTPUT_DIR=${OUTPUT_DIR:-./pt-medlora}
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
if [ "${NPROC:-1}" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC"); else LAUNCH=("$PYTHON"); fi
exec "${LAUNCH[@]}" pretrain.py --base_model "$BASE_MODEL" --data_path "$DATA_PATH" --output_dir "$OUTPUT_DIR" "$@"
