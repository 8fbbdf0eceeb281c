"""finetune.py at scale, on CPU: QLoRA, torchrun, exact resume, packing across architectures, LoRA variants."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS,
)
from safetensors.torch import load_file

import finetune
from medlora.data.records import load_conversations
from medlora.data.templates import PromptTemplate
from medlora.data.tokenization import ConversationEncoder
from medlora.models.loading import load_for_inference
from medlora.models.packed_attention import use_packed_attention
from medlora.run_folder import CHECKPOINT_COMPLETE
from medlora.training.collators import PackedCollator, PaddedCollator, supports_packing
from medlora.training.trainer import label_only_loss
from tests.conftest import ROOT, SAMPLE_SFT, TINY, run_script

QUICK = dict(batch_size=4, micro_batch_size=2, val_set_size=0, warmup_steps=0, logging_steps=1, cutoff_len=96,
             save_steps=1000, learning_rate=1e-2)


def losses(output_dir):
    return [e["loss"] for e in json.loads((output_dir / "training_log.json").read_text()) if "loss" in e]


def adapter_weights(output_dir):
    return load_file(output_dir / "adapter_model.safetensors")


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_on_quantized_weights(tmp_path, bits):
    import bitsandbytes as bnb

    flag = {"load_in_4bit": True} if bits == 4 else {"load_in_8bit": True}
    result = finetune.train(base_model=TINY, output_dir=str(tmp_path / "q"), max_steps=2, **QUICK, **flag)
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    base = result.model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, quantized)
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
    assert len(losses(tmp_path / "q")) == 2 and all(l == l for l in losses(tmp_path / "q"))
    assert adapter_weights(tmp_path / "q")


@pytest.mark.slow
def test_torchrun_two_processes_matches_one_process(tmp_path):
    flags = ["--base_model", TINY, "--max_steps", 3, "--batch_size", 8, "--micro_batch_size", 2, "--val_set_size", 0,
             "--logging_steps", 1, "--cutoff_len", 128, "--warmup_steps", 0, "--learning_rate", 1e-2, "--lora_dropout", 0,
             "--save_steps", 1000]
    run_script("finetune.py", "--output_dir", tmp_path / "one", *flags)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                "finetune.py", "--output_dir", str(tmp_path / "two"), *map(str, flags)]
    result = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done in") == 1  # rank 0 alone reports and saves
    settings = json.loads((tmp_path / "two" / "medlora_run.json").read_text())
    assert settings["world_size"] == 2 and settings["gradient_accumulation_steps"] == 2
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-3
    assert max_difference(adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")) < 1e-4


@pytest.mark.slow
def test_torchrun_batch_size_must_divide(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                "finetune.py", "--base_model", TINY, "--output_dir", str(tmp_path / "x"), "--batch_size", "6",
                "--micro_batch_size", "2"]
    result = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--batch_size 6 must be a multiple of --micro_batch_size 2 x 2 processes" in result.stderr


@pytest.mark.slow
def test_torchrun_bad_record_stops_every_process_with_the_error(tmp_path):
    """Rank 0 validates; its one-line error reaches every rank, each exits 2 (not a hang, not an abort
    of a process group left open) and nothing is written."""
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "Fever?", "output": "Rest."}, {"instruction": "", "output": "x"}]))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                "finetune.py", "--base_model", TINY, "--output_dir", str(tmp_path / "out"), "--data_path", str(data),
                "--batch_size", "4", "--micro_batch_size", "2"]
    result = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    message = f"error: {data}: record 2: field 'instruction': empty (and no 'input')"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    # torchrun's per-process summary: the rank that exits first fails the job, and torchrun then stops a rank
    # that is still on its way out with SIGTERM (-15) on a loaded machine; an abort (-6) or a hang is the bug.
    exit_codes = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", result.stderr)
    assert "2" in exit_codes and set(exit_codes) <= {"2", "-15"}, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_adapter(tmp_path):
    flags = ["--base_model", TINY, "--max_steps", 6, "--save_steps", 2, "--batch_size", 4, "--micro_batch_size", 2,
             "--val_set_size", 0, "--cutoff_len", 96, "--warmup_steps", 2, "--learning_rate", 1e-2,
             "--save_total_limit", 5]
    run_script("finetune.py", "--output_dir", tmp_path / "straight", *flags)

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "finetune.py", "--output_dir", str(killed), *map(str, flags)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / CHECKPOINT_COMPLETE).exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before checkpoint-4"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter_model.safetensors").exists()
    # A checkpoint whose save was cut short (no completion marker) must never be picked up.
    half_written = killed / "checkpoint-6"
    if half_written.exists():
        (half_written / CHECKPOINT_COMPLETE).unlink(missing_ok=True)
    else:
        half_written.mkdir()
        (half_written / "trainer_state.json").write_text("{\"global_st")
    result = run_script("finetune.py", "--output_dir", killed, *flags, "--resume_from_checkpoint", "True")
    assert result.returncode == 0
    assert max_difference(adapter_weights(tmp_path / "straight"), adapter_weights(killed)) <= 1e-5


def tiny_config(architecture, vocab_size):
    import transformers as t

    shape = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": lambda: t.LlamaConfig(**shape, **small, num_key_value_heads=2),
        "mistral": lambda: t.MistralConfig(**shape, **small, num_key_value_heads=2),
        "qwen2": lambda: t.Qwen2Config(**shape, **small, num_key_value_heads=2),
        "gemma": lambda: t.GemmaConfig(**shape, **small, num_key_value_heads=2, head_dim=16),
        "phi": lambda: t.PhiConfig(**shape, **small),
        "gpt_neox": lambda: t.GPTNeoXConfig(**shape, **small),
        "bloom": lambda: t.BloomConfig(**shape, hidden_size=64, n_layer=2, n_head=4),
        "gpt2": lambda: t.GPT2Config(**shape, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    }[architecture]()


ARCHITECTURES = ["llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "bloom", "gpt2"]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_common_architecture_trains_with_its_default_targets(tmp_path, tiny_model_path, tiny_tokenizer,
                                                                   architecture):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, len(tiny_tokenizer)))
    base = tmp_path / architecture
    model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)

    result = finetune.train(base_model=str(base), output_dir=str(tmp_path / "out"), max_steps=2, **QUICK)
    settings = json.loads((tmp_path / "out" / "medlora_run.json").read_text())
    assert settings["lora_target_modules"] == PEFT_DEFAULT_TARGETS[architecture]
    assert settings["packing"] == (architecture != "bloom")  # BLOOM's ALiBi takes no position_ids
    assert adapter_weights(tmp_path / "out")

    # Padding-free batches give the padded batches' loss wherever packing is used.
    model = result.model.eval()
    conversations = load_conversations(SAMPLE_SFT).conversations[:4]
    report = ConversationEncoder(tiny_tokenizer, PromptTemplate.load("alpaca"), 128).encode(conversations)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in report.examples]
    with torch.no_grad():
        padded = label_only_loss(model, PaddedCollator(tiny_tokenizer.pad_token_id)(examples))
        reference = model(**PaddedCollator(tiny_tokenizer.pad_token_id)(examples)).loss
        if supports_packing(model):
            assert abs(label_only_loss(model, PackedCollator()(examples)).item() - padded.item()) < 1e-4
            assert use_packed_attention(model, 128)  # per-record attention, as finetune.py trains
            assert abs(label_only_loss(model, PackedCollator()(examples)).item() - padded.item()) < 1e-4
    assert abs(padded.item() - reference.item()) < 1e-4


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    plain = finetune.train(base_model=TINY, output_dir=str(tmp_path / "plain"), max_steps=2, lora_dropout=0, **QUICK)
    checkpointed = finetune.train(base_model=TINY, output_dir=str(tmp_path / "gc"), max_steps=2, lora_dropout=0,
                                  gradient_checkpointing=True, **QUICK)
    assert checkpointed.trainer.args.activation_checkpointing_kwargs == {"use_reentrant": False}
    # really on in the trained model (and off without the flag), so the equal losses below mean something
    assert checkpointed.model.get_base_model().is_activation_checkpointing
    assert not plain.model.get_base_model().is_activation_checkpointing
    assert max(abs(a - b) for a, b in zip(losses(tmp_path / "plain"), losses(tmp_path / "gc"))) < 1e-5
    assert max_difference(adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "gc")) < 1e-5
    del plain


@pytest.mark.slow
def test_lora_variants_are_configured_and_saved(tmp_path):
    finetune.train(base_model=TINY, output_dir=str(tmp_path / "v"), max_steps=1, use_dora=True, use_rslora=True,
                   neftune_noise_alpha=5.0, lora_modules_to_save="lm_head", **QUICK)
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    keys = adapter_weights(tmp_path / "v").keys()
    assert any("lora_magnitude_vector" in k for k in keys) and any("lm_head" in k for k in keys)
    with pytest.raises(Exception, match="not_a_module not in this model"):
        finetune.train(base_model=TINY, output_dir=str(tmp_path / "w"), max_steps=1, lora_modules_to_save="not_a_module",
                       **QUICK)


@pytest.mark.slow
def test_neftune_changes_the_training_loss(tmp_path):
    finetune.train(base_model=TINY, output_dir=str(tmp_path / "a"), max_steps=1, lora_dropout=0, **QUICK)
    finetune.train(base_model=TINY, output_dir=str(tmp_path / "b"), max_steps=1, lora_dropout=0, neftune_noise_alpha=50.0,
                   **QUICK)
    assert abs(losses(tmp_path / "a")[0] - losses(tmp_path / "b")[0]) > 1e-4


@pytest.mark.slow
def test_full_fine_tuning_saves_a_whole_model(tmp_path, tiny_model_path):
    result = finetune.train(base_model=TINY, output_dir=str(tmp_path / "full"), max_steps=2, use_lora=False,
                            precision="fp32", **QUICK)  # compared with a reload in fp32, the reference
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in result.model.parameters())
    assert (tmp_path / "full" / "model.safetensors").is_file()
    reloaded = load_for_inference(base_model=str(tmp_path / "full"))
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        assert torch.allclose(reloaded.model(ids).logits, result.model.eval()(ids).logits, atol=1e-5)
