#!/usr/bin/env bash
# The main job, offline: install, fine-tune the built-in tiny model on the bundled sample data,
# then ask the tuned model a sample patient question.
#   bash scripts/demo.sh
# MEDLORA_DEMO_OUTPUT_DIR (default ./lora-medlora) and MEDLORA_DEMO_MAX_STEPS (default: 2 full epochs)
# exist for the test that runs this script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
output_dir=${MEDLORA_DEMO_OUTPUT_DIR:-./lora-medlora}
python finetune.py --output_dir "$output_dir" --num_epochs 2 --batch_size 16 --micro_batch_size 8 \
  --learning_rate 3e-3 --warmup_steps 10 --lora_target_modules all-linear --lora_r 16 --lora_alpha 32 \
  --eval_steps 40 --logging_steps 10 --max_steps "${MEDLORA_DEMO_MAX_STEPS:--1}"
python chat.py --lora_weights "$output_dir" \
  --prompt "Doctor, I have had a sore throat and a mild fever for three days. What should I do?"
