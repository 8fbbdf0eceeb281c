"""finetune.py end to end on the built-in tiny model: errors, training, saving and reloading."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import finetune
from medlora.models.loading import load_for_inference
from medlora.models.packed_attention import use_packed_attention
from medlora.models.tiny_model import build_tiny_model
from tests.conftest import SAMPLE_SFT, TINY, run_script


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path):
    output_dir = tmp_path_factory.mktemp("finetune") / "out"
    result = finetune.train(base_model=TINY, output_dir=str(output_dir), max_steps=12, batch_size=8, micro_batch_size=4,
                            learning_rate=3e-3, warmup_steps=0, logging_steps=1, val_set_size=16, eval_steps=6,
                            lora_target_modules="all-linear", cutoff_len=192, save_steps=1000,
                            precision="fp32")  # the reference: auto is bf16 autocast on CPUs with AMX, and the
    return output_dir, result  # trained model keeps the Trainer's autocast wrapper, unlike a reloaded one


def test_training_lowers_the_loss(trained):
    output_dir, result = trained
    losses = [entry["loss"] for entry in json.loads((output_dir / "training_log.json").read_text()) if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    assert result.trainer.state.log_history == json.loads((output_dir / "training_log.json").read_text())


def test_output_folder_holds_a_loadable_non_empty_adapter(trained):
    output_dir, result = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "medlora_run.json"):
        assert (output_dir / name).is_file(), name
    with safe_open(output_dir / "adapter_model.safetensors", framework="pt") as saved:
        keys = list(saved.keys())
    assert keys and all("lora_" in key for key in keys)
    settings = json.loads((output_dir / "medlora_run.json").read_text())
    assert settings["prompt_template_name"] == "alpaca" and settings["base_model"] == TINY
    assert settings["cutoff_len"] == 192 and settings["packing"] is True


@pytest.mark.slow
def test_reloaded_adapter_gives_the_same_logits(trained):
    output_dir, result = trained
    ids = result.tokenizer("A patient reports chest pain after exercise.", return_tensors="pt").input_ids
    model = result.model.eval()
    with torch.no_grad():
        in_memory = model(input_ids=ids.to(model.device)).logits.cpu()
        reloaded = load_for_inference(lora_weights=str(output_dir))
        from_disk = reloaded.model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids.to(model.device)).logits.cpu()
    assert reloaded.template_name == "alpaca"
    assert (in_memory - from_disk).abs().max().item() < 1e-5
    assert (in_memory - base).abs().max().item() > 1e-3  # the adapter really changed the model


def test_a_model_trained_in_bf16_autocast_comes_back_computing_like_a_reload(tmp_path, tiny_model_path):
    """--precision bf16-mixed (what auto picks on CPUs with AMX): the returned model no longer runs under the
    Trainer's autocast, so its logits are a fresh fp32 load's."""
    result = finetune.train(base_model=TINY, output_dir=str(tmp_path / "out"), max_steps=2, batch_size=4,
                            micro_batch_size=4, val_set_size=0, warmup_steps=0, learning_rate=3e-3, cutoff_len=96,
                            save_steps=1000, precision="bf16-mixed")
    assert result.trainer.accelerator.mixed_precision == "bf16"
    ids = result.tokenizer("A patient reports chest pain after exercise.", return_tensors="pt").input_ids
    with torch.no_grad():
        in_memory = result.model.eval()(input_ids=ids).logits
        from_disk = load_for_inference(lora_weights=str(tmp_path / "out")).model(input_ids=ids).logits
    assert in_memory.dtype == torch.float32
    assert (in_memory - from_disk).abs().max().item() < 1e-5


def test_padded_and_packed_batches_give_the_same_loss(tiny_model_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from medlora.data.records import load_conversations
    from medlora.data.templates import PromptTemplate
    from medlora.data.tokenization import ConversationEncoder
    from medlora.models.loading import load_base_model
    from medlora.training.collators import PackedCollator, PaddedCollator
    from medlora.training.trainer import label_only_loss

    conversations = load_conversations(SAMPLE_SFT).conversations[:6]
    report = ConversationEncoder(tiny_tokenizer, PromptTemplate.load("alpaca"), 256).encode(conversations)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in report.examples]
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(tiny_model_path), torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        padded = label_only_loss(model, PaddedCollator(tiny_tokenizer.pad_token_id)(examples))
        packed_dense_mask = label_only_loss(model, PackedCollator()(examples))
        # And both equal the plain full-logits loss that transformers computes itself.
        batch = PaddedCollator(tiny_tokenizer.pad_token_id)(examples)
        reference = model(**batch).loss
        assert use_packed_attention(model, 256)
        packed_per_record = label_only_loss(model, PackedCollator()(examples))
        padded_with_packed_attention = label_only_loss(model, PaddedCollator(tiny_tokenizer.pad_token_id)(examples))
    assert abs(padded.item() - packed_dense_mask.item()) < 1e-4
    assert abs(padded.item() - packed_per_record.item()) < 1e-4
    assert abs(padded.item() - padded_with_packed_attention.item()) < 1e-5
    assert abs(padded.item() - reference.item()) < 1e-4


@pytest.mark.slow
def test_bad_data_fails_in_one_line_and_writes_nothing(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "Q", "output": "A"}\n{"instruction": "Q", "output": ""}\n')
    output_dir = tmp_path / "out"
    result = run_script("finetune.py", "--base_model", TINY, "--data_path", data, "--output_dir", output_dir, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {data}: record 2: field 'output': empty"
    assert not output_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--prompt_template_name", "nope"], "unknown prompt template 'nope'"),
    (["--batch_size", "10", "--micro_batch_size", "4"], "--batch_size 10 must be a multiple of --micro_batch_size 4"),
    (["--lora_target_modules", "q_proj,not_a_layer"], "not_a_layer not in this model; its Linear modules are: "
                                                        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
])
def test_bad_flags_fail_before_training(tmp_path, flags, message):
    output_dir = tmp_path / "out"
    result = run_script("finetune.py", "--base_model", TINY, "--output_dir", output_dir, *flags, check=False)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert not output_dir.exists()


def test_tiny_model_build_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    build_tiny_model(first, SAMPLE_SFT)
    build_tiny_model(second, SAMPLE_SFT)
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    assert digest(first / "tokenizer.model") == digest(second / "tokenizer.model")
    assert digest(first / "tokenizer.json") == digest(second / "tokenizer.json")
    weights_a, weights_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)


@pytest.mark.parametrize("dtype, autocast, tolerance", [(torch.float32, False, 1e-5), (torch.bfloat16, False, 2e-2),
                                                       (torch.float32, True, 2e-2)],
                         ids=["fp32", "bf16", "bf16-autocast"])
def test_fused_linear_cross_entropy_equals_cross_entropy_of_full_logits(dtype, autocast, tolerance):
    """The fused, chunked loss against the model's own way, F.cross_entropy on full logits (a matmul in
    the model's precision, upcast to fp32), for the summed loss and the gradients of both the hidden
    states and the weight; 40 rows in chunks of 16 leave a partial last chunk. bf16 is what GPUs
    train with; bf16 autocast over fp32 tensors is what --precision auto picks on CPUs with AMX (the fused
    loss casts the weight once instead of autocast casting it for every product)."""
    from medlora.training.loss import FusedLinearCrossEntropy

    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(40, 32, generator=generator) * 2).to(dtype).requires_grad_()
    weight = torch.randn(500, 32, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (40,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = FusedLinearCrossEntropy.apply(hidden, weight, targets, 16)
    (fused * 0.5).backward()  # a scaled upstream gradient, as the division by the token count gives
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference_weight = weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = F.cross_entropy((reference_hidden @ reference_weight.t()).float(), targets, reduction="sum")
    (reference * 0.5).backward()
    if autocast:  # both sides multiplied in bf16: the loss agrees far more closely than with the fp32 product
        exact = F.cross_entropy((hidden.detach() @ weight.detach().t()).float(), targets, reduction="sum")
        assert abs(fused.item() - reference.item()) < 0.1 * abs(fused.item() - exact.item()) + 1e-4
    assert fused.dtype == torch.float32 and hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert torch.allclose(fused, reference, rtol=tolerance)
    for ours, expected in ((hidden.grad, reference_hidden.grad), (weight.grad, reference_weight.grad)):
        scale = expected.abs().max()
        assert (ours.float() - expected.float()).abs().max() <= tolerance * scale


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_fused_loss_gradients_equal_plain_cross_entropy(tiny_model_path, tiny_tokenizer, use_lora):
    from peft import LoraConfig, get_peft_model

    from medlora.data.records import load_conversations
    from medlora.data.templates import PromptTemplate
    from medlora.data.tokenization import ConversationEncoder
    from medlora.models.loading import load_base_model
    from medlora.training.collators import PackedCollator, PaddedCollator
    from medlora.training.loss import fusable_output_layer
    from medlora.training.trainer import label_only_loss

    conversations = load_conversations(SAMPLE_SFT).conversations[:5]
    report = ConversationEncoder(tiny_tokenizer, PromptTemplate.load("alpaca"), 256).encode(conversations)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in report.examples]
    torch.manual_seed(0)
    model = load_base_model(str(tiny_model_path), torch.float32)
    if use_lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert fusable_output_layer(model) is not None
    use_packed_attention(model, 256)

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused_loss = label_only_loss(model, PackedCollator()(examples), num_items_in_batch=100)
    fused = gradients(fused_loss)
    batch = PaddedCollator(tiny_tokenizer.pad_token_id)(examples)
    logits = model(**batch).logits[:, :-1]
    plain_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                 reduction="sum") / 100
    plain = gradients(plain_loss)
    assert abs(fused_loss.item() - plain_loss.item()) < 1e-4
    assert fused.keys() == plain.keys() and (use_lora or "lm_head.weight" in fused)
    for name in fused:
        assert torch.allclose(fused[name], plain[name], atol=1e-5, rtol=1e-3), name
