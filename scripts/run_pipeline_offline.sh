#!/usr/bin/env bash
# The whole training pipeline, offline, on the built-in tiny model with tiny step counts (a couple of
# minutes on a laptop CPU): PT -> SFT -> DPO, and the RLHF branch SFT -> RM -> RL. It checks that the
# stages fit together (each loads the previous one's output with no extra flag); the toy model learns
# nothing medical, and nothing it says is medical advice. The launchers' own default is the real
# SmolLM2-135M-Instruct (docs/pipeline.md); here BASE_MODEL names the toy. See docs/pipeline.md.
#   bash scripts/run_pipeline_offline.sh                  # outputs in ./pipeline-offline/
#   WORK_DIR=/tmp/pipeline bash scripts/run_pipeline_offline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK_DIR=${WORK_DIR:-./pipeline-offline}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$WORK_DIR"
TINY=(--batch_size 4 --micro_batch_size 4 --max_steps 2 --warmup_steps 0 --learning_rate 1e-2 --logging_steps 1
      --save_steps 1000)
step() { echo; echo "==== $1"; }

step "PT: continued pretraining on data/pretrain/"
BASE_MODEL=builtin:tiny-llama OUTPUT_DIR="$WORK_DIR/pt" bash scripts/run_pt.sh "${TINY[@]}" --block_size 64 --val_set_size 4

step "SFT: continue the PT adapter on data/sft/"
LORA_WEIGHTS="$WORK_DIR/pt" OUTPUT_DIR="$WORK_DIR/sft" bash scripts/run_sft.sh "${TINY[@]}" --cutoff_len 128 \
  --val_set_size 0

step "DPO: preference-tune the SFT adapter on data/preference/"
LORA_WEIGHTS="$WORK_DIR/sft" OUTPUT_DIR="$WORK_DIR/dpo" bash scripts/run_dpo.sh "${TINY[@]}" --cutoff_len 96 \
  --val_set_size 4

step "RM: a reward model on data/preference/"
BASE_MODEL=builtin:tiny-llama PROMPT_TEMPLATE=alpaca OUTPUT_DIR="$WORK_DIR/rm" bash scripts/run_rm.sh "${TINY[@]}" --cutoff_len 96 --val_set_size 4

step "RL: GRPO of the SFT adapter against the reward model"
LORA_WEIGHTS="$WORK_DIR/sft" REWARD_MODEL="$WORK_DIR/rm" OUTPUT_DIR="$WORK_DIR/rl" bash scripts/run_rl.sh "${TINY[@]}" \
  --num_generations 2 --max_completion_length 8 --eval_prompts 4

echo
echo "pipeline done: adapters in $WORK_DIR/{pt,sft,dpo,rl}, reward model in $WORK_DIR/rm"
echo "try one:  python chat.py --lora_weights $WORK_DIR/dpo --prompt \"I have had a fever for two days.\""
