"""MedLoRA: LoRA and QLoRA fine-tuning of open LLMs into medical chat assistants.

The top-level scripts (finetune.py, generate.py, chat.py, ...) are thin; what they share lives here:
  errors        one exception type for bad input, printed as a one-line error by every script
  templates     prompt templates (templates/*.json) and how they render conversations
  records       reading training files, detecting their format, validating every record
  tokenization  turning conversations into input_ids and label masks, with a summary
  tiny_model    the built-in tiny LLaMA model and tokenizer, built offline
  modeling      loading base models and tokenizers, choosing LoRA targets
  training      collators, the label-only loss and the Trainer used by finetune.py
  run_settings  the JSON of resolved settings saved next to every adapter
"""

__version__ = "0.1.0"
