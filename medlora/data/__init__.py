"""Reading and shaping data: record files and their formats, prompt templates, token ids and label masks,
multiple-choice questions, pretraining text, preference pairs."""
