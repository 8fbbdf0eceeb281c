"""The built-in tiny model: a small random LLaMA-architecture model with a SentencePiece tokenizer
trained on the bundled sample data, so that every stage runs offline on a laptop CPU.

It is a toy that exercises the pipeline, not a medical model: its answers are word salad that
gets a little more medical-sounding as it trains. It is built once, deterministically, into
$MEDLORA_CACHE (default ~/.cache/medlora) under a name that changes with its recipe and data.
"""

import hashlib
import io
import json
import logging
from pathlib import Path

from medlora.paths import DATA_DIR, TEMPLATES_DIR, build_once, cache_root

BUILTIN_TINY_MODEL = "builtin:tiny-llama"
RECIPE_VERSION = 1
TRAINING_TEXT_FILES = ["medical_chat_en.json", "medical_multiturn.jsonl", "medical_chat_zh.jsonl"]
# Every width is a multiple of 64: bitsandbytes' CPU 4-bit inference kernels need that.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)
VOCAB_SIZE = 3000
# A small ChatML chat template, so that the `chat` prompt template can be used with the tiny model too.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

logger = logging.getLogger(__name__)


def training_texts(data_dir: Path) -> list:
    """Every string in the bundled sample files, in file order, plus the template texts."""
    texts = []

    def collect(value):
        if isinstance(value, str):
            texts.extend(line for line in value.splitlines() if line.strip())
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    for name in TRAINING_TEXT_FILES:
        text = (data_dir / name).read_text(encoding="utf-8")
        if name.endswith(".jsonl"):
            for line in text.splitlines():
                if line.strip():
                    collect(json.loads(line))
        else:
            collect(json.loads(text))
    for template in sorted(TEMPLATES_DIR.glob("*.json")):
        collect(json.loads(template.read_text(encoding="utf-8")))
    return texts


def recipe_fingerprint(data_dir: Path) -> str:
    digest = hashlib.sha256(json.dumps([RECIPE_VERSION, MODEL_SHAPE, VOCAB_SIZE, CHAT_TEMPLATE]).encode())
    for text in training_texts(data_dir):
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()[:12]


def ensure_tiny_model(data_dir: Path | None = None) -> Path:
    """Path of the built-in tiny model, building it first if it is not in the cache."""
    data_dir = Path(data_dir or DATA_DIR / "sft")
    target = cache_root() / f"tiny-llama-{recipe_fingerprint(data_dir)}"
    if not (target / "config.json").is_file():
        logger.info("building the built-in tiny model (once) into %s", target)
    return build_once(target, lambda folder: build_tiny_model(folder, data_dir))


def build_tiny_model(output_dir: Path, data_dir: Path) -> None:
    import sentencepiece
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts(data_dir)), model_writer=model_file, vocab_size=VOCAB_SIZE,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], shuffle_input_sentence=False, num_threads=1,
        minloglevel=2,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "tokenizer.model").write_bytes(model_file.getvalue())
    (output_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)  # adds tokenizer.json, the fast tokenizer's own file

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False, **MODEL_SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 3
    model.save_pretrained(output_dir, safe_serialization=True)
    (output_dir / "README.md").write_text(
        "# MedLoRA built-in tiny model\n\nA random-weight LLaMA-architecture toy with a SentencePiece tokenizer "
        "trained on MedLoRA's bundled sample data. It exists to exercise the pipeline offline; it knows no medicine.\n"
    )
