#!/usr/bin/env bash
# The main job, offline: install, fine-tune the built-in SmolLM2-135M-Instruct on the bundled patient/doctor
# records (16 held out for validation), then show what tuning changed: the validation loss and perplexity at
# step 0 and at the end (printed by finetune.py), the base and the tuned model's answers to the same
# patient question, which is in none of the training files, and both models' triage safety on our 60
# scenarios (accuracy, and under-triage: emergencies answered with less urgent advice).
#   bash scripts/demo.sh
# MEDLORA_DEMO_OUTPUT_DIR (default ./lora-medlora) and MEDLORA_DEMO_MAX_STEPS (default 12) exist for the
# test that runs this script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
output_dir=${MEDLORA_DEMO_OUTPUT_DIR:-./lora-medlora}
python finetune.py --data_path data/sft/medical_chat_en.json --output_dir "$output_dir" \
  --val_set_size 16 --batch_size 8 --micro_batch_size 8 --max_steps "${MEDLORA_DEMO_MAX_STEPS:-12}" \
  --learning_rate 5e-4 --lora_r 16 --lora_alpha 32 --lora_target_modules all-linear --cutoff_len 256 \
  --logging_steps 2 --eval_steps 1000 --save_steps 1000 --overwrite_output_dir
python chat.py --lora_weights "$output_dir" --compare --temperature 0 --max_new_tokens 160 \
  --prompt "Doctor, I have had a sore throat and a mild fever for three days, and it hurts to swallow. What should I do?"
python evaluate.py --lora_weights "$output_dir" --data_path data/eval/triage_safety_en.jsonl --compare
