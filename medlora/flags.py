"""How a stage declares its flags, and how `--help` describes them.

A stage composes its flags from the shared groups in medlora/flag_groups.py (each flag declared once, with
its default, type and description) and its own, with `@stage_flags(...)`; fire sees them as the function's
parameters. A flag's description is the stage's own docstring entry under `Args:` where its meaning is the
stage's own (what --data_path holds, what a batch counts), else the group's. Old alpaca-lora names stay
accepted as aliases of one name per concept.
"""

import functools
import inspect
import re
import types
from typing import NamedTuple

from medlora.errors import MedLoRAError

# Old names -> the one name every script uses (alpaca-lora's generate.py said load_8bit and prompt_template).
ALIASES = {"load_8bit": "load_in_8bit", "load_4bit": "load_in_4bit", "prompt_template": "prompt_template_name"}

class Flag(NamedTuple):
    default: object
    type: object = None  # default: the default's type
    help: str = ""


class FlagGroup:
    """Flags that belong together (model, LoRA, training, ...), each with its default, type and description."""

    def __init__(self, title: str, **flags):
        self.title = title
        self.flags = {name: flag if isinstance(flag, Flag) else Flag(flag, type(flag)) for name, flag in flags.items()}

    def but(self, **defaults) -> "FlagGroup":
        """The same flags with a stage's own defaults (dpo.py trains at --learning_rate 5e-5)."""
        unknown = set(defaults) - set(self.flags)
        if unknown:
            raise TypeError(f"{self.title} has no flag {', '.join(sorted(unknown))}")
        return FlagGroup(self.title, **{name: flag._replace(default=defaults[name]) if name in defaults else flag
                                        for name, flag in self.flags.items()})

    def without(self, *names) -> "FlagGroup":
        """The group less the flags a stage does not take (pretrain.py has no --prompt_template_name)."""
        unknown = set(names) - set(self.flags)
        if unknown:
            raise TypeError(f"{self.title} has no flag {', '.join(sorted(unknown))}")
        return FlagGroup(self.title, **{name: flag for name, flag in self.flags.items() if name not in names})


class Flags(types.SimpleNamespace):
    """A stage's flag values, as attributes (flags.batch_size)."""

    def as_dict(self) -> dict:
        return dict(vars(self))


def stage_flags(*groups: FlagGroup):
    """Give a stage function `stage(flags)` the flags of `groups` as its parameters (what fire, --help and
    the unknown-flag check read); it is called with a Flags object. Called from Python it takes the same
    keyword arguments as on the command line."""
    declared = {}
    for group in groups:
        for name, flag in group.flags.items():
            if name in declared:
                raise TypeError(f"flag --{name} is declared twice")
            declared[name] = flag
    signature = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=flag.default,
                          annotation=flag.type or type(flag.default)) for name, flag in declared.items()])

    def decorate(stage):
        @functools.wraps(stage)
        def command(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return stage(Flags(**bound.arguments))

        command.__signature__ = signature
        command.flag_help = {name: flag.help for name, flag in declared.items()}
        return command

    return decorate


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


def flag_descriptions(function) -> dict:
    """Every flag of a stage function with its description: its docstring's `Args:` entry, else the one its
    flag group declares; a flag described nowhere maps to "" (a test keeps that from happening)."""
    own = docstring_args(function)
    declared = getattr(function, "flag_help", {})  # only @stage_flags functions declare group flags
    return {name: own.get(name) or declared.get(name, "") for name in inspect.signature(function).parameters}


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


def help_text(function, script_doc: str) -> str:
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
