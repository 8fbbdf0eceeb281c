"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), written the way llama.cpp's convert_hf_to_gguf.py
writes it, for the two vocabularies MedLoRA's LLaMA-family models use:

  SentencePiece ("llama"): pieces, scores and types from the base's tokenizer.model (LLaMA 1/2, Mistral,
      TinyLlama, the built-in tiny model), with the tokens the Hugging Face tokenizer adds on top.
  byte-level BPE ("gpt2"): the vocabulary, the merges and `tokenizer.ggml.pre`, the name llama.cpp gives the
      pre-tokenizer (SmolLM2, Llama 3, Qwen2). llama.cpp recognises a pre-tokenizer by hashing how it
      tokenizes a fixed text; the hashes below are copied from convert_hf_to_gguf.py's get_vocab_base_pre.

Plus the BOS/EOS/UNK/pad ids, whether BOS/EOS are added, and the chat template given by the caller.
"""

import json
from hashlib import sha256
from pathlib import Path

from medlora.errors import MedLoRAError

# convert_hf_to_gguf.py's chktxt, and the hashes of str(tokenizer.encode(chktxt)) it maps to llama.cpp names.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special, for the markers MedLoRA's models use."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def is_sentencepiece(tokenizer) -> bool:
    return json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer", {}).get("type") == "Metaspace"


def sentencepiece_vocab(tokenizer, tokenizer_model: Path | None, vocab_size: int) -> dict:
    """tokens, scores, types: tokenizer.model's pieces, then the Hugging Face tokenizer's added tokens."""
    from sentencepiece import SentencePieceProcessor

    if tokenizer_model is None:
        raise MedLoRAError("this SentencePiece tokenizer has no tokenizer.model beside the adapter or the base model; "
                           "GGUF needs its piece scores (copy tokenizer.model into the adapter folder)")
    processor = SentencePieceProcessor(model_file=str(tokenizer_model))
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [UNUSED] * vocab_size
    for index in range(min(processor.vocab_size(), vocab_size)):
        tokens[index], scores[index] = processor.id_to_piece(index), processor.get_score(index)
        types[index] = (UNKNOWN if processor.is_unknown(index) else CONTROL if processor.is_control(index)
                        else UNUSED if processor.is_unused(index) else BYTE if processor.is_byte(index) else NORMAL)
    for index, added in tokenizer.added_tokens_decoder.items():
        if index >= vocab_size:
            raise MedLoRAError(f"added token {added.content!r} has id {index}, beyond the model's {vocab_size} "
                               "embeddings")
        special = added.special or looks_special(added.content)
        tokens[index], scores[index] = added.content, -1000.0
        types[index] = CONTROL if special else USER_DEFINED
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types,
            "add_space_prefix": bool(processor.encode("a", out_type=str)[0].startswith("\u2581"))}


def byte_level_vocab(tokenizer, vocab_size: int) -> dict:
    """tokens, types, merges and the pre-tokenizer's llama.cpp name (convert_hf_to_gguf.py's get_vocab_base)."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise MedLoRAError(f"this byte-level BPE tokenizer's pre-tokenizer is not one MedLoRA can name for llama.cpp "
                           f"(hash {digest[:12]}...); supported: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(CONTROL if added[index].special or looks_special(token) else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]
    return {"model": "gpt2", "pre": KNOWN_PRE_TOKENIZERS[digest], "tokens": tokens, "types": types, "merges": merges}


def adds_token(tokenizer, token_id, at_start: bool) -> bool:
    """Whether the tokenizer adds BOS (at_start) or EOS itself, as observed, not as configured."""
    if token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0 if at_start else -1] == token_id


def write_tokenizer_metadata(writer, tokenizer, tokenizer_model: Path | None, vocab_size: int,
                             chat_template: str) -> str:
    """Add every tokenizer.* key to the GGUF writer; returns the vocabulary kind ("llama" or "gpt2")."""
    vocab = (sentencepiece_vocab(tokenizer, tokenizer_model, vocab_size) if is_sentencepiece(tokenizer)
             else byte_level_vocab(tokenizer, vocab_size))
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "add_space_prefix" in vocab:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(adds_token(tokenizer, tokenizer.bos_token_id, at_start=True))
    writer.add_add_eos_token(adds_token(tokenizer, tokenizer.eos_token_id, at_start=False))
    writer.add_chat_template(chat_template)
    return vocab["model"]
