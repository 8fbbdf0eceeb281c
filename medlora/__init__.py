"""MedLoRA: LoRA and QLoRA fine-tuning of open LLMs into medical chat assistants.

The top-level scripts (finetune.py, generate.py, chat.py, ...) are thin; what they share lives here, in the
order of the pipeline:
  cli, flags, errors   how every script runs: flags checked first, --help, one-line errors
  flag_groups          the flags stages share, each declared once; scripts compose them with @stage_flags
  paths, run_folder    the project's folders and cache; what a run/adapter folder holds, read and checked
  data/                record files and formats, templates, token ids and label masks, questions,
                       pretraining text, preference pairs, validation splits, packed dialogues
  models/              the built-in models, loading base models with LoRA, quantization, precision
  training/            TrainingStage (shared around every training script), the label-only loss trainer,
                       collators, torchrun, saving, reward models, DPO and GRPO
  inference/           the generation core, the Gradio page, batch predictions, the OpenAI-compatible API
  evaluation/          multiple-choice scoring, perplexity, reports with standard errors, lm-eval
  export/              merged checkpoints, the Meta state dict, GGUF and Ollama Modelfiles
"""

import logging
import os
import warnings

# Idle OpenMP threads sleep instead of spinning (libgomp's default spins for a while): on a machine shared
# with other work, spinning threads steal the cores the busy ones need. Read when torch loads OpenMP, so
# it is set here, before any script imports torch; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# TRL's trainers report usage to the Hub; MedLoRA sends nothing. Read when huggingface_hub loads.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

# PEFT 0.21 calls transformers 5's deprecated `is_gradient_checkpointing` inside get_peft_model: a warning
# about the libraries' own code, printed twice by every training command.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# bitsandbytes (imported by PEFT and transformers) warns at every import on a CPU that an optional
# kernel from the Hub is missing. It would only speed up 4-bit matmuls on CPU, which MedLoRA runs in
# tests alone, and the Hub may be out of reach; the warning would open every command's output. Each
# script imports medlora before the libraries that import bitsandbytes (tests/test_readme_commands.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
