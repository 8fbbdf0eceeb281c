"""Writing a tuned model out: the merged Hugging Face checkpoint, the Meta state dict, GGUF with its
tokenizer and an Ollama Modelfile."""
