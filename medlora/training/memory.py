"""Less memory and time for LoRA training on CPU, with the same computation (same loss and gradients for the same
dropout masks, up to rounding).

Two measured causes of the peak on CPU (docs/BENCHMARKS.md, "Where the memory goes"); this module fixes the
first, medlora/training/malloc.py (glibc malloc settings) and the trimming hooks below the second.

1. **LoRA dropout copies.** PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`. On CPU, `nn.Dropout`
   draws a float noise tensor (`bernoulli_(1 - p) / (1 - p)`) and multiplies: autograd keeps the noise for the
   dropout's backward and `lora_A` keeps the dropped-out input for its weight gradient, two float copies of every
   adapted module's input: on SmolLM2-135M with all seven linear layers adapted, 977 of 3,121 MiB saved for
   backward. `LoraBranch` computes the whole adapter branch keeping `x` (the same tensor for q/k/v, and for
   gate/up), a one-byte mask and lora_A's rank-r output; its backward rebuilds the dropped-out input from them.
   It is also faster: every tensor of the layer's input or output size is a full pass over memory, and PEFT
   makes several (noise, product, lora_B's output, its product by scaling, the sum; and their gradients).
   LoraBranch zeroes the dropped elements in one pass, applies 1 / (1 - p) and scaling to rank-r tensors and
   adds lora_B's product to the base output in place (`addmm_`).
   The mask: the same distribution as `nn.Dropout`'s (each element dropped with probability p, to 2**-16, the
   rest scaled by 1 / (1 - p)), reproducible from torch's generator (`torch.manual_seed`, checkpointing's
   recomputation) but not drawn with the same calls: `bernoulli_` on a float tensor took 24% of a SmolLM2
   training step in bf16 on CPU; numpy's PCG64, seeded from torch's generator, is several times faster
   (docs/BENCHMARKS.md). The random stream therefore differs from stock PEFT's; with the same mask, loss and
   gradients are PEFT's up to rounding (tests/test_training_memory.py).
2. **glibc malloc** holding freed memory: medlora/training/malloc.py sets glibc up. Under gradient checkpointing
   in fp32, the heap is also trimmed after each decoder layer's forward and before its backward (`malloc_trim`):
   the layer inputs kept for the backward pass (3.75 MiB each on SmolLM2 with 1,700 tokens) sit on the heap
   between the freed temporaries of every layer, which glibc does not give back from the middle of the heap by
   itself. Measured on the target run (docs/BENCHMARKS.md): peak RSS 1,567 to 1,709 MiB without, 1,464 to 1,478 with,
   for about 12% more CPU time (the trimmed pages are faulted in again). Under bf16 autocast the casts of
   every weight churn the heap and trimming cost a quarter of the step for 6% less memory: not used there.

`reduce_training_memory(model, trim_between_layers)` installs `LoraBranch` on every plain PEFT LoRA Linear layer
(an instance attribute: classes, saved files and inference are untouched) and, when asked, the trimming hook on
every decoder layer; anything else (DoRA and other variants, quantized layers, mixed adapter batches, evaluation,
GPUs) runs PEFT's own forward.
"""

import math
import types
import weakref

import numpy as np
import torch

from medlora.training.malloc import trim_malloc


# ---- LoRA branch without copies ---------------------------------------------------------------------------------
def dropout_drop_mask(shape, p: float) -> torch.Tensor:
    """A bool mask, each element True (dropped) with probability p, to 2**-16.

    The bits come from numpy's PCG64, seeded by one draw from torch's generator: `torch.manual_seed` and
    checkpointing's recomputation (which restores torch's RNG state) reproduce the mask. 16 bits per element
    (four from each 64-bit draw) compared by numpy: 2.2x faster than 32 bits compared by torch, which was 2.5x
    faster than torch's own CPU generator (mt19937) filling the mask with `random_` (docs/BENCHMARKS.md)."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    bits = np.random.PCG64(seed).random_raw((count + 3) // 4).view(np.uint16)[:count]  # uniform on [0, 2**16)
    return torch.from_numpy(bits < round(p * 2**16)).view(shape)


class LoraBranch(torch.autograd.Function):
    """base_out + scaling * lora_B(lora_A(nn.Dropout(p)(x))) for one plain LoRA adapter, training on CPU.

    Against PEFT's forward (dropout, two Linear calls, a product by scaling and a sum), this keeps x and a
    one-byte mask instead of two float copies of x for the backward pass, and never builds a tensor of the
    layer's input or output size beyond the one it must: the dropped elements are zeroed in one pass, 1 / (1 - p)
    and scaling are applied to the rank-r tensors, and lora_B's product is added to base_out in place by `addmm_`
    (out of place where base_out is a view).
    p == 0 (PEFT's nn.Identity dropout) keeps no mask. Under autocast the products run in the autocast dtype,
    as PEFT's Linear calls do; the gradients come back in each input's own dtype.
    """

    @staticmethod
    def forward(ctx, x, base_out, weight_a, weight_b, p, scaling):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        dropped_mask = dropout_drop_mask(x.shape, p) if p else None
        with torch.autocast(device, enabled=False):
            dropped = LoraBranch._dropped(x, dropped_mask, dtype)
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            down = dropped.reshape(-1, x.shape[-1]) @ a.t()
            if p:
                down.div_(1 - p)
            if base_out.dtype == dtype and base_out.is_contiguous() and base_out._base is None:
                # in place: base_out is the base layer's fresh output, which its backward does not keep (autograd's
                # version counter would catch it otherwise); a new tensor of this size costs 5x the product on CPU.
                # Not on a view (a Linear with a bias returns one): autograd would rewrite the view's history.
                ctx.mark_dirty(base_out)
                out = base_out
                out.view(-1, out.shape[-1]).addmm_(down, b.t(), alpha=scaling)
            else:
                out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]).to(dtype), down, b.t(),
                                  alpha=scaling).view(base_out.shape)
        ctx.save_for_backward(x, dropped_mask, weight_a, weight_b, down)
        ctx.p, ctx.scaling, ctx.dtype, ctx.base_dtype = p, scaling, dtype, base_out.dtype
        return out

    @staticmethod
    def _dropped(x, mask, dtype):
        """x in dtype with the masked elements zeroed."""
        return x.to(dtype) if mask is None else torch.where(mask, 0.0, x.to(dtype))  # where: 2x masked_fill's speed

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, weight_a, weight_b, down = ctx.saved_tensors
        p, scaling, dtype = ctx.p, ctx.scaling, ctx.dtype
        with torch.autocast(x.device.type, enabled=False):
            grad = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            a, b = weight_a.to(dtype), weight_b.to(dtype)
            grad_down = (grad @ b).mul_(scaling)  # rank r: the scalings cost nothing here
            # (down.t() @ grad).t(), not grad.t() @ down: 5x faster on CPU for the same product
            grad_b = (down.t() @ grad).mul_(scaling).t().to(weight_b.dtype) if ctx.needs_input_grad[3] else None
            if p:
                grad_down.div_(1 - p)
            grad_a = grad_x = None
            if ctx.needs_input_grad[2]:
                dropped = LoraBranch._dropped(x, mask, dtype)
                grad_a = (grad_down.t() @ dropped.reshape(-1, x.shape[-1])).to(weight_a.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (grad_down @ a).view(x.shape)
                grad_x = (grad_x if mask is None else torch.where(mask, 0.0, grad_x)).to(x.dtype)
        grad_base = grad_out.to(ctx.base_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_base, grad_a, grad_b, None, None


def _plain_lora_linear(module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return False
    return type(module) is LoraLinear  # quantized and other LoRA layers have forwards of their own


def _dropout_p(dropout) -> float | None:
    """PEFT's dropout module as a probability: nn.Dropout(p) in training, nn.Identity; None for anything else."""
    if type(dropout) is torch.nn.Identity:
        return 0.0
    if type(dropout) is torch.nn.Dropout and dropout.training and 0 <= dropout.p < 1:
        return dropout.p
    return None


def _lean_applies(layer, x, args, kwargs) -> bool:
    if not (torch.is_grad_enabled() and layer.training and x.device.type == "cpu") or args or kwargs:
        return False
    if layer.disable_adapters or layer.merged:
        return False
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
        if (name in layer.lora_variant or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear
                or lora_a.bias is not None or lora_b.bias is not None or _dropout_p(layer.lora_dropout[name]) is None):
            return False
    return True


def _lean_lora_forward(self, x, *args, **kwargs):
    """PEFT's LoraLinear.forward for plain LoRA adapters, each adapter's branch as one LoraBranch."""
    if not _lean_applies(self, x, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x)
    autocast = torch.is_autocast_enabled("cpu")
    if autocast:
        x = _cast_once(x, torch.get_autocast_dtype("cpu"))
    if autocast and type(self.base_layer) is torch.nn.Linear:  # (GPT-2's Conv1D keeps its own forward)
        weight, bias = _frozen_cast(self.base_layer, x.dtype)
        result = torch.nn.functional.linear(x, weight, bias)
    else:
        result = self.base_layer(x)
    torch_result_dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        lora_a = self.lora_A[name]
        if not autocast:  # (under autocast the branch computes in the autocast dtype: no round trip to fp32)
            x = self._cast_input_dtype(x, lora_a.weight.dtype)
        result = LoraBranch.apply(x, result, lora_a.weight, self.lora_B[name].weight,
                                  _dropout_p(self.lora_dropout[name]), self.scaling[name])
    return result.to(torch_result_dtype)


# ---- bf16 autocast on CPU: each cast made once -----------------------------------------------------------------
# Autocast casts a Linear's fp32 weight to bf16 at every call (it caches casts of trainable weights only), and the
# input once for the base layer and again for the LoRA branch; q/k/v (and gate/up) share one input, cast six (four)
# times. Copies were 12% of a SmolLM2 bf16 step on CPU (docs/BENCHMARKS.md). A frozen base weight is cast once and
# kept (autocast's copies lived from the forward to the backward pass anyway), and an input is cast once for all
# the layers that read it in a row.
_last_cast = (None, -1, None)  # (weak reference to the source, its version, the cast)


def _cast_once(x: torch.Tensor, dtype) -> torch.Tensor:
    global _last_cast
    if x.dtype == dtype:
        return x
    source, version, cast = _last_cast
    if source is not None and source() is x and version == x._version and cast.dtype == dtype:
        return cast
    cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, cast)
    return cast


def _frozen_cast(linear, dtype) -> tuple:
    """(weight, bias) of a frozen Linear in dtype, cast at first use and again only if the weight changes."""
    weight, bias = linear.weight, linear.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):  # trained: autocast's own handling
        return weight.to(dtype), None if bias is None else bias.to(dtype)
    key = (weight.data_ptr(), weight._version, dtype)
    cached = linear.__dict__.get("_medlora_cast")
    if cached is None or cached[0] != key:
        cached = linear.__dict__["_medlora_cast"] = (key, weight.to(dtype), None if bias is None else bias.to(dtype))
    return cached[1], cached[2]


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


def decoder_layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def reduce_training_memory(model, trim_between_layers: bool = False) -> int:
    """Install LoraBranch on the model's plain PEFT LoRA Linear layers and, if trim_between_layers, the
    trimming hook on its decoder layers; returns how many LoRA layers changed. Idempotent."""
    changed = 0
    for module in model.modules():
        if _plain_lora_linear(module) and "forward" not in module.__dict__:
            module.forward = types.MethodType(_lean_lora_forward, module)
            changed += 1
    for layer in decoder_layers(model) if trim_between_layers else ():
        if "_medlora_trim_hook" not in layer.__dict__:
            layer._medlora_trim_hook = layer.register_forward_hook(_trim_after_layer)
    return changed


def forget_casts(model) -> None:
    """Free the bf16 copies of frozen weights kept for training (after it, or before anything else uses the model)."""
    global _last_cast
    _last_cast = (None, -1, None)
    for module in model.modules():
        module.__dict__.pop("_medlora_cast", None)


def restore_training_memory(model) -> None:
    """Undo reduce_training_memory: the class's own forward again, no trimming hooks, no cast weights kept."""
    forget_casts(model)
    for module in model.modules():
        if module.__dict__.get("forward") is not None and getattr(module.forward, "__func__", None) is _lean_lora_forward:
            del module.forward
    for layer in decoder_layers(model):
        if "_medlora_trim_hook" in layer.__dict__:
            layer.__dict__.pop("_medlora_trim_hook").remove()
