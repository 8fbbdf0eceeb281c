"""Merge a LoRA adapter into its base model, check the merge, and export the result as a Hugging Face
checkpoint (export_hf_checkpoint.py) or in Meta's consolidated.00.pth layout (export_state_dict_checkpoint.py).

No export is declared done before the merged model's logits on a fixed prompt equal those of base +
adapter (PEFT, unmerged) within a tolerance for the dtype. Output is written into a staging folder
beside its destination and renamed into place, so a folder is never left half-written.
"""

import datetime
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from medlora.errors import MedLoRAError
from medlora.models.loading import (
    fit_embeddings_to_tokenizer,
    load_base_model,
    load_tokenizer,
    resolve_base_model,
)
from medlora.run_folder import RunFolder

EXPORT_NOTE_FILE = "medlora_export.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Merged and unmerged models compute the same function; what differs is the dtype's rounding, accumulated
# over the layers. Tolerance: this fraction of the largest reference logit (counted as at least 1).
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CHECK_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\nWhat are the early signs of type 2 diabetes?\n\n### Response:\n")
META_LAYOUT_TYPES = ("llama", "mistral")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---- inputs and output folder ----------------------------------------------------------------------------
@dataclass
class ExportInputs:
    base_model: str  # as given or as recorded beside the adapter (a hub id, a folder or builtin:tiny-llama)
    model_path: str  # what from_pretrained loads
    lora_weights: Path
    run_settings: dict  # the adapter's medlora_run.json, {} for adapters MedLoRA did not train


def resolve_inputs(base_model: str, lora_weights: str) -> ExportInputs:
    """The adapter folder, and the base it was trained on unless --base_model names another."""
    adapter = RunFolder.adapter(lora_weights, allow_hub=False)
    base_model, _ = adapter.inherit(base_model)
    if not base_model:
        raise MedLoRAError(f"--base_model is needed: {adapter.path} does not name the base model it was trained on")
    return ExportInputs(str(base_model), resolve_base_model(str(base_model)), adapter.path, adapter.settings)


def export_inputs(flags) -> tuple:
    """(ExportInputs, output folder) of an export script's flags (the EXPORT group), both checked before any
    model loads."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    inputs = resolve_inputs(flags.base_model, flags.lora_weights)
    return inputs, check_output_dir(flags.output_dir, flags.force, inputs)


def resolve_dtype(name: str, model_path: str, trust_remote_code=False) -> torch.dtype:
    """--dtype by name; auto: the dtype the base checkpoint is stored in (float16 when it does not say)."""
    if name == "auto":
        from transformers import AutoConfig

        stored = getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code), "dtype", None)
        stored = DTYPES.get(stored.removeprefix("torch.")) if isinstance(stored, str) else stored
        return stored if stored in DTYPES.values() else torch.float16
    if name not in DTYPES:
        raise MedLoRAError(f"--dtype: unknown value {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_output_dir(output_dir: str, force: bool, inputs: ExportInputs) -> Path:
    """Refuse a non-empty folder without --force, and always a folder holding the inputs or the current
    directory, which replacing it would delete."""
    if not output_dir:
        raise MedLoRAError("--output_dir is empty")
    target = Path(output_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise MedLoRAError(f"--output_dir {output_dir} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise MedLoRAError(f"--output_dir {output_dir} is not empty; pass --force to replace it, "
                           "or choose a new folder")
    protected = {"the adapter": inputs.lora_weights, "the current directory": Path.cwd()}
    if Path(inputs.model_path).is_dir():
        protected["the base model"] = Path(inputs.model_path)
    for what, path in protected.items():
        path = path.resolve()
        if path == target or target in path.parents:
            raise MedLoRAError(f"--output_dir {output_dir} holds {what} ({path}); choose a folder of its own")
    return target


@contextmanager
def staged_output(target: Path):
    """Yield an empty staging folder beside `target`; when the block succeeds it replaces `target` by
    renames, when it fails (or is interrupted) it is deleted and `target` stays as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export should not be
    try:
        yield staging
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            staging.rename(target)
            return
        previous = staging.with_name(staging.name.replace(".partial-", ".replaced-"))
        target.rename(previous)
        try:
            staging.rename(target)
        except OSError:
            previous.rename(target)
            raise
        shutil.rmtree(previous)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- merge and check ---------------------------------------------------------------------------------------
@dataclass
class MergedModel:
    model: torch.nn.Module  # a plain transformers model, no LoRA layers left
    tokenizer: object
    dtype: torch.dtype
    merged_into: str  # "base", or e.g. "de-quantized 4-bit base" for QLoRA adapters
    prompt_ids: torch.Tensor
    reference_logits: torch.Tensor  # base + adapter, unmerged, float32 on CPU
    adapter_change: float  # largest logit change the adapter makes: the merge check is meaningful below it
    max_difference: float
    tolerance: float


@torch.no_grad()
def logits_on(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=prompt_ids).logits[0].float().cpu()


def check_logits(model, prompt_ids, reference: torch.Tensor, dtype: torch.dtype | str, what: str,
                 relative_tolerance: float | None = None) -> tuple:
    """(largest difference, tolerance); a difference above the tolerance (or NaN) is an error. `dtype` names
    the storage type; a GGUF type (e.g. "q8_0") comes with its own relative_tolerance."""
    difference = (logits_on(model, prompt_ids) - reference).abs().max().item()
    relative_tolerance = RELATIVE_TOLERANCE[dtype] if relative_tolerance is None else relative_tolerance
    tolerance = relative_tolerance * max(1.0, reference.abs().max().item())
    type_name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    print(f"{what}: largest logit difference from base + adapter {difference:.3g} "
          f"(tolerance {tolerance:.3g} for {type_name})", flush=True)
    if not difference <= tolerance:
        raise MedLoRAError(f"{what}: logits differ from base + adapter by {difference:.3g}, above the tolerance "
                           f"{tolerance:.3g} for {type_name}; nothing was exported")
    return difference, tolerance


def merge_adapter(inputs: ExportInputs, dtype: torch.dtype, device="cpu", trust_remote_code=False) -> MergedModel:
    """Load base + adapter, merge with PEFT's merge_and_unload, and check the merged logits."""
    from peft import PeftModel

    adapter, settings = inputs.lora_weights, inputs.run_settings
    has_own_tokenizer = (adapter / "tokenizer_config.json").is_file()  # it may carry an added pad token
    tokenizer = load_tokenizer(str(adapter if has_own_tokenizer else inputs.model_path), trust_remote_code)
    bits = 4 if settings.get("load_in_4bit") else 8 if settings.get("load_in_8bit") else None
    as_trained = f" ({bits}-bit, as trained)" if bits else ""
    print(f"loading {inputs.base_model} in {dtype_name(dtype)} on {device}{as_trained}", flush=True)
    model = load_base_model(inputs.model_path, dtype, load_in_4bit=bits == 4, load_in_8bit=bits == 8,
                            trust_remote_code=trust_remote_code, device=device)
    merged_into = "base"
    if getattr(model, "is_quantized", False):
        merged_into = f"de-quantized {f'{bits}-bit ' if bits else ''}base"
        print(f"QLoRA: merging into the {merged_into} in {dtype_name(dtype)}. The adapter learned to correct the "
              "quantized weights, not the original ones, and a merged update cannot be stored back in "
              "quantized weights without rounding it away.", flush=True)
        try:
            model = model.dequantize(dtype=dtype)
        except (NotImplementedError, ValueError) as error:
            raise MedLoRAError(f"--base_model {inputs.base_model}: cannot de-quantize it for merging ({error}); "
                               "pass an unquantized --base_model") from None
    fit_embeddings_to_tokenizer(model, tokenizer)
    try:
        model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as error:  # e.g. shapes of another model size
        reason = " ".join(str(error).split()) or type(error).__name__
        raise MedLoRAError(f"--lora_weights {adapter} does not fit --base_model {inputs.base_model}: "
                           f"{reason[:300]}") from None
    model.eval()
    prompt_ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids.to(device)
    reference = logits_on(model, prompt_ids)
    with model.disable_adapter():
        adapter_change = (reference - logits_on(model, prompt_ids)).abs().max().item()
    print(f"the adapter changes the logits on the check prompt by up to {adapter_change:.3g}"
          + (" (it does nothing: an untrained adapter?)" if adapter_change == 0 else ""), flush=True)
    model = model.merge_and_unload(progressbar=True, safe_merge=True)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    difference, tolerance = check_logits(model, prompt_ids, reference, dtype, "merged model")
    return MergedModel(model, tokenizer, dtype, merged_into, prompt_ids, reference, adapter_change, difference,
                       tolerance)


def write_export_note(folder: Path, inputs: ExportInputs, merged: MergedModel, export_format: str,
                      extra: dict | None = None) -> None:
    """medlora_export.json: what was merged into what, and how well the merge check went (+ `extra`)."""
    note = {
        "format": export_format, "base_model": inputs.base_model, "resolved_base_model": str(inputs.model_path),
        "lora_weights": str(inputs.lora_weights.resolve()), "merged_into": merged.merged_into,
        "dtype": dtype_name(merged.dtype), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "prompt_template_name": inputs.run_settings.get("prompt_template_name"), "check_prompt": CHECK_PROMPT,
        "max_logit_difference": merged.max_difference, "logit_tolerance": merged.tolerance,
        "adapter_max_logit_change": merged.adapter_change, **(extra or {}),
    }
    (folder / EXPORT_NOTE_FILE).write_text(json.dumps(note, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- Hugging Face checkpoint ---------------------------------------------------------------------------------
def save_hf_checkpoint(merged: MergedModel, inputs: ExportInputs, folder: Path, max_shard_size: str) -> None:
    merged.model.save_pretrained(folder, max_shard_size=max_shard_size)
    merged.tokenizer.save_pretrained(folder)
    copy_tokenizer_model(inputs, folder)  # converters such as llama.cpp's prefer SentencePiece's own file


def check_saved_checkpoint(folder: Path, merged: MergedModel, device="cpu", trust_remote_code=False) -> float:
    """Load the export back as users will (AutoModelForCausalLM, no adapter) and check it again."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as tensors:
            leftover = [key for key in tensors.keys() if "lora_" in key]  # noqa: SIM118 - safe_open is no dict
        if leftover:
            raise MedLoRAError(f"{shard.name}: LoRA tensors left after merging ({leftover[0]}, ...)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=merged.dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    difference, _ = check_logits(model, merged.prompt_ids, merged.reference_logits, merged.dtype, "saved checkpoint")
    return difference


# ---- Meta layout -----------------------------------------------------------------------------------------------
def check_meta_layout_supported(config) -> None:
    """One-line refusal for models whose weights have no place in Meta's LLaMA layout."""
    model_type = config.model_type
    if model_type not in META_LAYOUT_TYPES:
        raise MedLoRAError(f"Meta's consolidated.00.pth layout exists for LLaMA-family models "
                           f"({', '.join(META_LAYOUT_TYPES)}), not for model type '{model_type}'; "
                           "use export_hf_checkpoint.py instead")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = rope_parameters(config)
    problems = [
        (config.hidden_act != "silu", f"hidden_act {config.hidden_act!r} (Meta's layout implies SwiGLU with silu)"),
        (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False), "bias terms"),
        (head_dim * config.num_attention_heads != config.hidden_size,
         f"head_dim {head_dim} x {config.num_attention_heads} heads != hidden_size {config.hidden_size}"),
        (rope.get("rope_type", "default") not in ("default", "llama3"), f"rope_type {rope.get('rope_type')!r}"),
    ]
    for failed, what in problems:
        if failed:
            raise MedLoRAError(f"this {model_type} model has {what}, which Meta's layout cannot express; "
                               "use export_hf_checkpoint.py instead")


def rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)})


def meta_ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The feed-forward width Meta's reference code derives from params.json."""
    hidden_dim = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def meta_ffn_sizing(dim: int, intermediate_size: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's formula give intermediate_size: Meta's own
    choices where they fit (LLaMA 1/2, Llama 3 8B/70B, Llama 3.2), else exact values for this model."""
    known = [(None, 256), (1.3, 1024), (1.3, 4096), (1.5, 256), (1.2, 4096)]
    powers_of_two = [(None, 2 ** power) for power in range(7, -1, -1)]
    base_width = int(2 * (4 * dim) / 3)
    # exact: round Meta's width up to intermediate_size itself, shrinking it first when it is wider
    exact = (None if base_width <= intermediate_size else intermediate_size / base_width, intermediate_size)
    for multiplier, multiple_of in known + powers_of_two + [exact]:
        if meta_ffn_hidden_dim(dim, multiple_of, multiplier) == intermediate_size:
            return {"multiple_of": multiple_of, **({"ffn_dim_multiplier": multiplier} if multiplier else {})}
    raise MedLoRAError(f"intermediate_size {intermediate_size} cannot be expressed with Meta's feed-forward formula "
                       f"for dim {dim}")


def meta_params(config, vocab_size: int) -> dict:
    """params.json, read from the model's config."""
    rope = rope_parameters(config)
    params = dict(dim=config.hidden_size, n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
                  n_kv_heads=config.num_key_value_heads or config.num_attention_heads, vocab_size=vocab_size,
                  **meta_ffn_sizing(config.hidden_size, config.intermediate_size), norm_eps=config.rms_norm_eps,
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "llama3":  # Llama 3.1+ long-context frequency scaling, as Meta's params.json says it
        params["use_scaled_rope"] = True
    return params


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation that Hugging Face's LLaMA conversion applies to wq/wk so that its
    rotate-half rotary matches Meta's interleaved pairs: per head, rows [evens..., odds...] -> [e0, o0, e1, o1...]."""
    rows, columns = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def meta_state_dict(model, dtype: torch.dtype) -> dict:
    """The merged LLaMA/Mistral model's tensors under Meta's names; every parameter must find a place."""
    from tqdm import tqdm

    config = model.config
    n_heads, n_kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    sources = {"tok_embeddings.weight": model.get_input_embeddings().weight, "norm.weight": model.model.norm.weight,
               "output.weight": model.get_output_embeddings().weight}
    tensors = {}
    for index, layer in enumerate(tqdm(model.model.layers, desc="converting layers to Meta's layout")):
        prefix, attention, mlp = f"layers.{index}.", layer.self_attn, layer.mlp
        sources.update({
            prefix + "attention.wq.weight": attention.q_proj.weight,
            prefix + "attention.wk.weight": attention.k_proj.weight,
            prefix + "attention.wv.weight": attention.v_proj.weight,
            prefix + "attention.wo.weight": attention.o_proj.weight,
            prefix + "feed_forward.w1.weight": mlp.gate_proj.weight,
            prefix + "feed_forward.w2.weight": mlp.down_proj.weight,
            prefix + "feed_forward.w3.weight": mlp.up_proj.weight,
            prefix + "attention_norm.weight": layer.input_layernorm.weight,
            prefix + "ffn_norm.weight": layer.post_attention_layernorm.weight,
        })
        tensors[prefix + "attention.wq.weight"] = unpermute_rotary(attention.q_proj.weight.detach(), n_heads)
        tensors[prefix + "attention.wk.weight"] = unpermute_rotary(attention.k_proj.weight.detach(), n_kv_heads)
    placed = {id(parameter) for parameter in sources.values()}
    unplaced = [name for name, parameter in model.named_parameters() if id(parameter) not in placed]
    if unplaced:
        raise MedLoRAError(f"{unplaced[0]} (and {len(unplaced) - 1} more) has no place in Meta's layout; "
                           "use export_hf_checkpoint.py instead")
    for name, parameter in sources.items():
        tensors.setdefault(name, parameter.detach())
    # clone: tied embeddings become two tensors, and no tensor drags a larger storage into the file
    return {name: tensor.to("cpu", dtype).contiguous().clone() for name, tensor in tensors.items()}


def copy_tokenizer_model(inputs: ExportInputs, folder: Path) -> Path | None:
    """Meta's tokenizer.model (SentencePiece, or tiktoken for Llama 3) beside the weights, when the base has one."""
    source = find_tokenizer_model(inputs)
    return Path(shutil.copyfile(source, folder / "tokenizer.model")) if source else None


def find_tokenizer_model(inputs: ExportInputs) -> Path | None:
    """The adapter's or the base's tokenizer.model, if either has one."""
    candidates = [inputs.lora_weights / "tokenizer.model"]
    if Path(inputs.model_path).is_dir():
        candidates += [Path(inputs.model_path, "tokenizer.model"), Path(inputs.model_path, "original/tokenizer.model")]
    else:  # a hub id: fast tokenizers load without tokenizer.model, so fetch it now if the repo has one
        from huggingface_hub import hf_hub_download

        for name in ("tokenizer.model", "original/tokenizer.model"):
            try:
                candidates.append(Path(hf_hub_download(inputs.model_path, name)))
            except Exception:  # noqa: BLE001, S110 - absent from the repo, or offline: exported without it
                pass
    return next((candidate for candidate in candidates if candidate.is_file()), None)
