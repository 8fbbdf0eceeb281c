"""--torch_compile: the decoder layers compiled for training, one compilation shared by every layer.

Regional compilation (PyTorch's recipe for stacks of identical blocks): each decoder layer's forward goes through
one `torch.compile`d function, with dynamic shapes, so that 30 layers and every batch length share two compiled
graphs (the first layer's input needs no gradient, the others' do) and their backward graphs. What it buys is fusion of the elementwise work between the matrix products
(norms, rotary embeddings, the SiLU gate, residual adds, dropout and the LoRA scaling), which is most of what an
fp32 training step on CPU spends outside its products (docs/BENCHMARKS.md, "The ideas the issue named,
measured").

- Attention stays eager: packed attention loops over records whose lengths the batch decides
  (medlora/models/packed_attention.py keeps it out of the graph).
- On CPU the LoRA dropout masks come from the same generator as eager training (memory.dropout_drop_mask, a
  custom op opaque to the compiler): inductor's own CPU random numbers took 6x as long. Each dropout of a layer
  passes its own `salt`, because the compiler merges calls with equal arguments: without it q, k and v (which read
  the same input) got one mask between them. PEFT's LoRA forward runs inside the graph; LoraBranch (memory.py),
  an autograd function the compiler cannot see into, is not installed.
- Only training is compiled: evaluation, generation and anything after training run the layers eagerly, so a
  run compiles once; `uncompile_decoder_layers` takes it all off.
"""

import functools
import types

import torch

from medlora.errors import MedLoRAError
from medlora.training.memory import decoder_layers, dropout_drop_mask


def check_compiler() -> None:
    """On CPU inductor builds its kernels with a C++ compiler: without one, --torch_compile stops before any work
    instead of failing inside the first training step."""
    if torch.cuda.is_available():
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as error:
        raise MedLoRAError(f"--torch_compile: {error}; install one (Debian/Ubuntu: apt-get install g++) or train "
                           "without --torch_compile") from None


@torch.library.custom_op("medlora::dropout_drop_mask", mutates_args=())
def compiled_drop_mask(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    """dropout_drop_mask for x's shape; salt: distinct for each dropout that may see the same x (see above)."""
    return dropout_drop_mask(x.shape, p)


@compiled_drop_mask.register_fake
def _(x, p, salt):
    return torch.empty_like(x, dtype=torch.bool)


def _cpu_dropout(self, x):
    """nn.Dropout's forward with memory.py's masks: the same distribution and, in order, the same masks as
    LoraBranch draws in eager training."""
    if not self.training or self.p == 0:
        return x
    return torch.where(compiled_drop_mask(x, self.p, self.medlora_salt), 0.0, x) * (1 / (1 - self.p))


_COMPILED_FORWARDS = {}  # decoder layer class -> its compiled forward, shared by all its layers


def _compiled_when_training(self, *args, **kwargs):
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return forward(self, *args, **kwargs)
    compiled = _COMPILED_FORWARDS.get(type(self))
    if compiled is None:
        # transformers wraps a layer's forward in its checkpointing; compiled with it, the checkpoint's
        # recomputation drew new dropout masks (the compiled graph does not restore the random state): the layer's
        # own forward is compiled, and checkpointed here as the wrapper does in training
        compiled = _COMPILED_FORWARDS[type(self)] = torch.compile(getattr(forward, "__wrapped__", forward),
                                                                  dynamic=True)
    if self.gradient_checkpointing:
        if not self._can_checkpoint_with_cache:  # (the wrapper's own rule: a recomputation must not write a cache)
            kwargs.update({name: None for name in ("past_key_values", "layer_past") if kwargs.get(name) is not None})
        return self._gradient_checkpointing_func(functools.partial(compiled, self, **kwargs), *args)
    return compiled(self, *args, **kwargs)


def compile_decoder_layers(model) -> int:
    """Compile the model's decoder layers for training (see the module's docstring); returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.forward = types.MethodType(_compiled_when_training, layer)
        if next(layer.parameters()).device.type != "cpu":
            continue  # inductor draws dropout masks on the GPU itself
        dropouts = [module for module in layer.modules() if type(module) is torch.nn.Dropout]
        for salt, dropout in enumerate(dropouts):
            dropout.medlora_salt = salt
            dropout.forward = types.MethodType(_cpu_dropout, dropout)
    return len(layers)


def is_compiled(module) -> bool:
    """Whether compile_decoder_layers changed this module's forward (a decoder layer, or a dropout on CPU)."""
    return getattr(module.__dict__.get("forward"), "__func__", None) in (_compiled_when_training, _cpu_dropout)


def uncompile_decoder_layers(model) -> None:
    """Undo compile_decoder_layers: every layer and dropout with its class's own forward."""
    for module in model.modules():
        if is_compiled(module):
            del module.forward
            module.__dict__.pop("medlora_salt", None)
