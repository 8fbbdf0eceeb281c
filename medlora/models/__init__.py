"""Base models and tokenizers: the built-in models (SmolLM2, the tiny test model), loading with LoRA,
quantization and precision, and padding-free attention."""
