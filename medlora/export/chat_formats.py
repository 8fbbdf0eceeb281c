"""A MedLoRA prompt template written out for other runtimes: as a Jinja chat template (what GGUF's
`tokenizer.chat_template` and transformers' apply_chat_template read) and as a Go template (what an Ollama
Modelfile's TEMPLATE is), so that a model exported from MedLoRA is prompted exactly as it was trained.

Both are built from the template's fields (templates/*.json): system_format, prompt_no_input,
prompt_next_turn, assistant_format, assistant_suffix. For the `chat` template, which trains with the
tokenizer's own Jinja template, those fields are first recovered by rendering marker conversations through
it, and the recovered form is checked to render exactly as the tokenizer does.
A chat has no alpaca `input` field, so user turns are written with prompt_no_input / prompt_next_turn.
"""

import json
import string

from medlora.data.templates import Conversation, PromptTemplate
from medlora.errors import MedLoRAError

CHAT_FIELDS = ("system", "system_format", "prompt_no_input", "prompt_next_turn", "assistant_format",
               "assistant_suffix")
MARKERS = {"system": "\x01SYSTEM\x01", "user": "\x01USER{}\x01", "assistant": "\x01ASSISTANT{}\x01"}


def chat_fields(template: PromptTemplate, tokenizer=None) -> dict:
    """The template's chat fields; for `chat`, recovered from the tokenizer's Jinja template."""
    if not template.uses_tokenizer_chat_template:
        return {"system": "", "system_format": "{system}", "assistant_suffix": "",
                **{key: template.spec[key] for key in CHAT_FIELDS if key in template.spec}}
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise MedLoRAError("template 'chat' uses the tokenizer's chat template, and this tokenizer has none")
    fields = fields_from_chat_template(tokenizer)
    for conversation in sample_conversations():
        expected = template.render(conversation, tokenizer).text
        if render_fields(fields, conversation) != expected:
            raise MedLoRAError("the tokenizer's chat template does not follow a fixed turn layout that Ollama's "
                               "template can express; write the Modelfile's TEMPLATE by hand")
    return fields


def fields_from_chat_template(tokenizer) -> dict:
    """system_format, prompt_no_input... read off the Jinja template's rendering of marker conversations."""
    system, user1, user2, reply = (MARKERS["system"], MARKERS["user"].format(1), MARKERS["user"].format(2),
                                   MARKERS["assistant"].format(1))

    def apply(messages, generation_prompt=True):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as error:  # noqa: BLE001 - a Jinja template may raise anything (e.g. "no system role")
            raise MedLoRAError(f"the tokenizer's chat template cannot render {[m['role'] for m in messages]} "
                               f"({error}); write the Modelfile's TEMPLATE by hand") from None

    def cut(text, *markers):
        pieces = []
        for marker in markers:
            if text.count(marker) != 1:
                raise MedLoRAError("the tokenizer's chat template does not write each message once, in order; "
                                   "write the Modelfile's TEMPLATE by hand")
            before, text = text.split(marker)
            pieces.append(before)
        return [*pieces, text]

    user, assistant = {"role": "user", "content": user1}, {"role": "assistant", "content": reply}
    no_system_head, after_user = cut(apply([user]), user1)
    system_head, system_tail_and_user_head, _ = cut(apply([{"role": "system", "content": system}, user]), system, user1)
    *_, reply_close = cut(apply([user, assistant], generation_prompt=False), reply)
    *_, between_turns, _ = cut(apply([user, assistant, {"role": "user", "content": user2}]), reply, user2)
    if not between_turns.startswith(reply_close):
        raise MedLoRAError("the tokenizer's chat template closes a reply differently when another turn follows; "
                           "write the Modelfile's TEMPLATE by hand")
    user_head = between_turns[len(reply_close):]
    if not (system_tail_and_user_head.endswith(user_head) and no_system_head.endswith(user_head)):
        raise MedLoRAError("the tokenizer's chat template writes the first user turn differently from later ones; "
                           "write the Modelfile's TEMPLATE by hand")
    system_format = system_head + "{system}" + system_tail_and_user_head[:len(system_tail_and_user_head) - len(user_head)]
    default_block = no_system_head[:len(no_system_head) - len(user_head)]
    default_system = ""
    if default_block:  # the template writes a system prompt of its own when the conversation has none
        head, tail = system_format.split("{system}")
        if not (default_block.startswith(head) and default_block.endswith(tail)):
            raise MedLoRAError("the tokenizer's chat template starts a conversation without a system prompt in a way "
                               "Ollama's template cannot express; write the Modelfile's TEMPLATE by hand")
        default_system = default_block[len(head):len(default_block) - len(tail)]
    return {"system": default_system, "system_format": system_format,
            "prompt_no_input": "{system}" + user_head + "{instruction}" + after_user,
            "prompt_next_turn": user_head + "{instruction}" + after_user,
            "assistant_format": "{content}", "assistant_suffix": reply_close}


def render_fields(fields: dict, conversation: Conversation) -> str:
    """The conversation rendered by chat fields, as PromptTemplate renders a template's own fields."""
    return PromptTemplate("fields", {**fields, "prompt_input": fields["prompt_no_input"]}).render(conversation).text


def sample_conversations() -> list:
    """Conversations every exported template must render like MedLoRA: with and without a system prompt,
    one turn and several, newlines and braces in the text."""
    first = {"role": "user", "content": "I have had a headache for three days.\nShould I worry? {yes/no}"}
    turns = [first, {"role": "assistant", "content": "How severe is it, and do you have a fever?"},
             {"role": "user", "content": "Mild, no fever."}]
    return [Conversation([first]), Conversation(turns), Conversation(turns, system="You are a careful triage nurse."),
            Conversation(turns + [{"role": "assistant", "content": "Rest and fluids; see a doctor if it worsens."}])]


def format_pieces(format_string: str) -> list:
    """'{system}### Instruction:\\n{instruction}' -> [('field', 'system'), ('text', '### Instruction:\\n'), ...]"""
    pieces = []
    for literal, field, _, _ in string.Formatter().parse(format_string):
        if literal:
            pieces.append(("text", literal))
        if field is not None:
            pieces.append(("field", field))
    return pieces


# ---- Jinja (GGUF tokenizer.chat_template) ------------------------------------------------------------------
def jinja_text(text: str) -> str:
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def jinja_format(format_string: str, values: dict) -> str:
    return "".join(jinja_text(value) if kind == "text" else values[value] for kind, value in format_pieces(format_string))


def jinja_chat_template(fields: dict) -> str:
    """A Jinja chat template that renders a conversation as MedLoRA does with these fields: a leading system
    message replaces the default system prompt; user turns and replies follow. One line, literals as
    expressions, so that no whitespace control (trim_blocks, lstrip_blocks) can change the text."""
    system_block = "{% if system %}" + jinja_format(fields["system_format"], {"system": "{{ system }}"}) + "{% endif %}"
    user_first = jinja_format(fields["prompt_no_input"], {"system": system_block, "instruction": "{{ message['content'] }}"})
    user_next = jinja_format(fields["prompt_next_turn"], {"instruction": "{{ message['content'] }}"})
    reply = (jinja_format(fields["assistant_format"], {"content": "{{ message['content'] }}"})
             + (jinja_text(fields["assistant_suffix"]) if fields["assistant_suffix"] else ""))
    return ("{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set turns = messages[1:] %}{% else %}{% set system = " + json.dumps(fields["system"], ensure_ascii=False)
            + " %}{% set turns = messages %}{% endif %}"
            "{% for message in turns %}{% if message['role'] == 'user' %}{% if loop.first %}" + user_first
            + "{% else %}" + user_next + "{% endif %}{% elif message['role'] == 'assistant' %}" + reply
            + "{% endif %}{% endfor %}")


# ---- Go (Ollama TEMPLATE) ------------------------------------------------------------------------------------
def go_text(text: str) -> str:
    return text.replace("{{", '{{ "{{" }}')  # text is copied verbatim except an action's opening braces


def go_format(format_string: str, values: dict) -> str:
    return "".join(go_text(value) if kind == "text" else values[value] for kind, value in format_pieces(format_string))


def ollama_template(fields: dict) -> str:
    """Ollama's TEMPLATE for these fields. Ollama gives a chat template .System (the request's system messages,
    or the Modelfile's SYSTEM) and .Messages (every message, system ones included, with .Role and .Content)."""
    system_block = "{{ if $.System }}" + go_format(fields["system_format"], {"system": "{{ $.System }}"}) + "{{ end }}"
    user_first = go_format(fields["prompt_no_input"], {"system": system_block, "instruction": "{{ .Content }}"})
    user_next = go_format(fields["prompt_next_turn"], {"instruction": "{{ .Content }}"})
    reply = go_format(fields["assistant_format"], {"content": "{{ .Content }}"}) + go_text(fields["assistant_suffix"])
    return ('{{ $first := true }}{{ range .Messages }}{{ if eq .Role "user" }}{{ if $first }}{{ $first = false }}'
            + user_first + "{{ else }}" + user_next + '{{ end }}{{ else if eq .Role "assistant" }}' + reply
            + "{{ end }}{{ end }}")


def modelfile_text(gguf_name: str, fields: dict, stops: list, template_name: str) -> str:
    """An Ollama Modelfile for the GGUF file beside it: the training template, its system prompt and stops."""
    template = ollama_template(fields)
    for what, text in (("TEMPLATE", template), ("SYSTEM", fields["system"])):
        if '"""' in text:
            raise MedLoRAError(f'the {what} text contains """, which a Modelfile cannot quote')
    stops = list(dict.fromkeys(stop for stop in [*stops, fields["assistant_suffix"].strip()] if stop))
    lines = [
        "# Ollama Modelfile written by MedLoRA's export_gguf.py.",
        "# Medical outputs of this model are NOT medical advice and must not replace a qualified clinician.",
        f"# Prompt format: MedLoRA's {template_name!r} template, the one the adapter was trained with.",
        "#   ollama create medlora -f Modelfile && ollama run medlora",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
    ]
    if fields["system"]:
        lines.append(f'SYSTEM """{fields["system"]}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines.append('LICENSE """This model is a research tool. What it writes is not medical advice and must not '
                 'replace a qualified clinician. The base model\'s own licence applies."""')
    return "\n".join(lines) + "\n"
