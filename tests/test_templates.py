import copy
import json

import pytest

from medlora.data.templates import (
    TEMPLATES_DIR,
    Conversation,
    PromptTemplate,
    available_templates,
)
from medlora.errors import MedLoRAError

SINGLE_WITH_INPUT = Conversation([{"role": "user", "content": "What could this be?", "input": "Fever for two days."},
                                  {"role": "assistant", "content": "Likely a viral infection."}])
SINGLE = Conversation([{"role": "user", "content": "I have a headache."},
                       {"role": "assistant", "content": "Drink water and rest."}])
MULTI = Conversation([{"role": "user", "content": "I cough at night."},
                      {"role": "assistant", "content": "For how long?"},
                      {"role": "user", "content": "Three weeks."},
                      {"role": "assistant", "content": "Please see a doctor for a chest exam."}],
                     system="You are a careful doctor.")
REQUIRED = ["alpaca", "alpaca_short", "medalpaca", "chatdoctor", "huatuo", "bloom", "vicuna", "llama2",
            "llama3", "mistral", "chatml", "chat"]


def test_every_required_template_exists():
    assert set(REQUIRED) <= set(available_templates())


@pytest.mark.parametrize("name", available_templates())
@pytest.mark.parametrize("conversation", [SINGLE_WITH_INPUT, SINGLE, MULTI], ids=["input", "single", "multi"])
def test_every_template_renders_replies_as_exact_spans(name, conversation, tiny_tokenizer):
    template = PromptTemplate.load(name)
    rendered = template.render(conversation, tiny_tokenizer)
    replies = [m["content"] for m in conversation.messages if m["role"] == "assistant"]
    assert len(rendered.assistant_spans) == len(replies)
    for (start, end), reply in zip(rendered.assistant_spans, replies):
        assert reply in rendered.text[start:end]
    for message in conversation.messages:
        assert message["content"] in rendered.text
        if message.get("input"):
            assert message["input"] in rendered.text
    if conversation.system and name != "chat":
        assert conversation.system in rendered.text
    prompt_only = template.render(Conversation(conversation.messages[:-1], conversation.system), tiny_tokenizer)
    assert rendered.text.startswith(prompt_only.text)
    assert rendered.text[len(prompt_only.text):].strip().startswith(replies[-1].split()[0])


@pytest.mark.parametrize("name", [n for n in available_templates() if n != "chat"])
def test_prompts_never_end_with_a_space(name):
    spec = json.loads((TEMPLATES_DIR / f"{name}.json").read_text())
    for key in ("prompt_input", "prompt_no_input", "prompt_next_turn"):
        assert not spec[key].endswith(" "), f"{name}.{key} ends with a space"


def test_alpaca_prompt_matches_alpaca_lora_wording():
    template = PromptTemplate.load("alpaca")
    assert template.generate_prompt("Name a vitamin.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a vitamin.\n\n### Response:\n"
    )
    assert template.get_response(template.generate_prompt("Q", label="Vitamin C.")) == "Vitamin C."


def test_chat_template_follows_the_tokenizer(tiny_tokenizer):
    rendered = PromptTemplate.load("chat").render(MULTI, tiny_tokenizer)
    expected = tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": MULTI.system}] + [{"role": m["role"], "content": m["content"]} for m in MULTI.messages],
        tokenize=False)
    assert rendered.text == expected
    start, end = rendered.assistant_spans[-1]
    assert rendered.text[start:end] == "Please see a doctor for a chest exam.<|im_end|>\n"


def test_chat_template_without_tokenizer_template_fails_clearly(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(MedLoRAError, match="has none"):
        PromptTemplate.load("chat").render(SINGLE, tokenizer)


def test_unknown_template_names_the_choices():
    with pytest.raises(MedLoRAError, match="unknown prompt template 'nope'.*alpaca"):
        PromptTemplate.load("nope")
