"""MedLoRA: LoRA and QLoRA fine-tuning of open LLMs into medical chat assistants.

The top-level scripts (finetune.py, generate.py, chat.py, ...) are thin; what they share lives here:
  errors            one exception type for bad input, printed as a one-line error by every script
  templates         prompt templates (templates/*.json) and how they render conversations
  records           reading training files, detecting their format, validating every record
  tokenization      conversations to input_ids and exact label masks, with a summary
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

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT and transformers) warns at every import on a CPU that an optional
# kernel from the Hub is missing. It would only speed up 4-bit matmuls on CPU, which MedLoRA runs in
# tests alone, and the Hub may be out of reach; the warning would open every command's output. Each
# script imports medlora before the libraries that import bitsandbytes (tests/test_readme_commands.py).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
