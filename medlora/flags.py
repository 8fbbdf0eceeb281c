"""Flags that several stages share, described once; `--help` of every script is built from them.

A stage function lists its flags as parameters (fire drives them). A flag's description is the stage's own
docstring entry under `Args:` where its meaning is the stage's own (what --data_path holds, what a batch counts),
else the shared description here. Old alpaca-lora names stay accepted as aliases of one name per concept.
"""

import inspect
import re

from medlora.errors import MedLoRAError

# Old names -> the one name every script uses (alpaca-lora's generate.py said load_8bit and prompt_template).
ALIASES = {"load_8bit": "load_in_8bit", "load_4bit": "load_in_4bit", "prompt_template": "prompt_template_name"}

FLAG_HELP = {
    # model
    "base_model": "Hub id, local folder, or a built-in model: builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct, "
                  "real weights, Apache-2.0) or builtin:tiny-llama (random toy for tests); see docs/models.md. "
                  "Default: the base the adapter was trained on, else builtin:smollm2-135m-instruct.",
    "lora_weights": "A LoRA adapter folder written by a MedLoRA stage (or a hub adapter id); empty: the base model alone.",
    "prompt_template_name": "A template in templates/ or a template .json; default: the adapter's (medlora_run.json), "
                            "else the base model's own (chat for SmolLM2), else alpaca. Alias: --prompt_template.",
    "precision": "auto (GPU: bf16, else fp16; CPU: bf16 autocast where it has AMX/AVX512-BF16, else fp32), fp32, bf16, "
                 "bf16-mixed (bf16 autocast, fp32 weights) or fp16.",
    "load_in_4bit": "QLoRA: load the base in 4-bit NF4 with double quantization (bitsandbytes). Alias: --load_4bit.",
    "load_in_8bit": "Load the base in 8-bit (bitsandbytes). Alias: --load_8bit.",
    "device": "cuda, cuda:1, mps or cpu; default: the first available of these.",
    "trust_remote_code": "Run the model repository's own Python code (only for repositories you trust).",
    # LoRA
    "lora_r": "LoRA rank (of a fresh adapter).",
    "lora_alpha": "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).",
    "lora_dropout": "Dropout on the LoRA input.",
    "lora_target_modules": "Module names (comma-separated or a list), or all-linear; default: the architecture's usual "
                           "attention projections.",
    # training
    "micro_batch_size": "Examples per forward pass on one device; gradient accumulation makes up --batch_size.",
    "max_steps": "If > 0, stop after this many optimizer steps (overrides num_epochs).",
    "learning_rate": "Peak learning rate (linear warmup, then linear decay).",
    "warmup_ratio": "Fraction of the optimizer steps spent in linear warmup.",
    "warmup_steps": "Optimizer steps of linear warmup, 0 for none; when given it overrides --warmup_ratio.",
    "seed": "Seed for the split, the shuffling, sampling, LoRA initialisation and dropout.",
    "gradient_checkpointing": "Recompute activations in the backward pass (non-reentrant): less memory, slower "
                              "(about one more forward pass per step).",
    "logging_steps": "Log the training metrics every this many optimizer steps.",
    "eval_steps": "Evaluate on the validation split every this many optimizer steps.",
    "save_steps": "Write a resumable checkpoint every this many optimizer steps.",
    "save_total_limit": "Keep at most this many checkpoints.",
    "report_to": "none, tensorboard (logs under output_dir/runs) or wandb.",
    "wandb_project": "Weights & Biases project; setting it turns on wandb reporting.",
    "wandb_run_name": "Weights & Biases run name.",
    "wandb_watch": "Weights & Biases model watching: false, gradients or all.",
    "wandb_log_model": "Upload checkpoints to Weights & Biases: false or true.",
    "resume_from_checkpoint": "A checkpoint folder to resume from, or True for the newest complete one in output_dir.",
    "overwrite_output_dir": "Train into an output_dir that already holds a finished run (refused otherwise, unless "
                            "resuming).",
    # generation
    "temperature": "Sampling temperature; 0 for greedy decoding (then top_p and top_k do not apply).",
    "top_p": "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.",
    "top_k": "Sample among the k most likely tokens; 0 for no limit.",
    "num_beams": "Beam search with this many beams (> 1: the answer is printed at once, not streamed).",
    "max_new_tokens": "At most this many tokens per answer.",
    "repetition_penalty": "Penalty (> 1) on tokens already in the conversation; 1 for none.",
    "system": "System prompt; default: the template's.",
    # export
    "force": "Replace an existing output folder.",
}


def docstring_args(function) -> dict:
    """The `name: description` entries under `Args:` in a function's docstring (continuation lines joined)."""
    doc = inspect.getdoc(function) or ""
    if "Args:" not in doc:
        return {}
    entries, name = {}, None
    for line in doc.split("Args:", 1)[1].splitlines():
        match = re.match(r"^ {4}(\w+): (.*)$", line)
        if match:
            name = match.group(1)
            entries[name] = match.group(2).strip()
        elif name and line.startswith(" " * 8):
            entries[name] += " " + line.strip()
        elif line.strip():
            name = None
    return entries


def inline_comments(function) -> dict:
    """alpaca-lora style self-documenting defaults: `name: type = default,  # description` in the signature."""
    source = inspect.getsource(function)
    signature = source[:source.index("):") if "):" in source else len(source)]
    comments = {}
    for line in signature.splitlines():
        match = re.match(r"^\s+(\w+)\s*:.*?,\s*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def flag_descriptions(function) -> dict:
    """Every flag of a stage function with its description: its docstring's `Args:` entry, else the comment on
    its line in the signature, else the shared one here; a flag described nowhere maps to None (a test keeps
    that from happening)."""
    own, comments = docstring_args(function), inline_comments(function)
    return {name: own.get(name) or comments.get(name) or FLAG_HELP.get(name)
            for name in inspect.signature(function).parameters}


def canonical_argv(function, argv: list) -> list:
    """argv with each alias flag (--load_8bit, --noload_8bit, --prompt_template=x) under the function's name for it."""
    names = set(inspect.signature(function).parameters)
    result = []
    for argument in argv:
        if argument == "--":
            result += argv[len(result):]
            break
        match = re.match(r"^--(no)?([\w-]+)(=.*)?$", argument)
        if match:
            negation, name, value = match.group(1) or "", match.group(2).replace("-", "_"), match.group(3) or ""
            canonical = ALIASES.get(name)
            if canonical in names and name not in names:
                argument = f"--{negation}{canonical}{value}"
        result.append(argument)
    return result


def help_text(function, script_doc: str, script_name: str) -> str:
    """`--help`: the script's docstring (how to run it), then every flag with its default and description."""
    lines = [(script_doc or "").strip(), "", "Flags:"]
    descriptions = flag_descriptions(function)
    for name, parameter in inspect.signature(function).parameters.items():
        default = parameter.default
        shown = "" if default is inspect.Parameter.empty else f" (default: {default!r})"
        lines.append(f"  --{name}{shown}")
        description = descriptions[name] or ""
        lines += [f"      {part}" for part in _wrap(description, 100)]
    aliases = [f"--{old} = --{new}" for old, new in ALIASES.items() if new in inspect.signature(function).parameters]
    if aliases:
        lines += ["", "Also accepted (alpaca-lora's names): " + ", ".join(aliases)]
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def check_numeric_flags(flags: dict) -> None:
    """Refuse, before any work, a numeric flag outside its range: positive counts and rates, a run that
    has steps, a validation size that is a count or a fraction. flags is a stage's settings; names this
    does not know, and flags not given (None), are not checked."""
    for name, value in flags.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if name in POSITIVE_FLAGS and not value > 0:
            raise MedLoRAError(f"--{name} must be > 0; got {value}")
        if name == "val_set_size" and value < 0:
            raise MedLoRAError(f"--val_set_size must be >= 0 (a count, or a fraction below 1); got {value}")
        if name in UNIT_INTERVAL_FLAGS and not 0 <= value < 1:
            raise MedLoRAError(f"--{name} must be in [0, 1); got {value}")
        if name in NON_NEGATIVE_FLAGS and value < 0:
            raise MedLoRAError(f"--{name} must be >= 0; got {value}")
    if flags.get("num_epochs") is not None and (flags.get("max_steps") or -1) <= 0 and not flags["num_epochs"] > 0:
        raise MedLoRAError(f"--num_epochs must be > 0 unless --max_steps is; got {flags['num_epochs']}")


POSITIVE_FLAGS = ("batch_size", "micro_batch_size", "cutoff_len", "learning_rate", "lora_r", "lora_alpha", "block_size",
                  "logging_steps", "eval_steps", "save_steps", "save_total_limit", "max_prompt_length",
                  "max_completion_length", "max_reply_chars", "max_new_tokens")


NON_NEGATIVE_FLAGS = ("warmup_steps", "neftune_noise_alpha", "simpo_gamma", "eval_prompts", "beta")


UNIT_INTERVAL_FLAGS = ("lora_dropout", "warmup_ratio")  # in [0, 1)
