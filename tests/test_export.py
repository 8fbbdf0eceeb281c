"""export_hf_checkpoint.py and export_state_dict_checkpoint.py on tiny models: merged logits equal base +
adapter (built-in tiny LLaMA, a tiny GQA Mistral, GPT-2, a QLoRA adapter), Meta's layout reproduces the
model's logits in a plain-torch reference forward pass, and output folders are never clobbered."""

import hashlib
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from medlora.errors import MedLoRAError
from medlora.export.merge import (
    check_logits,
    check_output_dir,
    merge_adapter,
    meta_ffn_hidden_dim,
    meta_ffn_sizing,
    meta_params,
    meta_state_dict,
    resolve_inputs,
    staged_output,
)
from medlora.run_folder import RunFolder
from tests.conftest import ROOT, TINY, run_script

PROMPT = "A 54-year-old man has chest pain on exertion that eases with rest. What should be checked first?"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def logits_of(model, tokenizer, text=PROMPT):
    """The model's float32 logits on the prompt, on the CPU (the model may be on a GPU)."""
    input_ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    return model(input_ids=input_ids).logits[0].float().cpu()


def base_plus_adapter(base_path, adapter_dir, tokenizer, device="cpu"):
    """Reference: the base loaded afresh in float32 with the adapter applied by PEFT, unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).to(device),
                                      str(adapter_dir)).eval()
    with model.disable_adapter():
        base = logits_of(model, tokenizer)
    return logits_of(model, tokenizer), base


def folder_snapshot(folder: Path) -> dict:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def random_adapter(tmp_path_factory, tiny_model_path, name, config, target_modules, fan_in_fan_out=False):
    """A random-weight base of `config` (with the tiny model's tokenizer) and a LoRA adapter on it whose B
    matrices are non-zero, so that merging changes the weights; medlora_run.json names the base folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = tmp_path_factory.mktemp(f"{name}-base"), tmp_path_factory.mktemp(f"{name}-lora")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(base_dir)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False,
                          fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
        get_peft_model(model, lora).save_pretrained(adapter_dir)
    for file_name in TOKENIZER_FILES:
        shutil.copy(tiny_model_path / file_name, base_dir / file_name)
    RunFolder(adapter_dir).write_settings({"base_model": str(base_dir), "prompt_template_name": "alpaca"})
    return base_dir, adapter_dir


@pytest.fixture(scope="module")
def mistral_adapter(tmp_path_factory, tiny_model_path, tiny_tokenizer):
    """Grouped-query attention (8 heads, 2 KV heads), tied embeddings, rope_theta 1e6, an FFN width (200)
    that none of Meta's usual multiple_of values produce."""
    from transformers import MistralConfig

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=200, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return random_adapter(tmp_path_factory, tiny_model_path, "mistral", config,
                          ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory, tiny_model_path, tiny_tokenizer):
    """A non-LLaMA architecture whose projections are transposed Conv1D layers."""
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return random_adapter(tmp_path_factory, tiny_model_path, "gpt2", config, ["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True)


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, tiny_adapter):
    """The tiny adapter exported by the real script, as a user runs it."""
    output_dir = tmp_path_factory.mktemp("exports") / "hf_ckpt"
    result = run_script("export_hf_checkpoint.py", "--lora_weights", tiny_adapter, "--output_dir", output_dir,
                        "--dtype", "float32")
    return output_dir, result


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory):
    """An adapter trained for 2 steps on the 4-bit tiny model by the real finetune.py (QLoRA on CPU)."""
    output_dir = tmp_path_factory.mktemp("qlora") / "lora"
    run_script("finetune.py", "--base_model", TINY, "--output_dir", output_dir, "--max_steps", 2, "--batch_size", 4,
               "--micro_batch_size", 4, "--val_set_size", 0, "--warmup_steps", 0, "--learning_rate", 1e-2, "--cutoff_len", 128,
               "--lora_target_modules", "all-linear", "--save_steps", 1000, "--load_in_4bit")
    return output_dir


# ---- Hugging Face checkpoint ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_hf_export_of_tiny_llama_equals_base_plus_adapter(hf_export, tiny_adapter, tiny_model_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from medlora.models.loading import load_for_inference

    output_dir, result = hf_export
    assert "largest logit difference from base + adapter" in result.stdout
    assert not list(output_dir.parent.glob(".hf_ckpt.*")), "a staging folder was left behind"
    for shard in output_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as tensors:
            assert not [key for key in tensors.keys() if "lora_" in key]  # noqa: SIM118 - safe_open is no dict
    for file_name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.model"):
        assert (output_dir / file_name).is_file(), file_name
    note = json.loads((output_dir / "medlora_export.json").read_text())
    assert note["base_model"] == TINY and note["dtype"] == "float32"
    assert note["lora_weights"] == str(tiny_adapter.resolve()) and note["merged_into"] == "base"
    assert note["prompt_template_name"] == "alpaca" and note["max_logit_difference"] <= note["logit_tolerance"]

    reference = load_for_inference(lora_weights=str(tiny_adapter), precision="fp32")
    expected = logits_of(reference.model, reference.tokenizer)
    with reference.model.disable_adapter():
        assert (logits_of(reference.model, reference.tokenizer) - expected).abs().max() > 1e-2, "adapter does nothing"

    exported = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    assert not [key for key in exported.state_dict() if "lora_" in key]
    torch.testing.assert_close(logits_of(exported, reference.tokenizer), expected, rtol=0, atol=1e-4)

    # generate.py / chat.py load an export as a plain base model, no adapter
    standalone = load_for_inference(base_model=str(output_dir), precision="fp32")
    assert standalone.tokenizer.pad_token_id != standalone.tokenizer.eos_token_id
    torch.testing.assert_close(logits_of(standalone.model, standalone.tokenizer), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_generate_py_answers_from_the_export_as_from_base_plus_adapter(hf_export, tiny_adapter, tmp_path):
    output_dir, _ = hf_export
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"instruction": text}) + "\n" for text in (
        "What can I do at home to relieve a tension headache?", "How can I lower my blood pressure?")))
    answers = {}
    for name, model_flags in (("export", ["--base_model", output_dir, "--prompt_template", "alpaca"]),
                              ("adapter", ["--lora_weights", tiny_adapter])):
        run_script("generate.py", *model_flags, "--data_file", questions, "--predictions_file", tmp_path / name,
                   "--max_new_tokens", 6)
        answers[name] = [json.loads(line)["prediction"] for line in (tmp_path / name).read_text().splitlines()]
    assert len(answers["export"]) == 2 and answers["export"] == answers["adapter"]


def test_gqa_mistral_and_gpt2_merges_equal_base_plus_adapter(mistral_adapter, gpt2_adapter, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    for base_dir, adapter_dir in (mistral_adapter, gpt2_adapter):
        expected, base = base_plus_adapter(base_dir, adapter_dir, tiny_tokenizer)
        assert (expected - base).abs().max() > 1e-2, f"{adapter_dir}: the adapter does not change the model"
        merged = merge_adapter(resolve_inputs("", str(adapter_dir)), torch.float32)
        assert not [name for name, _ in merged.model.named_parameters() if "lora_" in name]
        torch.testing.assert_close(logits_of(merged.model, tiny_tokenizer), expected, rtol=0, atol=1e-4)

    # the script's own entry point, in-process, on the non-LLaMA architecture
    output_dir = tmp_path / "gpt2-merged"
    load_script("export_hf_checkpoint.py").main(lora_weights=str(gpt2_adapter[1]), output_dir=str(output_dir),
                                                dtype="float32")
    exported = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    assert exported.config.model_type == "gpt2"
    expected, _ = base_plus_adapter(*gpt2_adapter, tiny_tokenizer)
    torch.testing.assert_close(logits_of(exported, tiny_tokenizer), expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_dequantized_base(qlora_adapter, tiny_model_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medlora.models.loading import load_base_model, load_tokenizer

    output_dir = tmp_path / "qlora-merged"
    result = run_script("export_hf_checkpoint.py", "--lora_weights", qlora_adapter, "--output_dir", output_dir,
                        "--dtype", "float32")
    assert "QLoRA: merging into the de-quantized 4-bit base" in result.stdout
    assert json.loads((output_dir / "medlora_export.json").read_text())["merged_into"] == "de-quantized 4-bit base"
    tokenizer = load_tokenizer(str(qlora_adapter))
    exported = logits_of(AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval(), tokenizer)

    # Reference: the 4-bit base + adapter computed as training computed it (with gradients on, bitsandbytes
    # takes its training path, which de-quantizes each weight for the matmul).
    quantized = PeftModel.from_pretrained(load_base_model(str(tiny_model_path), torch.float32, load_in_4bit=True,
                                                          device="cpu"), str(qlora_adapter)).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.enable_grad():
        embeddings = quantized.get_input_embeddings()(input_ids).detach().requires_grad_()
        expected = quantized(inputs_embeds=embeddings).logits[0].detach().float()
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-4)

    # ...which is not what merging into the original full-precision weights would give
    original, _ = base_plus_adapter(tiny_model_path, qlora_adapter, tokenizer)
    assert (original - expected).abs().max() > 1e-2


def test_adapter_of_another_base_is_refused_in_one_line(mistral_adapter, tiny_model_path):
    with pytest.raises(MedLoRAError, match=r"does not fit --base_model .*size mismatch"):
        merge_adapter(resolve_inputs(str(tiny_model_path), str(mistral_adapter[1])), torch.float32)


def test_check_logits_rejects_a_wrong_merge(mistral_adapter, tiny_tokenizer):
    merged = merge_adapter(resolve_inputs("", str(mistral_adapter[1])), torch.float32)
    wrong = merged.reference_logits.clone()
    wrong[-1, 0] += 0.5
    with pytest.raises(MedLoRAError, match="above the tolerance"):
        check_logits(merged.model, merged.prompt_ids, wrong, torch.float32, "merged model")


# ---- output folder protection ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_non_empty_output_dir_is_refused_without_force(hf_export, tiny_adapter):
    output_dir, _ = hf_export
    before = folder_snapshot(output_dir)
    for script in ("export_hf_checkpoint.py", "export_state_dict_checkpoint.py"):
        result = run_script(script, "--lora_weights", tiny_adapter, "--output_dir", output_dir, check=False)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir {output_dir} is not empty")
        assert "--force" in result.stderr
    assert folder_snapshot(output_dir) == before


@pytest.mark.slow
def test_force_replaces_an_export_in_one_rename(tiny_adapter, tmp_path):
    output_dir = tmp_path / "export"
    output_dir.mkdir()
    (output_dir / "old.txt").write_text("previous export")
    load_script("export_hf_checkpoint.py").main(lora_weights=str(tiny_adapter), output_dir=str(output_dir),
                                                dtype="bfloat16", force=True)
    assert not (output_dir / "old.txt").exists()
    assert json.loads((output_dir / "medlora_export.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((output_dir / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]


def test_failed_export_leaves_the_output_dir_as_it_was(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("previous export")
    with pytest.raises(RuntimeError), staged_output(target) as staging:
        (staging / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert folder_snapshot(target) == {"keep.txt": hashlib.sha256(b"previous export").hexdigest()}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]


@pytest.mark.slow
def test_output_dir_holding_the_inputs_is_refused_even_with_force(tiny_adapter):
    inputs = resolve_inputs("", str(tiny_adapter))
    for folder in (tiny_adapter, tiny_adapter.parent, inputs.model_path, Path.cwd()):
        with pytest.raises(MedLoRAError, match="choose a folder of its own"):
            check_output_dir(str(folder), True, inputs)


# ---- Meta layout -------------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def meta_reference_logits(tensors: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """LLaMA's forward pass written from Meta's layout alone: RMSNorm, rotary embedding on interleaved
    pairs as complex numbers, grouped-query attention, SwiGLU."""
    dim, n_heads, n_kv_heads, eps = params["dim"], params["n_heads"], params["n_kv_heads"], params["norm_eps"]
    head_dim, seq_len = dim // n_heads, tokens.shape[0]
    frequencies = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rotations = torch.polar(torch.ones(seq_len, head_dim // 2), torch.outer(torch.arange(seq_len).float(), frequencies))

    def rotate(x):  # (seq, heads, head_dim): pairs (0, 1), (2, 3) ... are complex numbers
        pairs = torch.view_as_complex(x.reshape(seq_len, x.shape[1], head_dim // 2, 2))
        return torch.view_as_real(pairs * rotations[:, None, :]).reshape(x.shape)

    mask = torch.full((seq_len, seq_len), float("-inf")).triu(1)
    h = tensors["tok_embeddings.weight"][tokens]
    for layer in range(params["n_layers"]):
        prefix = f"layers.{layer}."
        w = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
        x = rms_norm(h, w["attention_norm.weight"], eps)
        q = rotate((x @ w["attention.wq.weight"].T).view(seq_len, n_heads, head_dim))
        k = rotate((x @ w["attention.wk.weight"].T).view(seq_len, n_kv_heads, head_dim))
        v = (x @ w["attention.wv.weight"].T).view(seq_len, n_kv_heads, head_dim)
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=1) for t in (k, v))
        scores = q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) / math.sqrt(head_dim) + mask
        attended = (scores.softmax(-1) @ v.transpose(0, 1)).transpose(0, 1).reshape(seq_len, dim)
        h = h + attended @ w["attention.wo.weight"].T
        x = rms_norm(h, w["ffn_norm.weight"], eps)
        h = h + (torch.nn.functional.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)) \
            @ w["feed_forward.w2.weight"].T
    return rms_norm(h, tensors["norm.weight"], eps) @ tensors["output.weight"].T


def expected_meta_keys(n_layers):
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                 "feed_forward.w3", "attention_norm", "ffn_norm"]
    return {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{name}.weight" for i in range(n_layers) for name in per_layer}


def check_meta_export(tensors, params, expected_logits, tokens):
    assert set(tensors) == expected_meta_keys(params["n_layers"])
    hidden_dim = meta_ffn_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier"))
    assert tensors["layers.0.feed_forward.w1.weight"].shape == (hidden_dim, params["dim"])
    assert tensors["tok_embeddings.weight"].shape[0] == params["vocab_size"]
    torch.testing.assert_close(meta_reference_logits(tensors, params, tokens), expected_logits, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_state_dict_export_of_gqa_mistral_runs_in_a_meta_reference_forward(mistral_adapter, tiny_tokenizer, tmp_path):
    base_dir, adapter_dir = mistral_adapter
    output_dir = tmp_path / "ckpt"
    result = run_script("export_state_dict_checkpoint.py", "--base_model", base_dir, "--lora_weights", adapter_dir,
                        "--output_dir", output_dir)
    assert "note: Meta's layout has no sliding-window attention" in result.stdout
    assert json.loads((output_dir / "medlora_export.json").read_text())["dtype"] == "float32"  # auto: as stored
    params = json.loads((output_dir / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": len(tiny_tokenizer),
                      "multiple_of": 200, "norm_eps": 1e-6, "rope_theta": 1e6}
    assert (output_dir / "tokenizer.model").read_bytes() == (base_dir / "tokenizer.model").read_bytes()
    tensors = torch.load(output_dir / "consolidated.00.pth", weights_only=True)
    expected, _ = base_plus_adapter(base_dir, adapter_dir, tiny_tokenizer)
    check_meta_export(tensors, params, expected, tiny_tokenizer(PROMPT, return_tensors="pt").input_ids[0])


@pytest.mark.slow
def test_meta_layout_of_the_tiny_llama_reproduces_its_logits(tiny_adapter):
    merged = merge_adapter(resolve_inputs("", str(tiny_adapter)), torch.float32)
    tensors = meta_state_dict(merged.model, torch.float32)
    params = meta_params(merged.model.config, tensors["tok_embeddings.weight"].shape[0])
    assert params["n_heads"] == 4 and params["n_kv_heads"] == 2 and params["multiple_of"] == 128
    check_meta_export(tensors, params, merged.reference_logits, merged.prompt_ids[0])


@pytest.mark.slow
def test_state_dict_export_refuses_other_architectures(gpt2_adapter, tmp_path):
    output_dir = tmp_path / "ckpt"
    result = run_script("export_state_dict_checkpoint.py", "--lora_weights", gpt2_adapter[1], "--output_dir",
                        output_dir, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: Meta's consolidated.00.pth layout exists for LLaMA-family models (llama, mistral), not for model "
        "type 'gpt2'; use export_hf_checkpoint.py instead")
    assert not output_dir.exists()


@pytest.mark.parametrize("dim, intermediate_size, expected", [
    (4096, 11008, {"multiple_of": 256}),  # LLaMA 1/2 7B
    (5120, 13824, {"multiple_of": 256}),  # LLaMA 2 13B
    (4096, 14336, {"multiple_of": 1024, "ffn_dim_multiplier": 1.3}),  # Llama 3 8B, Mistral 7B
    (8192, 28672, None),  # Llama 2/3 70B (Meta: 1.3 x 4096; 1.3 x 1024 gives the same width)
    (2048, 8192, None),  # Llama 3.2 1B
    (128, 384, {"multiple_of": 128}),  # the built-in tiny model
    (64, 100, None),  # narrower than Meta's formula: needs a multiplier below 1
])
def test_meta_ffn_sizing_reproduces_intermediate_size(dim, intermediate_size, expected):
    sizing = meta_ffn_sizing(dim, intermediate_size)
    if expected is not None:
        assert sizing == expected
    assert meta_ffn_hidden_dim(dim, sizing["multiple_of"], sizing.get("ffn_dim_multiplier")) == intermediate_size
