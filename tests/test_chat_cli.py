"""chat.py driven through a pseudo-terminal (pexpect), and its one-shot --prompt mode.

Answers are greedy (temperature 0) so that they can be compared with the generation core's own
answers to the same conversation: that shows the history really is (and after /reset is not) used."""

import os
import sys

import pexpect
import pytest

from medlora.inference.generation import ChatModel, GenerationSettings
from tests.conftest import ROOT, run_script, sigint_as_a_terminal_sends_it

GREEDY_FLAGS = ["--temperature", "0", "--repetition_penalty", "3", "--max_new_tokens", "12"]
GREEDY = GenerationSettings(temperature=0, repetition_penalty=3.0, max_new_tokens=12)
FIRST = "I have had a dry cough for a week."
SECOND = "Should I worry about it?"


@pytest.fixture(scope="module")
def adapter_chat(tiny_adapter):
    return ChatModel.load(lora_weights=str(tiny_adapter))


def spawn_chat(tiny_adapter, *flags):
    child = pexpect.spawn(sys.executable, ["chat.py", "--lora_weights", str(tiny_adapter), *flags], cwd=str(ROOT),
                          env=dict(os.environ), encoding="utf-8", timeout=120, dimensions=(40, 500),
                          preexec_fn=sigint_as_a_terminal_sends_it)
    child.expect("Not medical advice")
    child.expect("You: ")
    return child


def ask(child, question) -> str:
    """Send a question; return the streamed answer as printed."""
    child.sendline(question)
    child.expect("Assistant: ")
    child.expect("\r\nYou: ")
    return child.before.replace("\r\n", "\n")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.slow
def test_two_turns_reset_and_exit(tiny_adapter, adapter_chat):
    child = spawn_chat(tiny_adapter, *GREEDY_FLAGS)
    first = ask(child, FIRST)
    assert first and first == adapter_chat.answer([user(FIRST)], settings=GREEDY)
    second = ask(child, SECOND)  # answered with the first exchange in the prompt
    assert second == adapter_chat.answer([user(FIRST), assistant(first), user(SECOND)], settings=GREEDY)
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.expect("You: ")
    third = ask(child, SECOND)
    assert third == adapter_chat.answer([user(SECOND)], settings=GREEDY)  # the history is gone
    child.sendline("/system Answer like a careful nurse.")
    child.expect("system prompt: 'Answer like a careful nurse.'")
    child.expect("You: ")
    fourth = ask(child, FIRST)
    assert fourth == adapter_chat.answer([user(SECOND), assistant(third), user(FIRST)],
                                         "Answer like a careful nurse.", GREEDY)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_keeps_the_session(tiny_adapter):
    # a long greedy answer (the tiny adapter does not stop early), interrupted after its first words
    child = spawn_chat(tiny_adapter, "--temperature", "0", "--repetition_penalty", "3", "--max_new_tokens", "1900")
    child.sendline(FIRST)
    child.expect("Assistant: ")
    child.expect(r"\S")
    child.sendintr()
    child.expect(r" \[stopped\]\r\n")
    child.expect("You: ")  # the session goes on
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.expect("You: ")
    child.sendintr()  # Ctrl-C at the prompt quits
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_d_quits(tiny_adapter):
    child = spawn_chat(tiny_adapter, *GREEDY_FLAGS)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_one_shot_prompt_prints_the_answer(tiny_adapter, adapter_chat):
    result = run_script("chat.py", "--lora_weights", tiny_adapter, "--prompt", FIRST, *GREEDY_FLAGS)
    assert result.stdout == adapter_chat.answer([user(FIRST)], settings=GREEDY) + "\n"
    assert "Not medical advice" in result.stderr  # stdout carries the answer only

    missing = run_script("chat.py", "--lora_weights", "./no-such-adapter", "--prompt", FIRST, check=False)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == \
        "error: --lora_weights ./no-such-adapter: no such folder"


@pytest.mark.slow
def test_one_shot_answer_from_a_4bit_base(tiny_adapter):
    """QLoRA-style inference: the base in 4-bit NF4 through bitsandbytes' CPU kernels, plus the adapter."""
    result = run_script("chat.py", "--lora_weights", tiny_adapter, "--load_4bit", "--max_new_tokens", 8,
                        "--prompt", "I have a headache.")
    assert result.stdout.strip()
    assert "not medical advice" in result.stderr.lower()
