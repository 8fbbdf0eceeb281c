"""A merged model as one GGUF file, written with llama.cpp's own `gguf` package, for llama.cpp, Ollama
and LM Studio (export_gguf.py).

Tensors and metadata follow llama.cpp's convert_hf_to_gguf.py: tensor names from gguf's name map for the
architecture, the rows of LLaMA's q/k projections permuted back to Meta's interleaved rotary layout (the
permutation Hugging Face's conversion applied), norms and biases kept in float32, and 2-D weights in the
chosen type. The tokenizer (medlora.gguf_tokenizer) and the chat template MedLoRA trained with go with them.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medlora.errors import MedLoRAError
from medlora.export.merge import rope_parameters, unpermute_rotary


@dataclass(frozen=True)
class OutType:
    file_type: int  # gguf.LlamaFileType
    quantization: str  # gguf.GGMLQuantizationType name for 2-D weights
    relative_tolerance: float  # read-back logits vs the merged model, a fraction of the largest logit (>= 1)


OUTTYPES = {
    "f32": OutType(0, "F32", 1e-4),
    "f16": OutType(1, "F16", 1e-2),
    "bf16": OutType(32, "BF16", 5e-2),
    "q8_0": OutType(7, "Q8_0", 5e-2),
}
# model_type -> (gguf.MODEL_ARCH name, whether q/k rows get LLaMA's rotary permutation)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


def check_architecture(config) -> None:
    """One-line refusal for what this writer cannot express."""
    if config.model_type not in ARCHITECTURES:
        raise MedLoRAError(f"GGUF export supports LLaMA-architecture models (LLaMA 1-3, Mistral, SmolLM2, TinyLlama: "
                           f"model types {', '.join(ARCHITECTURES)}), not model type '{config.model_type}'; "
                           "use export_hf_checkpoint.py and llama.cpp's convert_hf_to_gguf.py instead")
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type != "default":
        raise MedLoRAError(f"this {config.model_type} model uses rope_type {rope_type!r}; MedLoRA's GGUF export writes "
                           "unscaled RoPE only; use export_hf_checkpoint.py and llama.cpp's convert_hf_to_gguf.py")
    if config.model_type != "qwen2" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise MedLoRAError(f"this {config.model_type} model has bias terms, which llama.cpp's LLaMA graph does not read")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hyperparameters(writer, config, name: str, outtype: OutType) -> None:
    """The <arch>.* keys convert_hf_to_gguf.py writes for LLaMA and Qwen2 (TextModel + LlamaModel)."""
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if config.model_type != "qwen2":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))
    writer.add_file_type(outtype.file_type)


def gguf_tensors(model):
    """(GGUF name, float32 numpy array) for every parameter of the merged model, in llama.cpp's layout."""
    import gguf

    config = model.config
    arch_name, permute = ARCHITECTURES[config.model_type]
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), config.num_hidden_layers)
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, parameter in model.named_parameters(remove_duplicate=False):
        if tied and parameter is model.get_output_embeddings().weight and hf_name != "model.embed_tokens.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise MedLoRAError(f"{hf_name} has no place in llama.cpp's {arch_name} layout; "
                               "use export_hf_checkpoint.py instead")
        tensor = parameter.detach().to("cpu", torch.float32)
        if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = unpermute_rotary(tensor, n_heads if "q_proj" in hf_name else n_kv_heads)
        yield gguf_name, tensor.numpy()


def encode_tensor(array: np.ndarray, outtype: OutType):
    """(data, raw_dtype) as GGUFWriter.add_tensor takes them; 1-D tensors stay float32, as in llama.cpp, and
    rows that q8_0's 32-value blocks do not divide fall back to float16, as convert_hf_to_gguf.py does."""
    import gguf

    qtype = gguf.GGMLQuantizationType[outtype.quantization]
    if array.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        return array, None
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), None
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.QuantError:
        return array.astype(np.float16), None


def write_gguf(path: Path, model, tokenizer, tokenizer_model: Path | None, outtype: OutType, name: str,
               chat_template: str) -> dict:
    """Write the merged model to `path`; returns a summary (tensor count, vocabulary kind, tensor types)."""
    import gguf

    from medlora.export.gguf_tokenizer import write_tokenizer_metadata

    config = model.config
    check_architecture(config)
    arch_name, _ = ARCHITECTURES[config.model_type]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)])
    write_hyperparameters(writer, config, name, outtype)
    vocab_kind = write_tokenizer_metadata(writer, tokenizer, tokenizer_model, model.get_input_embeddings().weight.shape[0],
                                          chat_template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types = {}
    for gguf_name, array in gguf_tensors(model):
        data, raw_dtype = encode_tensor(array, outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        type_name = raw_dtype.name if raw_dtype is not None else {np.float32: "F32", np.float16: "F16"}[data.dtype.type]
        types[type_name] = types.get(type_name, 0) + 1
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": sum(types.values()), "tensor_types": types, "vocabulary": vocab_kind}


# ---- reading it back --------------------------------------------------------------------------------------------
def load_gguf(path: Path):
    """(model, tokenizer) as transformers reads the file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def check_tokenization(gguf_tokenizer, tokenizer, texts) -> None:
    for text in texts:
        expected, got = tokenizer(text).input_ids, gguf_tokenizer(text).input_ids
        if got != expected:
            raise MedLoRAError(f"the GGUF file's tokenizer splits {text[:40]!r} differently from the model's "
                               f"({got[:12]} vs {expected[:12]}); nothing was exported")
