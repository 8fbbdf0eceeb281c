"""Attention for padding-free (packed) rows that does no work across records.

transformers handles a packed row (position_ids restarting, no attention_mask) with sdpa by building a
dense block-diagonal mask over the whole row: attention then costs (total length)^2 instead of the sum of
(record length)^2, and the mask itself is a large tensor. This implementation, registered as
"medlora_packed", runs scaled_dot_product_attention once per record, causal, using the record boundaries
the PackedCollator passes as `cu_seq_lens_q`. Anything else (no boundaries, a padding mask, generation
with a cache) goes through the stock sdpa path, so the model stays correct everywhere.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    sdpa_mask,
)

PACKED_ATTENTION = "medlora_packed"


def packed_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             is_causal=None, **kwargs):
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or attention_mask is not None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU autocast would run attention in bf16, whose flash kernel's backward takes twice fp32's time (measured
        # on SmolLM2 records, docs/BENCHMARKS.md): attention in fp32, the products around it stay in bf16.
        with torch.autocast("cpu", enabled=False):
            return packed_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                            dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    return _attend_records(query, key, value, boundaries, dropout, scaling)


@torch.compiler.disable  # under --torch_compile: the record lengths are data, not a shape to compile for
def _attend_records(query, key, value, boundaries, dropout, scaling):
    grouped = key.shape[1] != query.shape[1]
    lengths = boundaries.diff().tolist()
    # split, not a slice per record: a slice's backward fills a zero tensor of the whole row for each record
    # and autograd sums them (on SmolLM2 with 8 records, 720 full-size fills and sums per step); split's is one cat.
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def packed_attention_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (the attention above keeps records apart); the usual sdpa mask otherwise."""
    if attention_mask is None and kwargs.get("q_length", 0) == kwargs.get("kv_length", -1):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
AttentionMaskInterface.register(PACKED_ATTENTION, packed_attention_mask)
assert ALL_MASK_ATTENTION_FUNCTIONS[PACKED_ATTENTION] is packed_attention_mask


def use_packed_attention(model, cutoff_len: int) -> bool:
    """Switch a model that uses sdpa or eager attention to the per-record implementation for training.

    Left alone: flash attention (already handles packed rows) and sliding-window models whose window is
    shorter than a record (the per-record causal attention would ignore the window)."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if config._attn_implementation not in ("sdpa", "eager") or (window and window < cutoff_len):
        return False
    model.set_attn_implementation(PACKED_ATTENTION)
    return True
