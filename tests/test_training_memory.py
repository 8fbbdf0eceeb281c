"""medlora/training/memory.py: LoRA dropout without copies computes what PEFT computes with the same masks (tiny
model, CPU), and its masks drop p of the elements;
medlora/training/malloc.py: the glibc settings give freed tensors back or keep them for reuse."""

import os
import subprocess
import sys

import pytest
import torch

from medlora.training.malloc import trim_malloc
from medlora.training.memory import dropout_drop_mask, reduce_training_memory, restore_training_memory


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


def assert_close_to_scale(actual, expected, tolerance, name):
    """Every element within tolerance times the largest element of expected (rounding, not a different sum)."""
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * expected.abs().max().item(), f"{name}: off by {error:.3g}"


class SameMaskDropout(torch.nn.Module):
    """What PEFT computes when its dropout draws LoraBranch's mask: plain autograd, float copies and all."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        # torch's own dropout on CPU: noise = bernoulli_(1 - p).div_(1 - p), then input * noise; this noise instead
        return x * (~dropout_drop_mask(x.shape, self.p)).to(x.dtype).div_(1 - self.p)


def peft_with_the_same_masks(tiny_model_path, dropout):
    model = lora_model(tiny_model_path, dropout)
    for module in model.modules():
        if hasattr(module, "lora_dropout") and dropout:
            for name in module.lora_dropout:
                module.lora_dropout[name] = SameMaskDropout(dropout)
    return model


@pytest.mark.parametrize("dropout", [0.05, 0.0])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_gradients_as_peft_given_the_same_masks(tiny_model_path, dropout, checkpointing):
    models = peft_with_the_same_masks(tiny_model_path, dropout), lora_model(tiny_model_path, dropout)
    for model in models:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    stock = loss_and_grads(models[0], seed=1)
    changed = reduce_training_memory(models[1])
    assert changed == 7 * models[1].config.num_hidden_layers
    lean = loss_and_grads(models[1], seed=1)
    torch.testing.assert_close(lean[0], stock[0], rtol=1e-6, atol=0)
    assert lean[1].keys() == stock[1].keys()
    for name in stock[1]:  # equal up to rounding: 1 / (1 - p) and scaling are applied to rank-r products
        assert_close_to_scale(lean[1][name], stock[1][name], 1e-5, name)
    assert torch.equal(lean[2], stock[2])  # as many random numbers drawn: one mask per adapted layer
    restore_training_memory(models[1])
    assert "forward" not in models[1].base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_layers_with_a_bias_give_peft_s_loss_and_gradients():
    """A Linear with a bias returns a view (not added to in place): Qwen2's q/k/v."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", init_lora_weights=False))
        models.append(model.train())
    for module in models[0].modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = SameMaskDropout(0.1)
    stock = loss_and_grads(models[0], seed=3)
    assert reduce_training_memory(models[1]) == 14
    lean = loss_and_grads(models[1], seed=3)
    torch.testing.assert_close(lean[0], stock[0], rtol=1e-6, atol=0)
    for name in stock[1]:
        assert_close_to_scale(lean[1][name], stock[1][name], 1e-5, name)


def test_as_close_to_fp32_as_peft_under_bf16_autocast(tiny_model_path):
    """bf16 autocast (--precision auto on CPUs with AMX): products run in bf16 as PEFT's do, so both
    differ from fp32 by bf16 rounding; LoraBranch no more than PEFT, and its fp32 adapter weights get fp32 gradients."""
    reference = loss_and_grads(peft_with_the_same_masks(tiny_model_path, 0.05), seed=1)
    models = peft_with_the_same_masks(tiny_model_path, 0.05), lora_model(tiny_model_path, 0.05)
    reduce_training_memory(models[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock, lean = loss_and_grads(models[0], seed=1), loss_and_grads(models[1], seed=1)
    assert torch.equal(lean[2], stock[2])

    def worst_error(grads):  # relative to the fp32 reference, over the adapter weights
        return max(((grads[name] - expected).norm() / expected.norm()).item() for name, expected in reference[1].items())

    assert all(grad.dtype == torch.float32 for grad in lean[1].values())
    assert 0 < worst_error(lean[1]) <= 1.5 * worst_error(stock[1])  # measured: 0.074 against PEFT's 0.064
    assert abs(lean[0] - reference[0]) <= max(2 * abs(stock[0] - reference[0]), 1e-4)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_drops_p_of_the_elements_and_follows_the_seed(p):
    torch.manual_seed(0)
    keep = ~dropout_drop_mask((1000, 1000), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs((1 - keep.float().mean().item()) - p) < 5 * sigma
    rows, columns = keep.float().mean(1), keep.float().mean(0)  # no structure along either axis
    assert abs(rows.std().item() - (p * (1 - p) / 1000) ** 0.5) < 0.2 * (p * (1 - p) / 1000) ** 0.5
    assert abs(columns.std().item() - (p * (1 - p) / 1000) ** 0.5) < 0.2 * (p * (1 - p) / 1000) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(~dropout_drop_mask((1000, 1000), p), keep)


def test_checkpointing_recomputes_the_same_masks_and_eval_is_unchanged(tiny_model_path):
    plain, checkpointed = lora_model(tiny_model_path, 0.1), lora_model(tiny_model_path, 0.1)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.enable_input_require_grads()
    for model in (plain, checkpointed):
        reduce_training_memory(model)
    reference, recomputed = loss_and_grads(plain, seed=2), loss_and_grads(checkpointed, seed=2)
    torch.testing.assert_close(recomputed[0], reference[0], rtol=1e-6, atol=0)
    for name in reference[1]:
        torch.testing.assert_close(recomputed[1][name], reference[1][name], rtol=1e-5, atol=1e-7, msg=name)
    model = checkpointed
    model.eval()
    ids = torch.arange(5, 21)[None]
    with torch.no_grad():
        lean_logits = model(input_ids=ids).logits
        restore_training_memory(model)
        torch.testing.assert_close(model(input_ids=ids).logits, lean_logits, rtol=0, atol=0)


FAULTS_OF_FREED_AND_REUSED_TENSORS = """
import resource, sys, torch
from medlora.training.malloc import tune_malloc
assert tune_malloc(memory_first=sys.argv[1] == "memory_first")
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    torch.ones(3 << 20)  # 12 MiB, freed at once
before = faults()
for _ in range(10):
    torch.ones(3 << 20)
print(faults() - before)
"""


@pytest.mark.skipif(not (hasattr(os, "confstr") and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")),
                    reason="the malloc settings are glibc's")
def test_malloc_gives_freed_tensors_back_when_memory_comes_first_and_reuses_them_otherwise():
    def faults(setting):  # in a process with the tcache off, as restart_with_lean_malloc starts finetune.py
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_FREED_AND_REUSED_TENSORS, setting],
                             env={**os.environ, "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"},
                             capture_output=True, text=True, check=True)
        return int(run.stdout)

    given_back, reused = faults("memory_first"), faults("reuse")
    assert given_back >= 10  # every new tensor is a new mapping: at least one page fault each (more without THP)
    assert reused < given_back / 10  # the freed pages are used again without faults
    trim_malloc()


def test_restart_with_lean_malloc_reexecutes_once_with_the_tcache_off():
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
    assert "forward" in layers[0].self_attn.q_proj.__dict__  # LoraBranch in every case


def test_frozen_weights_are_cast_once_and_again_when_they_change():
    """Under CPU autocast the LoRA path casts a frozen base weight to bf16 once and keeps it (memory.py): a changed
    weight (an in-place update, a new tensor) is cast again, a trained one is never kept, and forget_casts frees it."""
    from medlora.training.memory import _cast_once, _frozen_cast, forget_casts

    linear = torch.nn.Linear(4, 3).requires_grad_(False)
    first = _frozen_cast(linear, torch.bfloat16)
    assert first[0] is _frozen_cast(linear, torch.bfloat16)[0] and first[0].dtype == torch.bfloat16
    with torch.no_grad():
        linear.weight.mul_(2)  # in place: the version changes
    assert torch.equal(_frozen_cast(linear, torch.bfloat16)[0], linear.weight.to(torch.bfloat16))
    linear.weight = torch.nn.Parameter(torch.ones(3, 4), requires_grad=False)  # a new tensor
    assert torch.equal(_frozen_cast(linear, torch.bfloat16)[0], torch.ones(3, 4, dtype=torch.bfloat16))
    trained = torch.nn.Linear(4, 3)
    _frozen_cast(trained, torch.bfloat16)
    assert "_medlora_cast" not in trained.__dict__
    forget_casts(linear)
    assert "_medlora_cast" not in linear.__dict__
    # One cast for the layers that read the same input in a row; a new one once the input changes in place.
    x = torch.randn(2, 4)
    assert _cast_once(x, torch.bfloat16) is _cast_once(x, torch.bfloat16)
    before = _cast_once(x, torch.bfloat16)
    x.add_(1)
    assert _cast_once(x, torch.bfloat16) is not before and torch.equal(_cast_once(x, torch.bfloat16), x.bfloat16())


def test_a_conv1d_base_layer_keeps_its_own_forward_under_bf16_autocast():
    """GPT-2's Conv1D holds its weight transposed: under CPU autocast its LoRA layer runs the Conv1D itself, not the
    cast-once Linear path, and computes what PEFT's own forward does (no dropout: the same computation)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.0,
                                                                   fan_in_fan_out=True, init_lora_weights=False))
        models.append(model.train())
    assert reduce_training_memory(models[1]) == 1
    input_ids = torch.randint(0, 100, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock, lean = (model(input_ids=input_ids).logits.float() for model in models)
    torch.testing.assert_close(lean, stock, rtol=2 ** -7, atol=2 ** -7 * stock.abs().max().item())
