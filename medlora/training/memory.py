"""Less memory for LoRA training on CPU, with the same computation (same loss and gradients for the same dropout masks).

Two measured causes of the peak on CPU (docs/BENCHMARKS.md, "Where the memory goes"); this module fixes the
first, medlora/training/malloc.py (glibc malloc settings) and the trimming hooks below the second.

1. **LoRA dropout copies.** PEFT computes `lora_B(lora_A(dropout(x))) * scaling`. On CPU, `nn.Dropout` draws a
   float noise tensor (`bernoulli_(1 - p) / (1 - p)`) and multiplies: autograd keeps the noise for the dropout's
   backward and `lora_A` keeps the dropped-out input for its weight gradient, two float copies of every adapted
   module's input: on SmolLM2-135M with all seven linear layers adapted, 977 of 3,121 MiB saved for backward.
   `DropoutLoraA` computes `lora_A(dropout(x))` keeping `x` (the same tensor for q/k/v, and for gate/up) and a
   one-byte keep mask; its backward rebuilds the noise and the dropped-out input from them and differentiates
   the very same operations.
   The mask: the same distribution as `nn.Dropout`'s (each element dropped with probability p, to 2**-31, the
   rest scaled by 1 / (1 - p)), drawn from torch's generator (so `torch.manual_seed` and checkpointing's
   recomputation reproduce it) but not with the same calls: `bernoulli_` on a float tensor took 24% of a
   SmolLM2 training step in bf16 on CPU, and one 31-bit integer per element compared with p * 2**31
   (`random_` on int32) makes the mask 1.65x faster (docs/BENCHMARKS.md). The random stream therefore differs
   from stock PEFT's; with the same mask, loss and gradients are PEFT's (tests/test_training_memory.py).
2. **glibc malloc** holding freed memory: medlora/training/malloc.py sets glibc up. Under gradient checkpointing
   in fp32, the heap is also trimmed after each decoder layer's forward and before its backward (`malloc_trim`):
   the layer inputs kept for the backward pass (3.75 MiB each on SmolLM2 with 1,700 tokens) sit on the heap
   between the freed temporaries of every layer, which glibc does not give back from the middle of the heap by
   itself. Measured on the target run (docs/BENCHMARKS.md): peak RSS 1,567 to 1,709 MiB without, 1,464 to 1,478 with,
   for about 12% more CPU time (the trimmed pages are faulted in again). Under bf16 autocast the casts of
   every weight churn the heap and trimming cost a quarter of the step for 6% less memory: not used there.

`reduce_training_memory(model, trim_between_layers)` installs `DropoutLoraA` on every plain PEFT LoRA Linear layer
(an instance attribute: classes, saved files and inference are untouched) and, when asked, the trimming hook on
every decoder layer; anything else (DoRA and other variants, quantized layers, mixed adapter batches, evaluation,
GPUs) runs PEFT's own forward.
"""

import types

import torch
import torch.nn.functional as F

from medlora.training.malloc import trim_malloc


# ---- LoRA dropout without copies -------------------------------------------------------------------------------
def dropout_keep_mask(shape, p: float) -> torch.Tensor:
    """A bool mask, each element False with probability p: int32 `random_` fills [0, 2**31) uniformly."""
    return torch.empty(shape, dtype=torch.int32).random_() >= round(p * 2**31)


def dropout_noise(keep: torch.Tensor, dtype, p: float) -> torch.Tensor:
    """The factor dropout multiplies by: 0 where dropped, 1 / (1 - p) elsewhere (torch's order: cast, then divide)."""
    return keep.to(dtype).div_(1 - p)


class DropoutLoraA(torch.autograd.Function):
    """F.linear(nn.Dropout(p)(x), weight) on CPU, keeping x and a bool mask instead of two float copies of x."""

    @staticmethod
    def forward(ctx, x, weight, p):
        keep = dropout_keep_mask(x.shape, p)
        out = F.linear(x * dropout_noise(keep, x.dtype, p), weight)
        ctx.save_for_backward(x, keep, weight)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, weight = ctx.saved_tensors
        noise = dropout_noise(keep, x.dtype, ctx.p)  # what the forward multiplied by, bit for bit
        with torch.enable_grad():
            x = x.detach().requires_grad_(ctx.needs_input_grad[0])
            weight = weight.detach().requires_grad_(ctx.needs_input_grad[1])
            out = F.linear(x * noise, weight)
            wanted = [t for t in (x, weight) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (next(grads) if x.requires_grad else None, next(grads) if weight.requires_grad else None, None)


def _plain_lora_linear(module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return False
    return type(module) is LoraLinear  # quantized and other LoRA layers have forwards of their own


def _lean_applies(layer, x, args, kwargs) -> bool:
    if not (torch.is_grad_enabled() and layer.training and x.device.type == "cpu") or args or kwargs:
        return False
    if layer.disable_adapters or layer.merged:
        return False
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        dropout = layer.lora_dropout[name]
        if (name in layer.lora_variant or type(layer.lora_A[name]) is not torch.nn.Linear
                or layer.lora_A[name].bias is not None or type(dropout) is not torch.nn.Dropout
                or not dropout.training or not 0 < dropout.p < 1):
            return False
    return True


def _lean_lora_forward(self, x, *args, **kwargs):
    """PEFT's LoraLinear.forward for plain LoRA adapters, with lora_A(dropout(x)) as one DropoutLoraA."""
    if not _lean_applies(self, x, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x)
    result = self.base_layer(x)
    torch_result_dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a = self.lora_A[name]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        down = DropoutLoraA.apply(x, lora_a.weight, self.lora_dropout[name].p)
        result = result + self.lora_B[name](down) * self.scaling[name]
    return result.to(torch_result_dtype)


# ---- the heap trimmed between decoder layers ----------------------------------------------------------------
def _trim_after_layer(layer, args, output):
    """Forward hook of a decoder layer in training: trim now, and again when the backward pass reaches it."""
    if not (layer.training and torch.is_grad_enabled()):
        return
    trim_malloc()
    hidden = output[0] if isinstance(output, tuple) else output
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        hidden.register_hook(_trim_in_backward)


def _trim_in_backward(grad):
    trim_malloc()  # the layer above has finished its backward (and its recomputation, under checkpointing)


def _decoder_layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def reduce_training_memory(model, trim_between_layers: bool = False) -> int:
    """Install DropoutLoraA on the model's plain PEFT LoRA Linear layers and, if trim_between_layers, the
    trimming hook on its decoder layers; returns how many LoRA layers changed. Idempotent."""
    changed = 0
    for module in model.modules():
        if _plain_lora_linear(module) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_lean_lora_forward, module)
            changed += 1
    for layer in _decoder_layers(model) if trim_between_layers else ():
        if "_medlora_trim_hook" not in layer.__dict__:
            layer._medlora_trim_hook = layer.register_forward_hook(_trim_after_layer)
    return changed


def restore_training_memory(model) -> None:
    """Undo reduce_training_memory: the class's own forward again, no trimming hooks."""
    for module in model.modules():
        if module.__dict__.get("forward") is not None and getattr(module.forward, "__func__", None) is _lean_lora_forward:
            del module.forward
    for layer in _decoder_layers(model):
        if "_medlora_trim_hook" in layer.__dict__:
            layer.__dict__.pop("_medlora_trim_hook").remove()
