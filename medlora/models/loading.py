"""Loading base models and tokenizers, and configuring LoRA, the same way in every stage."""

import dataclasses
import logging
import os
from pathlib import Path

import torch

from medlora.errors import MedLoRAError
from medlora.models.builtin import (
    DEFAULT_BASE_MODEL,
    builtin_model,
    default_template_for,
    is_builtin,
)
from medlora.training import distributed

logger = logging.getLogger(__name__)


def _quiet_weight_loading(factory, args, kwargs):
    """transformers draws a "Loading weights" bar for every model it loads, even a 1.5M-parameter one in a
    test; MedLoRA's own status lines say what is loading. Other bars (downloads, training) are kept."""
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def _install_quiet_weight_loading():
    from transformers.utils import logging as transformers_logging

    if hasattr(transformers_logging, "set_tqdm_hook"):
        transformers_logging.set_tqdm_hook(_quiet_weight_loading)


_install_quiet_weight_loading()


def resolve_base_model(base_model: str, flag: str = "--base_model") -> str:
    """A hub id or local folder as given, checked before anything loads; a built-in model is built into the
    cache on first use."""
    from medlora.run_folder import looks_like_local_path

    if not base_model:
        raise MedLoRAError(f"{flag} is empty; give a hub id (e.g. meta-llama/Llama-3.1-8B) or a local folder")
    if is_builtin(base_model):
        return str(builtin_model(base_model).build())
    folder = Path(str(base_model)).expanduser()
    if looks_like_local_path(base_model):
        if not folder.is_dir():
            raise MedLoRAError(f"{flag} {base_model}: no such model folder")
        if not (folder / "config.json").is_file():
            raise MedLoRAError(f"{flag} {base_model}: no config.json there; give a model folder (save_pretrained "
                               "or hf download writes one) or a hub id")
        return str(folder)
    check_hub_reachable(str(base_model), flag)
    return base_model


_REACHABLE_REPOS = set()  # checked once per process: a stage resolves its base model more than once


def check_hub_reachable(repo_id: str, flag: str, filename: str = "config.json") -> None:
    """A hub id that is neither in the local cache nor reachable stops here with one line, instead of a minute of
    download retries and a traceback."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if repo_id in _REACHABLE_REPOS or isinstance(try_to_load_from_cache(repo_id, filename), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise MedLoRAError(f"{flag} {repo_id}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
                           "download it first (hf download) or give a local folder")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise MedLoRAError(f"{flag} {repo_id}: not in the local Hugging Face cache and {host} cannot be reached "
                           f"({error.strerror or error}); download it on a connected machine or give a local "
                           "folder") from None
    _REACHABLE_REPOS.add(repo_id)


# ---- devices and precision ---------------------------------------------------------------------------------
# CPUs with bf16 instructions (the bench measures bf16 there too), and those where bf16 autocast is the faster choice:
# without AMX, oneDNN's bf16 products ran at 195 GFLOP/s against MKL's fp32 at 320, and a SmolLM2 training step
# took 1.22x fp32's time (measured 2026-12-07, AVX512-BF16 without AMX: docs/BENCHMARKS.md).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
AUTOCAST_CPU_FLAGS = frozenset({"amx_bf16"})


@dataclasses.dataclass(frozen=True)
class Precision:
    weights: torch.dtype  # what the base model is loaded in
    autocast_bf16: bool  # bf16 autocast over fp32 weights (trainable parameters stay fp32)
    reason: str

    def describe(self) -> str:
        name = "bf16 autocast, fp32 weights" if self.autocast_bf16 else str(self.weights).replace("torch.", "")
        return f"{name} ({self.reason})"


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


def resolve_precision(precision: str = "auto") -> Precision:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs; on CPU, bf16 autocast where the CPU has AMX
    (several times fp32's matmul speed), else fp32 (slower bf16 products with AVX512-BF16 alone, emulated ones
    elsewhere).
    bf16-mixed asks for the autocast path anywhere; bf16/fp16 load the weights in that type.
    MEDLORA_AUTO_PRECISION (e.g. fp32) replaces what auto picks, for every stage at once: the test suite runs
    under each precision a CPU can pick."""
    override = os.environ.get("MEDLORA_AUTO_PRECISION", "auto")
    if precision == "auto" and override != "auto":
        if override not in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "bf16-mixed"):
            raise MedLoRAError(f"MEDLORA_AUTO_PRECISION: unknown value {override!r}; use auto, fp32, bf16, bf16-mixed "
                               "or fp16")
        return dataclasses.replace(resolve_precision(override), reason="MEDLORA_AUTO_PRECISION")
    named = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if precision == "bf16-mixed":
        return Precision(torch.float32, True, "asked for")
    if precision != "auto":
        if precision not in named:
            raise MedLoRAError(f"--precision: unknown value {precision!r}; use auto, fp32, bf16, bf16-mixed or fp16")
        return Precision(named[precision], False, "asked for")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, False, "GPU supports bf16")
        return Precision(torch.float16, False, "GPU lacks bf16")
    flags = cpu_flags()
    if AUTOCAST_CPU_FLAGS & flags:
        return Precision(torch.float32, True, f"CPU has {' and '.join(sorted(BF16_CPU_FLAGS & flags))}")
    if BF16_CPU_FLAGS & flags:
        return Precision(torch.float32, False, "CPU has avx512_bf16 but no AMX, where bf16 products are slower than fp32")
    return Precision(torch.float32, False, "CPU has no AMX or AVX512-BF16, where bf16 would be slower than fp32")


def choose_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype to load a model in for --precision (fp32 under CPU autocast)."""
    return resolve_precision(precision).weights


# ---- tokenizer ---------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The base tokenizer, with a pad token that is not EOS.

    A pad token equal to EOS is a classic trap: collators that mask pad positions mask EOS too, and
    the tuned model never learns to stop. We reuse UNK when there is one, else add a <|pad|> token
    (the model's embeddings are then resized by `fit_embeddings_to_tokenizer`).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        logger.info("pad token set to %r (id %d), distinct from EOS %r",
                    tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.eos_token)
    tokenizer.padding_side = "left"  # for batched generation; training collators pad explicitly
    return tokenizer


def fit_embeddings_to_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer gained tokens (a new pad token).

    New rows are set to the mean of the old ones, deterministically, so that a base model loaded
    again for an adapter gives exactly the same logits.
    """
    old_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old_size:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for embeddings in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
            weight = embeddings.weight
            weight[old_size:] = weight[:old_size].float().mean(dim=0).to(weight.dtype)


# ---- model -------------------------------------------------------------------------------------------------
def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype):
    if load_in_4bit and load_in_8bit:
        raise MedLoRAError("--load_in_4bit and --load_in_8bit exclude each other; pick one")
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_base_model(name_or_path: str, dtype: torch.dtype, load_in_4bit=False, load_in_8bit=False,
                    trust_remote_code=False, device: str | None = None, auto_class=None, **from_pretrained_kwargs):
    """The base model on one device per process: never device_map="auto" under torchrun, where every
    rank must hold its own full copy on its own GPU.

    auto_class (default AutoModelForCausalLM) and from_pretrained_kwargs load other heads the same
    way, e.g. a reward model: auto_class=AutoModelForSequenceClassification, num_labels=1."""
    from transformers import AutoModelForCausalLM

    if device is None:
        if torch.cuda.is_available():
            device = f"cuda:{distributed.local_rank()}"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
    quant = quantization_config(load_in_4bit, load_in_8bit, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    model = (auto_class or AutoModelForCausalLM).from_pretrained(name_or_path, **kwargs)
    if quant is None:
        model.to(device)
    return model


# ---- LoRA ----------------------------------------------------------------------------------------------------
def linear_module_names(model) -> list:
    """The distinct last names of the model's Linear-like layers (nn.Linear, bitsandbytes layers, GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            names.add(full_name.rsplit(".", 1)[-1])
    output_layer = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        if module is output_layer:
            names.discard(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_modules_to_save(model, requested) -> list:
    """--lora_modules_to_save: module names (comma-separated or a list) that exist in the model."""
    if isinstance(requested, str):
        requested = [name.strip() for name in requested.strip("[]").split(",") if name.strip()]
    available = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise MedLoRAError(f"--lora_modules_to_save: {', '.join(unknown)} not in this model")
    return list(requested)


def resolve_lora_targets(model, requested) -> list | str:
    """--lora_target_modules as given (a list, a comma-separated string or "all-linear"), or the
    usual attention projections for the model's architecture; unknown names fail before training."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS,
    )

    available = linear_module_names(model)
    if requested in (None, "", []):
        model_type = model.config.model_type
        if model_type not in DEFAULTS:
            raise MedLoRAError(f"no default LoRA targets for model type '{model_type}'; pass --lora_target_modules "
                               f"(one or more of: {', '.join(available)}) or all-linear")
        return list(DEFAULTS[model_type])
    if requested == "all-linear":
        return "all-linear"
    if isinstance(requested, str):
        requested = [name.strip() for name in requested.strip("[]").split(",") if name.strip()]
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise MedLoRAError(f"--lora_target_modules: {', '.join(unknown)} not in this model; "
                           f"its Linear modules are: {', '.join(available)}")
    return list(requested)


def count_parameters(model) -> tuple:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---- inference -------------------------------------------------------------------------------------------------
class InferenceModel:
    """What every inference stage needs: the model (base, base + adapter, or a merged export), its
    tokenizer, and the prompt template the adapter was trained with (None when unknown)."""

    def __init__(self, model, tokenizer, template_name, run_settings):
        self.model, self.tokenizer, self.template_name, self.run_settings = model, tokenizer, template_name, run_settings

    @property
    def device(self):
        return next(self.model.parameters()).device


def load_for_inference(base_model: str | None = None, lora_weights=None, load_in_4bit=False,
                       load_in_8bit=False, device: str | None = None, precision: str = "auto",
                       trust_remote_code=False) -> InferenceModel:
    """Load a base model with an optional LoRA adapter for generation or evaluation.

    lora_weights is an adapter folder, a hub adapter id or a RunFolder already read.
    base_model defaults to the one the adapter was trained on (from its medlora_run.json), else the
    default built-in model; the tokenizer is the adapter's own copy when it has one (it may carry an added pad token).
    """
    from medlora.run_folder import RunFolder

    adapter = lora_weights if isinstance(lora_weights, RunFolder) else RunFolder.adapter(lora_weights) if lora_weights \
        else None
    lora_weights = (adapter.hub_id or str(adapter.path)) if adapter else None
    settings = adapter.settings if adapter else {}
    if adapter:
        base_model, _ = adapter.inherit(base_model)
    if adapter and adapter.hub_id:
        check_hub_reachable(adapter.hub_id, "--lora_weights", "adapter_config.json")
    if not base_model and adapter and adapter.hub_id:
        from peft import PeftConfig

        base_model = PeftConfig.from_pretrained(lora_weights).base_model_name_or_path
        if not base_model:
            raise MedLoRAError(f"{lora_weights}: the adapter does not name its base model; pass --base_model")
    base_model = base_model or DEFAULT_BASE_MODEL
    model_path = resolve_base_model(base_model)
    has_own_tokenizer = adapter is not None and adapter.has_tokenizer
    tokenizer = load_tokenizer(str(lora_weights) if has_own_tokenizer else model_path, trust_remote_code)
    model = load_base_model(model_path, choose_dtype(precision), load_in_4bit, load_in_8bit, trust_remote_code, device)
    fit_embeddings_to_tokenizer(model, tokenizer)
    if lora_weights:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(lora_weights))
    model.eval()
    template_name = settings.get("prompt_template_name") or (default_template_for(base_model) if is_builtin(base_model)
                                                             else None)
    return InferenceModel(model, tokenizer, template_name, settings)


def trainable_parameters_to_fp32(model) -> None:
    """Keep every trainable parameter in fp32 (LoRA weights, modules_to_save copies of a bf16/fp16
    base): optimizer updates to fp16 weights underflow and the GradScaler refuses them."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()


def continued_adapter_defaults(lora_weights: str, base_model: str, prompt_template_name: str) -> tuple:
    """(base model, template) for a stage that continues --lora_weights: the flags when given, else what
    the adapter was trained with (its medlora_run.json), else the default base model and its template."""
    from medlora.run_folder import RunFolder

    if lora_weights:
        base_model, prompt_template_name = RunFolder.adapter(lora_weights, allow_hub=False).inherit(
            base_model, prompt_template_name)
    base_model = base_model or DEFAULT_BASE_MODEL
    return base_model, prompt_template_name or default_template_for(base_model)


def lora_for_trl_trainer(model, lora_weights, lora_target_modules, lora_r, lora_alpha, lora_dropout) -> tuple:
    """(model, peft_config, target modules) for a TRL trainer: --lora_weights loaded trainable (fp32), or a
    fresh LoRA config that the trainer applies."""
    from peft import LoraConfig, PeftModel

    if lora_weights:
        model = PeftModel.from_pretrained(model, lora_weights, is_trainable=True)
        trainable_parameters_to_fp32(model)
        return model, None, sorted(model.peft_config["default"].target_modules)
    targets = resolve_lora_targets(model, lora_target_modules)
    return model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM"), targets
