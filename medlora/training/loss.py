"""The training loss: cross-entropy only at positions that carry a label, without full-vocabulary logits.

Prompt positions need no logits, so the output layer runs only where a label is. Where the output layer
is a plain bias-free Linear (LLaMA, Mistral, Qwen, Gemma, GPT-2, GPT-NeoX, BLOOM, ...), the output layer and
the cross-entropy are fused and chunked: logits exist for 256 positions at a time (fewer on CPU under gradient
checkpointing, see chunk_rows), and the gradient with
respect to the hidden states is computed in the same pass, so neither logits nor their gradient are kept
for backward. Other heads (a bias, softcapping, a LoRA or modules_to_save wrapper) take the plain path:
the model's own output layer at the labelled positions (`logits_to_keep`).
"""

import torch
import torch.nn.functional as F

from medlora.data.tokenization import IGNORE_INDEX

# Architectures whose logits are exactly hidden @ lm_head.weight.T (no scaling, softcapping or bias).
PLAIN_OUTPUT_LAYER = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                      "gpt2", "gpt_neox", "bloom"}
CHUNK = 256
# With gradient checkpointing on CPU, the loss's chunk was the peak of a SmolLM2-135M run: 256 rows (48 MiB of
# logits) peaked at 1,615 MiB RSS, 64 rows at 1,385 MiB (docs/BENCHMARKS.md, before the chunks shared one
# buffer); the loss is slower in small chunks.
CHECKPOINTED_CPU_CHUNK_BYTES = 12 << 20


def chunk_rows(model, hidden, vocab_size: int) -> int:
    """CHUNK rows, or, on CPU under gradient checkpointing (memory asked for over speed), the largest power of two
    of rows whose fp32 logits fit in CHECKPOINTED_CPU_CHUNK_BYTES (16 to CHUNK)."""
    if hidden.device.type != "cpu" or not getattr(unwrap(model), "is_activation_checkpointing", False):
        return CHUNK
    rows = max(1, CHECKPOINTED_CPU_CHUNK_BYTES // (4 * vocab_size))
    return max(16, min(CHUNK, 1 << (rows.bit_length() - 1)))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T, targets), computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        needs_grad = hidden.requires_grad or weight.requires_grad  # grad mode is off inside forward
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        # Under autocast (bf16 on GPUs and on CPUs with AMX) the products run in the autocast dtype. The weight is
        # cast once here: autocast would cast the whole vocabulary x hidden matrix again for every product of
        # every chunk (measured on SmolLM2 with bf16 autocast on CPU, 2026-12-01: ~0.35 s of a 4.0 s step).
        ctx.weight_dtype = weight.dtype
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            weight = weight.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            total = FusedLinearCrossEntropy.chunked(hidden, weight, targets, chunk, grad_hidden, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def chunked(hidden, weight, targets, chunk, grad_hidden, grad_weight):
        """The summed loss, and where given the gradients (written into grad_hidden and grad_weight), chunk by chunk."""
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # One logits buffer for every chunk: a new one per chunk is, on CPU, a fresh mapping faulted in page by
        # page each time (tensors of 4 MiB and more, medlora/training/malloc.py), and the next chunk's logits
        # would exist before the previous ones are freed.
        buffer = torch.empty(min(chunk, hidden.shape[0]), weight.shape[0], dtype=weight.dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk].to(weight.dtype), targets[start:start + chunk]
            logits = torch.mm(h, weight.t(), out=buffer[:h.shape[0]]).float()
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp by hand, in place: torch.logsumexp would allocate and exponentiate a second copy
            peak = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(peak).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            total += (peak.squeeze(1) + sums.squeeze(1).log() - target_logits).sum()
            if grad_hidden is None:
                continue
            # d(loss)/d(logits) = softmax - onehot, so d(loss)/d(h) = (exps @ weight) / sums - weight[t]:
            # the division runs on the hidden-size product, not on the vocabulary-size softmax.
            if grad_weight is not None:
                probs, h32 = exps.div_(sums), h.float()
                grad_weight += probs.t() @ h32
                grad_weight.index_add_(0, t, h32, alpha=-1)
                grad_h = probs.to(weight.dtype) @ weight
            else:
                grad_h = (exps.to(weight.dtype) @ weight).float().div_(sums)
            grad_hidden[start:start + chunk] = grad_h.float() - weight[t].float()
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        weight_grad = None if grad_weight is None else (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden * scale, weight_grad, None, None


def unwrap(model):
    """The transformers model under DDP/FSDP wrappers and PEFT."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fusable_output_layer(model):
    base = unwrap(model)
    head = base.get_output_embeddings()
    if base.config.model_type in PLAIN_OUTPUT_LAYER and type(head) is torch.nn.Linear and head.bias is None:
        return head
    return None


def label_only_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Summed cross-entropy at the labelled positions, divided by num_items_in_batch when given (the
    Trainer's count of trained tokens across accumulation steps and devices), else by this batch's count."""
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    rows, positions = keep.nonzero(as_tuple=True)
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    head = fusable_output_layer(model)
    if head is not None:
        captured = {}

        def keep_hidden_states(hidden_states):
            # The model is still called through its (DDP-wrapped) forward; its output layer only keeps the hidden
            # states and returns logits of no width: no product, and under autocast no bf16 copy of its weight
            # (67 ms of a SmolLM2 step on CPU, for the one position it used to compute).
            captured["hidden"] = hidden_states
            return hidden_states[..., :0]

        own_forward = head.__dict__.get("forward")
        head.forward = keep_hidden_states
        try:
            model(**model_inputs, use_cache=False)
        finally:
            if own_forward is None:
                del head.forward
            else:
                head.forward = own_forward
        hidden = captured["hidden"][rows, positions]
        loss = FusedLinearCrossEntropy.apply(hidden, head.weight, targets[rows, positions],
                                             chunk_rows(model, hidden, head.weight.shape[0]))
    else:
        # Rows of a padded batch share logits_to_keep: keep the union of positions, pick each row's own.
        kept_positions = torch.unique(positions)
        logits = model(**model_inputs, use_cache=False, logits_to_keep=kept_positions).logits
        selected = logits[rows, torch.searchsorted(kept_positions, positions)].float()
        loss = F.cross_entropy(selected, targets[rows, positions], reduction="sum")
    return loss / (max(1, int(keep.sum())) if num_items_in_batch is None else num_items_in_batch)
