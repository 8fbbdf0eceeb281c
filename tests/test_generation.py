"""The generation core (medlora/inference/generation.py) on the built-in tiny model, generate.py's batch mode,
and the web server's password check (a real Gradio server on 127.0.0.1)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

import pytest
import torch

from medlora.data.templates import Conversation, PromptTemplate
from medlora.data.tokenization import IGNORE_INDEX
from medlora.errors import MedLoRAError
from medlora.inference.generation import ChatModel, GenerationSettings, StopStrings
from medlora.inference.predictions import read_prediction_records
from tests.conftest import ROOT, TINY, run_script

QUESTION = [{"role": "user", "content": "I have a headache and a fever. What should I do?"}]
GREEDY = GenerationSettings(temperature=0, max_new_tokens=24)
# The tiny adapter's greedy answers repeat one token unless repetition is penalised hard.
VARIED_GREEDY = GenerationSettings(temperature=0, max_new_tokens=16, repetition_penalty=3.0)


@pytest.fixture(scope="module")
def base_inference(tiny_model_path):
    from medlora.models.loading import load_for_inference

    return load_for_inference(TINY)


@pytest.fixture(scope="module")
def base_chat(base_inference):
    return ChatModel(base_inference)


@pytest.fixture(scope="module")
def adapter_chat(tiny_adapter):
    return ChatModel.load(lora_weights=str(tiny_adapter))


def model_generate(chat, input_ids, **kwargs) -> str:
    """The answer straight from model.generate(), decoded the same way."""
    ids = torch.tensor([input_ids])
    with torch.inference_mode():
        output = chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     eos_token_id=chat.eos_token_ids, pad_token_id=chat.tokenizer.pad_token_id,
                                     **kwargs)
    return chat.tokenizer.decode(output[0, len(input_ids):], skip_special_tokens=True).strip()


# ---- settings -----------------------------------------------------------------------------------------------
def test_settings_map_to_generate_kwargs():
    assert GenerationSettings(temperature=0, top_p=0.8, top_k=20).generate_kwargs() == dict(
        max_new_tokens=256, repetition_penalty=1.1, num_beams=1, do_sample=False,
        temperature=None, top_p=None, top_k=None)
    assert GenerationSettings(temperature=0.8, top_p=0.7, top_k=20).generate_kwargs() == dict(
        max_new_tokens=256, repetition_penalty=1.1, num_beams=1, do_sample=True,
        temperature=0.8, top_p=0.7, top_k=20)
    assert GenerationSettings(temperature=0, num_beams=3, max_new_tokens=9).generate_kwargs() == dict(
        max_new_tokens=9, repetition_penalty=1.1, num_beams=3, do_sample=False,
        temperature=None, top_p=None, top_k=None, early_stopping=True)
    assert [GenerationSettings(temperature=t, num_beams=b).mode for t, b in [(0, 1), (0.5, 1), (0, 4), (0.5, 4)]] \
        == ["greedy", "sampling", "beam search", "beam sampling"]
    for bad, flag in [(dict(temperature=-1), "--temperature"), (dict(top_p=0), "--top_p"),
                      (dict(num_beams=0), "--num_beams"), (dict(max_new_tokens=0), "--max_new_tokens"),
                      (dict(top_k=2.5), "--top_k")]:
        with pytest.raises(MedLoRAError, match=flag):
            GenerationSettings(**bad).validate()


def test_sampling_is_really_applied(base_chat):
    sampled = GenerationSettings(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=24)
    answers = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        answers.append(base_chat.answer(QUESTION, settings=sampled))
    assert answers[0] == answers[1]  # same seed, same sample
    assert answers[0] != answers[2]  # another seed, another sample: do_sample is on
    assert answers[0] != base_chat.answer(QUESTION, settings=GREEDY)


def test_greedy_is_repeatable_and_equals_model_generate(base_chat):
    first = list(base_chat.stream(QUESTION, settings=GREEDY))
    assert first[-1] == base_chat.answer(QUESTION, settings=GREEDY)
    assert len(first) > 2 and all(first[-1].startswith(partial) for partial in first)  # streamed, growing
    prompt = base_chat.prompt_for(QUESTION, max_new_tokens=24)
    assert first[-1] == model_generate(base_chat, prompt.input_ids, do_sample=False, max_new_tokens=24,
                                       repetition_penalty=1.1)
    # the repetition penalty is applied for real: without it the answer differs
    assert first[-1] != base_chat.answer(QUESTION, settings=GenerationSettings(temperature=0, max_new_tokens=24,
                                                                               repetition_penalty=1.0))


def test_beam_search_equals_model_generate(base_chat):
    beams = GenerationSettings(temperature=0, num_beams=3, max_new_tokens=12)
    answers = list(base_chat.stream(QUESTION, settings=beams))
    assert len(answers) == 1  # not streamed: the final text at once
    prompt = base_chat.prompt_for(QUESTION, max_new_tokens=12)
    assert answers[0] == model_generate(base_chat, prompt.input_ids, do_sample=False, num_beams=3, max_new_tokens=12,
                                        repetition_penalty=1.1, early_stopping=True)


# ---- prompts ------------------------------------------------------------------------------------------------
def test_prompt_is_tokenized_exactly_like_training(base_chat):
    conversation = [{"role": "user", "content": "I cough at night."}, {"role": "assistant", "content": "Since when?"},
                    {"role": "user", "content": "Two weeks."}, {"role": "assistant", "content": "See a doctor."}]
    trained = base_chat.encoder.encode([Conversation(conversation)]).examples[0]
    prompt = base_chat.prompt_for(conversation[:3])
    assert trained.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    reply = [label for label in trained.labels[len(prompt.input_ids):] if label != IGNORE_INDEX]
    assert base_chat.tokenizer.decode(reply, skip_special_tokens=True).strip() == "See a doctor."
    assert prompt.text.endswith("### Instruction:\nTwo weeks.\n\n### Response:\n")


def test_chat_template_prompt_uses_the_tokenizers_own_template(base_inference):
    chat = ChatModel(base_inference, "chat")
    messages = [{"role": "user", "content": "I cough at night."}, {"role": "assistant", "content": "Since when?"},
                {"role": "user", "content": "Two weeks."}]
    prompt = chat.prompt_for(messages, system="Be brief.")
    expected = chat.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages],
                                                  tokenize=False, add_generation_prompt=True)
    assert prompt.text == expected and prompt.text.endswith("<|im_start|>assistant\n")
    assert chat.answer(messages, "Be brief.", GREEDY) == chat.answer(messages, "Be brief.", GREEDY)


@pytest.mark.slow
def test_merged_export_brings_its_template(tiny_model_path, tmp_path):
    merged = tmp_path / "hf_ckpt"
    shutil.copytree(tiny_model_path, merged)
    (merged / "medlora_export.json").write_text(json.dumps({"prompt_template_name": "chatdoctor"}))
    assert ChatModel.load(base_model=str(merged)).template.name == "chatdoctor"
    assert ChatModel.load(base_model=str(merged), prompt_template_name="vicuna").template.name == "vicuna"
    assert ChatModel.load(base_model=str(tiny_model_path)).template.name == "alpaca"  # the fallback


@pytest.mark.slow
def test_8bit_model_answers(tiny_adapter):
    chat = ChatModel.load(lora_weights=str(tiny_adapter), load_in_8bit=True)
    assert any(type(module).__name__ == "Linear8bitLt" for module in chat.model.modules())
    assert chat.answer(QUESTION, settings=VARIED_GREEDY)


def test_history_is_trimmed_to_the_context(base_inference):
    chat = ChatModel(base_inference, max_context=160)
    messages = []
    for turn in range(6):
        messages += [{"role": "user", "content": f"Question {turn}: my knee has hurt for a week after running."},
                     {"role": "assistant", "content": f"Answer {turn}: rest it, use ice, see a doctor if it swells."}]
    messages.append({"role": "user", "content": "Newest: can I run again tomorrow?"})
    prompt = chat.prompt_for(messages, max_new_tokens=32)
    assert len(prompt.input_ids) + 32 <= 160
    assert prompt.dropped_exchanges > 0
    kept = messages[2 * prompt.dropped_exchanges:]
    assert prompt.input_ids == chat.encoder.encode_prompt(Conversation(kept))
    assert "Question 0" not in prompt.text and "Newest: can I run again tomorrow?" in prompt.text
    # exactly the oldest exchanges are dropped: keeping one more would not fit
    one_more = messages[2 * (prompt.dropped_exchanges - 1):]
    assert len(chat.encoder.encode_prompt(Conversation(one_more))) + 32 > 160
    assert chat.answer(messages, settings=GenerationSettings(temperature=0, max_new_tokens=32))

    too_long = [{"role": "user", "content": "pain " * 300}]
    with pytest.raises(MedLoRAError, match=r"too long: its prompt is \d+ tokens.*context of 160 tokens"):
        chat.prompt_for(too_long, max_new_tokens=32)


# ---- stopping -----------------------------------------------------------------------------------------------
def test_stop_strings_hold_back_and_cut():
    stops = StopStrings(["### Instruction:", "\nPatient:"])
    assert stops.cut("Rest well. ### Instr") == ("Rest well. ", False)  # maybe the start of a stop string
    assert stops.cut("Rest well.\nPat") == ("Rest well.", False)
    assert stops.cut("Rest well. ### Instruction: more") == ("Rest well. ", True)
    assert stops.cut("Drink water.\nPatient: thanks ### Instruction:") == ("Drink water.", True)
    assert stops.cut("No stop here") == ("No stop here", False)


def test_template_stop_string_is_trimmed_from_the_answer(base_chat, base_inference, tmp_path):
    settings = GenerationSettings(temperature=0, max_new_tokens=40)
    full = base_chat.answer(QUESTION, settings=settings)
    words = list(re.finditer(r"\S+", full))
    assert len(words) > 6, full
    stop = full[words[3].start(): words[4].end()]  # text the model is known to generate, after a few words
    spec = dict(PromptTemplate.load("alpaca").spec, stop=[stop])
    (tmp_path / "alpaca_stop.json").write_text(json.dumps(spec), encoding="utf-8")
    stopping = ChatModel(base_inference, prompt_template=str(tmp_path / "alpaca_stop.json"))

    streamed = list(stopping.stream(QUESTION, settings=settings))
    assert streamed[-1] == full[: full.index(stop)].strip()
    assert all(stop not in partial and streamed[-1].startswith(partial) for partial in streamed)


def test_single_token_stop_strings_end_generation(base_inference):
    chatml = ChatModel(base_inference, prompt_template="chatml")
    stop_ids = chatml.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    assert chatml.tokenizer.unk_token_id not in stop_ids
    assert chatml.eos_token_ids == sorted({chatml.tokenizer.eos_token_id, *stop_ids})
    assert ChatModel(base_inference, prompt_template="alpaca").eos_token_ids == [chatml.tokenizer.eos_token_id]


def test_cancel_event_and_closing_the_stream_stop_generation(base_chat):
    long_answer = GenerationSettings(temperature=0, max_new_tokens=300, repetition_penalty=1.3)
    full = base_chat.answer(QUESTION, settings=long_answer)
    cancel = threading.Event()
    partials = []
    for partial in base_chat.stream(QUESTION, settings=long_answer, cancel=cancel):
        partials.append(partial)
        cancel.set()  # the Stop button, after the first words
    assert full.startswith(partials[-1]) and len(partials[-1]) < len(full) // 2

    stream = base_chat.stream(QUESTION, settings=long_answer)
    next(stream)
    stream.close()  # what Gradio does to a cancelled event
    assert not any(t.name == "medlora-generate" and t.is_alive() for t in threading.enumerate())


# ---- batch mode ---------------------------------------------------------------------------------------------
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_prediction_records_in_every_format(tmp_path):
    alpaca = read_prediction_records(write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "What is a fever?", "output": "A raised temperature."},
        {"instruction": "Describe the rash.", "input": "Red spots on both arms."},
    ]))
    assert [(r.number, r.messages, r.reference) for r in alpaca] == [
        (1, [{"role": "user", "content": "What is a fever?"}], "A raised temperature."),
        (2, [{"role": "user", "content": "Describe the rash.", "input": "Red spots on both arms."}], None)]
    messages = read_prediction_records(write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "My ear hurts."}]},
        {"messages": [{"role": "user", "content": "Is 38.5 C a fever?"}, {"role": "assistant", "content": "Yes."}]},
    ]))
    assert [(len(r.messages), r.messages[-1]["content"], r.system, r.reference) for r in messages] == [
        (3, "My ear hurts.", "Be brief.", None), (1, "Is 38.5 C a fever?", None, "Yes.")]
    sharegpt = read_prediction_records(write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "Why do I sneeze?"}]}]))
    assert sharegpt[0].messages == [{"role": "user", "content": "Why do I sneeze?"}]


def test_prediction_records_errors_name_record_and_field(tmp_path):
    bad_turn = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Ear pain"}]}])
    with pytest.raises(MedLoRAError, match=r"bad.jsonl: record 2: field 'messages\[0\].role': expected a user turn"):
        read_prediction_records(bad_turn)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "", "input": ""}])
    with pytest.raises(MedLoRAError, match=r"empty.jsonl: record 1: field 'instruction': empty"):
        read_prediction_records(empty)
    with pytest.raises(MedLoRAError, match="no such file"):
        read_prediction_records(tmp_path / "missing.jsonl")


@pytest.mark.slow
def test_batch_mode_writes_one_line_per_record(tiny_adapter, adapter_chat, tmp_path):
    data = write_jsonl(tmp_path / "questions.jsonl", [
        {"instruction": "What is a fever?", "output": "A raised temperature."},
        {"instruction": "Describe the rash.", "input": "Red spots on both arms."},
        {"instruction": "How long will a cold last?", "history": [["I sneeze a lot.", "You may have a cold."]]},
    ])
    predictions = tmp_path / "out" / "predictions.jsonl"
    result = run_script("generate.py", "--lora_weights", tiny_adapter, "--data_file", data,
                        "--predictions_file", predictions, "--max_new_tokens", 16, "--repetition_penalty", 3.0)
    assert "wrote 3 predictions" in result.stderr and "greedy" in result.stderr
    lines = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    records = read_prediction_records(data)
    assert [line["record"] for line in lines] == [1, 2, 3]
    for line, record in zip(lines, records, strict=True):
        prompt = adapter_chat.prompt_for(record.messages, record.system, 16)
        assert line["prompt"] == prompt.text
        assert line["prediction"] == adapter_chat.answer(record.messages, record.system, VARIED_GREEDY)
        assert line.get("reference") == record.reference
    assert "Input:\nRed spots on both arms." in lines[1]["prompt"] and "I sneeze a lot." in lines[2]["prompt"]
    assert sorted(p.name for p in predictions.parent.iterdir()) == ["predictions.jsonl"]  # no temporary file left


@pytest.mark.slow
def test_batch_mode_bad_input_writes_nothing(tmp_path):
    data = write_jsonl(tmp_path / "questions.jsonl", [{"instruction": "What is a fever?"}, {"instruction": 3}])
    predictions = tmp_path / "predictions.jsonl"
    result = run_script("generate.py", "--base_model", TINY, "--data_file", data,
                        "--predictions_file", predictions, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {data}: record 2: field 'instruction': expected a string, got int"
    assert not predictions.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["questions.jsonl"]
    result = run_script("generate.py", "--base_model", TINY, "--data_file", data, check=False)
    assert result.returncode == 2 and "needs both --data_file and --predictions_file" in result.stderr


# ---- the web server's password check ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(url, data=None):
    """(status, body) of a GET, or of a form POST when data is given."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


@contextmanager
def running_server(*args, startup_timeout=180):
    """generate.py serving on a free port of 127.0.0.1; yields its URL, stops it at the end."""
    port = free_port()
    log = open(os.devnull, "w")
    server = subprocess.Popen([sys.executable, "generate.py", "--server_port", str(port), *map(str, args)],
                              cwd=ROOT, stdout=log, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if server.poll() is not None:
                raise AssertionError(f"generate.py exited ({server.returncode}):\n{server.stderr.read()[-3000:]}")
            try:
                http(url + "/")
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                if time.monotonic() > deadline:
                    raise AssertionError(f"generate.py did not answer on {url} within {startup_timeout}s") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stderr.close()
        log.close()


@pytest.mark.slow
def test_auth_refuses_a_wrong_password(tiny_adapter, tmp_path):
    from medlora.inference.web_ui import parse_auth

    users = tmp_path / "users.txt"
    users.write_text("# who may use the demo\ndoctor:s3cret\nnurse:pa:ss\n", encoding="utf-8")
    assert parse_auth(str(users)) == [("doctor", "s3cret"), ("nurse", "pa:ss")]
    assert parse_auth("doctor:s3cret") == [("doctor", "s3cret")]
    with pytest.raises(MedLoRAError, match="expected user:password"):
        parse_auth("doctor")

    with running_server("--lora_weights", tiny_adapter, "--auth", users) as url:
        assert http(url + "/config")[0] == 401  # nothing without logging in
        status, body = http(url + "/login", {"username": "doctor", "password": "wrong"})
        assert status == 400 and "Incorrect credentials" in body
        assert http(url + "/login", {"username": "doctor", "password": "s3cret"}) == (200, '{"success":true}')
        assert http(url + "/login", {"username": "nurse", "password": "pa:ss"})[0] == 200
