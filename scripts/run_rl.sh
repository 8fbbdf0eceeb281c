#!/usr/bin/env bash
# Stage 4 of the RLHF branch, reinforcement learning (GRPO) of the SFT adapter: rl.py. See docs/pipeline.md.
#   bash scripts/run_rl.sh                                # ./lora-medlora, rule reward, data/preference/ prompts
#   REWARD_MODEL=./rm-medlora bash scripts/run_rl.sh      # against the reward model reward.py wrote
#   LORA_WEIGHTS=./lora-medlora REWARD_MODEL=./rm-medlora DATA_PATH=prompts.jsonl OUTPUT_DIR=./rl-medlora \
#     bash scripts/run_rl.sh --num_generations 8 --max_completion_length 256
# BASE_MODEL defaults to the adapter's base. Extra arguments go to rl.py; NPROC=4 runs it under torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
LORA_WEIGHTS=${LORA_WEIGHTS-./lora-medlora}
BASE_MODEL=${BASE_MODEL:-}
REWARD_MODEL=${REWARD_MODEL:-}
DATA_PATH=${DATA_PATH:-data/preference}
OUTPUT_DIR=${OUTPUT_DIR:-./rl-medlora}
if [ -z "${PYTHON:-}" ]; then PYTHON=python; [ -x .venv/bin/python ] && PYTHON=.venv/bin/python; fi
if [ "${NPROC:-1}" -gt 1 ]; then LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC"); else LAUNCH=("$PYTHON"); fi
exec "${LAUNCH[@]}" rl.py --base_model "$BASE_MODEL" --lora_weights "$LORA_WEIGHTS" --reward_model "$REWARD_MODEL" \
  --data_path "$DATA_PATH" --output_dir "$OUTPUT_DIR" "$@"
