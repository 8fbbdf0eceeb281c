"""Where the memory of one LoRA training micro-batch goes (CPU, fp32), for docs/BENCHMARKS.md.

    python scripts/memory_breakdown.py                       # SmolLM2-135M, all-linear LoRA, 8 records, cutoff 256
    python scripts/memory_breakdown.py --base_model builtin:tiny-llama

Builds one packed micro-batch of the bundled data (chat template) as finetune.py does and reports: the weights,
the tensors autograd saves for the backward pass (counted by storage with saved-tensor hooks, parameters left
out) with PEFT's own LoRA forward and with medlora/training/memory.py's, with and without gradient checkpointing,
and what full-vocabulary logits would take at every position (what label_only_loss avoids).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medlora import cli  # noqa: E402 (after the path above)

MIB = 2**20


def saved_bytes(model, batch, parameters) -> int:
    """Bytes of distinct storages autograd keeps for backward during one forward pass (parameters excluded)."""
    import torch

    from medlora.training.loss import label_only_loss

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = label_only_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def main(base_model: str = "builtin:smollm2-135m-instruct", records: int = 8, cutoff_len: int = 256,
         template: str = "chat", lora_dropout: float = 0.05):
    import torch
    from peft import LoraConfig, get_peft_model

    from medlora.data.records import load_conversations
    from medlora.data.templates import PromptTemplate
    from medlora.data.tokenization import ConversationEncoder
    from medlora.models.loading import load_base_model, load_tokenizer, resolve_base_model, resolve_lora_targets
    from medlora.models.packed_attention import use_packed_attention
    from medlora.paths import DATA_DIR
    from medlora.training.collators import PackedCollator
    from medlora.training.memory import reduce_training_memory, restore_training_memory

    torch.manual_seed(0)
    path = resolve_base_model(base_model)
    encoder = ConversationEncoder(load_tokenizer(path), PromptTemplate.load(template), cutoff_len)
    examples = encoder.encode(load_conversations(str(DATA_DIR / "sft")).conversations[:records]).examples
    batch = PackedCollator()([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    tokens, labelled = batch["input_ids"].numel(), int((batch["labels"] != -100).sum())
    model = load_base_model(path, torch.float32)
    use_packed_attention(model, cutoff_len)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                                             target_modules=resolve_lora_targets(model, "all-linear")))
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                           for p in model.parameters()}.values())
    config = model.get_base_model().config
    print(f"{base_model}: {tokens} tokens in the micro-batch ({labelled} labelled), "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}")
    print(f"weights (fp32, tied embeddings counted once): {weights / MIB:.0f} MiB")
    rows = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        for name, lean in (("PEFT's LoRA forward", False), ("medlora/training/memory.py", True)):
            (reduce_training_memory if lean else restore_training_memory)(model)
            rows[checkpointing, lean] = saved_bytes(model, batch, parameters)
            print(f"saved for backward, {'with' if checkpointing else 'without'} checkpointing, {name}: "
                  f"{rows[checkpointing, lean] / MIB:.0f} MiB ({rows[checkpointing, lean] / tokens / 1024:.1f} "
                  f"KiB per token)")
    print(f"LoRA dropout copies (the difference, without checkpointing): "
          f"{(rows[False, False] - rows[False, True]) / MIB:.0f} MiB")
    print(f"full-vocabulary fp32 logits at every position: {tokens * config.vocab_size * 4 / MIB:.0f} MiB; "
          f"label_only_loss's largest chunk: {min(256, labelled) * config.vocab_size * 4 / MIB:.0f} MiB")


if __name__ == "__main__":
    cli.run(main)  # flags checked before any work
