"""Answering: the generation core, the Gradio page, batch predictions, the OpenAI-compatible API
and retrieval of knowledge passages."""
