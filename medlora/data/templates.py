"""Prompt templates: `templates/<name>.json`, and how a conversation renders to text.

A template keeps alpaca-lora's fields (`description`, `prompt_input`, `prompt_no_input`,
`response_split`) and adds what multi-turn chat needs:

  system            default system prompt ("" for none)
  system_format     how a non-empty system prompt is written; fills `{system}` in the prompts
  prompt_input      first user turn when the record has an `input` ({system}, {instruction}, {input})
  prompt_no_input   first user turn otherwise ({system}, {instruction})
  prompt_next_turn  every later user turn ({instruction})
  assistant_format  how a reply is written ({content}); the reply is what the model learns
  assistant_suffix  text closing each reply (e.g. "<|im_end|>"), also learned
  stop              strings that end a generated reply

Prompts never end in a space: a trailing space would be tokenized with the reply's first word.
The `chat` template (`use_tokenizer_chat_template`) renders with the base tokenizer's own
chat template instead.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from medlora.errors import MedLoRAError
from medlora.paths import TEMPLATES_DIR


@dataclass
class Conversation:
    """A normalized training or chat record.

    messages alternate user/assistant, starting with the user; the first user message may carry
    `input` (alpaca's second field). system None means "use the template's default system prompt".
    """

    messages: list  # [{"role": "user"|"assistant", "content": str, "input"?: str}]
    system: str | None = None
    source: str = ""  # "file: record N", for error messages


@dataclass
class RenderedConversation:
    text: str
    assistant_spans: list = field(default_factory=list)  # [(start, end)] character spans of replies


def available_templates():
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.json"))


# The placeholders each field may use; any other {name} would fail (or render wrong) mid-run.
PLACEHOLDERS = {"system_format": {"system"}, "prompt_input": {"system", "instruction", "input"},
                "prompt_no_input": {"system", "instruction"}, "prompt_next_turn": {"instruction"},
                "assistant_format": {"content"}}


def check_placeholders(spec: dict, path) -> None:
    """Refuse a template whose field names a placeholder it cannot be given (or has a stray brace)."""
    import string

    for key, allowed in PLACEHOLDERS.items():
        if not isinstance(spec.get(key), str):
            continue
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(spec[key]) if name is not None}
        except ValueError as error:
            raise MedLoRAError(f"{path}: field '{key}': {error} (write a literal brace as {{{{ or }}}})") from None
        unknown = sorted(names - allowed)
        if unknown:
            raise MedLoRAError(f"{path}: field '{key}': unknown placeholder {{{unknown[0]}}}; this field can use "
                               + ", ".join(f"{{{name}}}" for name in sorted(allowed)))


class PromptTemplate:
    def __init__(self, name: str, spec: dict):
        self.name = name
        self.spec = spec
        self.description = spec.get("description", "")
        self.uses_tokenizer_chat_template = bool(spec.get("use_tokenizer_chat_template"))
        self.system = spec.get("system", "")
        self.response_split = spec.get("response_split")
        self.stop = list(spec.get("stop", []))

    @classmethod
    def load(cls, name: str) -> "PromptTemplate":
        path = Path(name) if name.endswith(".json") else TEMPLATES_DIR / f"{name}.json"
        if not path.is_file():
            raise MedLoRAError(
                f"unknown prompt template '{name}': no file {path}; available: {', '.join(available_templates())}"
            )
        try:
            spec = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as error:
            raise MedLoRAError(f"{path}: not UTF-8 text (byte offset {error.start})") from None
        except json.JSONDecodeError as error:
            raise MedLoRAError(f"{path}: invalid JSON: {error}") from None
        if not isinstance(spec, dict):
            raise MedLoRAError(f"{path}: expected a JSON object of template fields, got {type(spec).__name__}")
        if not spec.get("use_tokenizer_chat_template"):
            required = ["prompt_input", "prompt_no_input", "prompt_next_turn", "assistant_format"]
            missing = [key for key in required if not isinstance(spec.get(key), str)]
            if missing:
                raise MedLoRAError(f"{path}: field '{missing[0]}': missing or not a string")
            check_placeholders(spec, path)
        return cls(path.stem, spec)

    # ---- rendering -------------------------------------------------------------------------------
    def render(self, conversation: Conversation, tokenizer=None) -> RenderedConversation:
        """Render the whole conversation. If it ends with a user message, the text ends with the
        prompt for the next reply (what generation continues from)."""
        if self.uses_tokenizer_chat_template:
            return self._render_with_tokenizer(conversation, tokenizer)
        system = self.system if conversation.system is None else conversation.system
        system_text = self.spec.get("system_format", "{system}").format(system=system) if system else ""
        pieces, spans, length = [], [], 0
        for index, message in enumerate(conversation.messages):
            if message["role"] == "user":
                if index == 0 and message.get("input"):
                    text = self.spec["prompt_input"].format(
                        system=system_text, instruction=message["content"], input=message["input"]
                    )
                elif index == 0:
                    text = self.spec["prompt_no_input"].format(system=system_text, instruction=message["content"])
                else:  # a later turn's input (e.g. its knowledge block) follows its question
                    content = "\n\n".join(part for part in (message["content"], message.get("input")) if part)
                    text = self.spec["prompt_next_turn"].format(instruction=content)
                pieces.append(text)
                length += len(text)
            else:
                text = self.spec["assistant_format"].format(content=message["content"])
                text += self.spec.get("assistant_suffix", "")
                spans.append((length, length + len(text)))
                pieces.append(text)
                length += len(text)
        return RenderedConversation("".join(pieces), spans)

    def _render_with_tokenizer(self, conversation, tokenizer) -> RenderedConversation:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise MedLoRAError(
                "template 'chat' uses the base tokenizer's chat template, and this tokenizer has none; "
                f"pick another --prompt_template_name ({', '.join(available_templates())})"
            )
        messages = []
        if conversation.system:
            messages.append({"role": "system", "content": conversation.system})
        for message in conversation.messages:
            content = message["content"]
            if message.get("input"):
                content = f"{content}\n\n{message['input']}"
            messages.append({"role": message["role"], "content": content})

        def apply(upto, generation_prompt):
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )

        ends_with_user = messages[-1]["role"] == "user"
        text = apply(len(messages), ends_with_user)
        spans = []
        # A reply's span runs from the end of the prompt before it to the end of the text with it.
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt, with_reply = apply(index, True), apply(index + 1, False)
            if not (text.startswith(with_reply) and with_reply.startswith(prompt)):
                raise MedLoRAError(
                    f"{conversation.source}: the tokenizer's chat template does not render turns as a growing "
                    "prefix, so replies cannot be located for the label mask; use another template"
                )
            start, end = len(prompt), len(with_reply)
            spans.append((start, end))
        return RenderedConversation(text, spans)

    # ---- alpaca-lora compatible helpers ------------------------------------------------------------
    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """alpaca-lora's Prompter.generate_prompt: a single-turn prompt, optionally with the reply."""
        message = {"role": "user", "content": instruction, "input": input or ""}
        messages = [message] + ([{"role": "assistant", "content": label}] if label else [])
        return self.render(Conversation(messages)).text

    def get_response(self, output: str) -> str:
        """alpaca-lora's Prompter.get_response: the text after the last response marker."""
        if self.response_split and self.response_split in output:
            output = output.split(self.response_split)[-1]
        return output.strip()
