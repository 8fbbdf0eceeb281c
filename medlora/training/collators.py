"""Batches for the label-only loss: padded rows with an attention mask, or padding-free packed rows whose
position_ids restart at every record (and no attention_mask, which would hide the boundaries)."""

import inspect

import torch

from medlora.data.tokenization import IGNORE_INDEX


class PaddedCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list) -> dict:
        longest = max(len(ex["input_ids"]) for ex in examples)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, ex in enumerate(examples):
            length = len(ex["input_ids"])
            input_ids[row, :length] = torch.tensor(ex["input_ids"])
            labels[row, 1:length] = torch.tensor(ex["labels"][1:])  # position 0 is never predicted
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackedCollator:
    def __call__(self, examples: list) -> dict:
        input_ids, labels, position_ids, boundaries = [], [], [], [0]
        for ex in examples:
            length = len(ex["input_ids"])
            input_ids += ex["input_ids"]
            # The first label of each example is dropped: in a packed row it would be "predicted"
            # from the previous example's last token.
            labels += [IGNORE_INDEX] + list(ex["labels"][1:])
            position_ids += range(length)
            boundaries.append(boundaries[-1] + length)
        longest = max(len(ex["input_ids"]) for ex in examples)
        as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(input_ids), "labels": as_row(labels), "position_ids": as_row(position_ids),
                # Record boundaries, for attention implementations that work per record (medlora_packed, flash).
                "cu_seq_lens_q": torch.tensor(boundaries, dtype=torch.int32),
                "cu_seq_lens_k": torch.tensor(boundaries, dtype=torch.int32),
                "max_length_q": longest, "max_length_k": longest}


def supports_packing(model) -> bool:
    """Padding-free batches need a model that takes position_ids and builds its mask through
    transformers' masking utilities (which detect packed rows from position_ids)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = inspect.signature(base.forward).parameters
    return "position_ids" in forward and getattr(base, "_supports_attention_backend", False)
