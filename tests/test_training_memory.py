"""medlora/training/memory.py: LoRA dropout without copies computes what PEFT computes (tiny model, CPU);
medlora/training/malloc.py: the glibc settings apply."""

import pytest
import torch

from medlora.training.malloc import lean_malloc, trim_malloc
from medlora.training.memory import reduce_training_memory, restore_training_memory


def lora_model(tiny_model_path, dropout, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets),
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    model.train()
    return model


def loss_and_grads(model, seed):
    ids = torch.arange(3, 3 + 2 * 24).reshape(2, 24) % model.config.vocab_size
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, torch.rand(1)  # the last: where the random stream stands afterwards


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_same_loss_gradients_and_random_stream_as_peft(tiny_model_path, dropout):
    model = lora_model(tiny_model_path, dropout)
    stock = loss_and_grads(model, seed=1)
    changed = reduce_training_memory(model)
    assert changed == 7 * model.config.num_hidden_layers
    lean = loss_and_grads(model, seed=1)
    torch.testing.assert_close(lean[0], stock[0], rtol=1e-6, atol=0)
    assert lean[1].keys() == stock[1].keys()
    for name in stock[1]:
        torch.testing.assert_close(lean[1][name], stock[1][name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(lean[2], stock[2])  # the same random numbers were drawn
    restore_training_memory(model)
    assert "forward" not in model.base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_gradient_checkpointing_and_eval_unchanged(tiny_model_path):
    model = lora_model(tiny_model_path, 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    stock = loss_and_grads(model, seed=2)
    reduce_training_memory(model)
    lean = loss_and_grads(model, seed=2)
    torch.testing.assert_close(lean[0], stock[0], rtol=1e-6, atol=0)
    for name in stock[1]:
        torch.testing.assert_close(lean[1][name], stock[1][name], rtol=1e-5, atol=1e-7, msg=name)
    model.eval()
    ids = torch.arange(5, 21)[None]
    with torch.no_grad():
        lean_logits = model(input_ids=ids).logits
        restore_training_memory(model)
        torch.testing.assert_close(model(input_ids=ids).logits, lean_logits, rtol=0, atol=0)


def test_malloc_settings_apply_on_glibc():
    import os

    glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else ""
    assert lean_malloc() == bool(glibc and glibc.startswith("glibc"))
    trim_malloc()


def test_restart_with_lean_malloc_reexecutes_once_with_the_tcache_off():
    import os
    import subprocess
    import sys

    code = ("import os, sys; from medlora.training.malloc import restart_with_lean_malloc; "
            "print('run', flush=True); restart_with_lean_malloc(); print(os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MEDLORA_DEFAULT_MALLOC")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["run", "run", "glibc.malloc.tcache_count=0"]  # started twice, the second time with it
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MEDLORA_DEFAULT_MALLOC": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["run", "None"]


def test_checkpointed_cpu_runs_take_the_loss_in_smaller_chunks(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from medlora.training.loss import CHUNK, chunk_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    hidden = torch.zeros(2, model.config.hidden_size)
    assert chunk_rows(model, hidden, 49152) == CHUNK
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert chunk_rows(model, hidden, 49152) == 64  # 12 MiB of fp32 logits
    assert chunk_rows(model, hidden, 1_000_000) == 16


def test_heap_trimmed_after_each_layer_forward_and_before_its_backward_only_when_asked(tiny_model_path, monkeypatch):
    import medlora.training.memory as memory

    trims = []
    monkeypatch.setattr(memory, "trim_malloc", lambda: trims.append(1))
    model = lora_model(tiny_model_path, 0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = model.config.num_hidden_layers
    reduce_training_memory(model)
    untrimmed = loss_and_grads(model, seed=3)
    assert trims == []
    reduce_training_memory(model, trim_between_layers=True)
    reduce_training_memory(model, trim_between_layers=True)  # idempotent: one hook per layer
    trimmed = loss_and_grads(model, seed=3)
    assert len(trims) == 2 * layers  # each layer: after its forward, and when the backward pass reaches it
    torch.testing.assert_close(trimmed[0], untrimmed[0], rtol=0, atol=0)
    for name in untrimmed[1]:
        torch.testing.assert_close(trimmed[1][name], untrimmed[1][name], rtol=0, atol=0, msg=name)
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.arange(5, 21)[None])
    assert len(trims) == 2 * layers  # not in evaluation
    restore_training_memory(model)
    model.train()
    loss_and_grads(model, seed=3)
    assert len(trims) == 2 * layers


@pytest.mark.parametrize("checkpointing, bf16, trimmed", [(True, False, True), (False, False, False),
                                                           (True, True, False)])
def test_trainer_trims_between_layers_under_checkpointing_in_fp32(tiny_model_path, tmp_path, checkpointing, bf16,
                                                                 trimmed):
    from transformers import TrainingArguments

    from medlora.training.trainer import LabelOnlyLossTrainer

    model = lora_model(tiny_model_path, 0.05)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, activation_checkpointing=checkpointing,
                             bf16=bf16, report_to=[])
    LabelOnlyLossTrainer(model=model, args=args)
    layers = model.base_model.model.model.layers
    assert all(("_medlora_trim_hook" in layer.__dict__) == trimmed for layer in layers)
    assert "forward" in layers[0].self_attn.q_proj.__dict__  # DropoutLoraA in every case
