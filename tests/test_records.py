"""Reading and validating training data: formats, field maps, and a clear error for every kind of bad record."""

import json

import pytest

from medlora.data.records import load_conversations
from medlora.data.templates import PromptTemplate
from medlora.data.tokenization import ConversationEncoder
from medlora.errors import MedLoRAError
from tests.conftest import SAMPLE_SFT, shared_dataset


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, records):
    return write(path, "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")


def test_formats_are_detected_per_file_and_normalised(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"instruction": "Q1", "input": "ctx", "output": "A1"}])
    jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                                     {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q2"},
                                                     {"from": "gpt", "value": "A2"}]}])
    jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    loaded = load_conversations(tmp_path)
    assert [fmt for fmt, _ in loaded.formats.values()] == ["alpaca", "sharegpt", "messages"]
    alpaca, sharegpt, messages = loaded.conversations
    assert alpaca.messages == [{"role": "user", "content": "Q1", "input": "ctx"}, {"role": "assistant", "content": "A1"}]
    assert sharegpt.system == "S" and [m["content"] for m in sharegpt.messages] == ["Q", "A", "Q2", "A2"]
    assert messages.system is None and messages.source.endswith("c.jsonl: record 1")


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    path = jsonl(tmp_path / "h.jsonl", [{"instruction": "Q2", "output": "A2", "history": [["Q1", "A1"]]}])
    (conversation,) = load_conversations(path).conversations
    assert [m["content"] for m in conversation.messages] == ["Q1", "A1", "Q2", "A2"]


def test_field_map_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write(tmp_path / "qa.csv", "question,answer\nWhat is a fever?,A raised body temperature.\n")
    pq.write_table(pa.table({"question": ["Q"], "answer": ["A"]}), tmp_path / "qa.parquet")
    field_map = '{"instruction": "question", "output": "answer"}'
    for name in ("qa.csv", "qa.parquet"):
        (conversation,) = load_conversations(tmp_path / name, field_map).conversations
        assert conversation.messages[1]["role"] == "assistant" and conversation.messages[0]["content"]


BAD_RECORDS = [
    ("bad.jsonl", '{"instruction": "Q", "output": "A"}\n{"instruction": "Q", "output": \n',
     r"bad.jsonl: record 2: invalid JSON"),
    ("bad.jsonl", '{"instruction": "Q", "output": "A"}\n{"instruction": "Q"}\n',
     r"bad.jsonl: record 2: field 'output': missing"),
    ("bad.jsonl", '{"instruction": "Q", "output": 5}\n', r"record 1: field 'output': expected a string, got int"),
    ("bad.jsonl", '{"instruction": "Q", "output": "  "}\n', r"record 1: field 'output': empty"),
    ("bad.jsonl", "", r"bad.jsonl: no records \(empty file\)"),
    ("bad.json", "[]", r"bad.json: no records"),
    ("bad.json", '[{"instruction": "Q", "output": "A"},', r"bad.json: invalid JSON at line 1"),
    ("bad.jsonl", '{"question": "Q", "answer": "A"}\n', r"record 1: unknown format: fields \['answer', 'question'\]"),
    ("bad.jsonl", '{"instruction": "Q", "output": "A"}\n["Q", "A"]\n', r"record 2: expected a JSON object, got list"),
    ("bad.jsonl", '{"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}]}\n',
     r"record 1: field 'conversations\[1\].from': expected a assistant turn"),
    ("bad.jsonl", '{"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]}\n',
     r"record 1: field 'conversations\[1\].from': unknown role 'robot'"),
    ("bad.jsonl", '{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]}\n',
     r"record 1: field 'conversations\[1\].value': empty"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "Q"}]}\n',
     r"record 1: field 'messages': the last turn must be the assistant's reply"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": ["part"]}, {"role": "assistant", "content": "A"}]}\n',
     r"field 'messages\[0\].content': expected a string, got list"),
]


@pytest.mark.parametrize("name, text, message", BAD_RECORDS)
def test_bad_records_fail_with_file_record_and_field(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(MedLoRAError, match=message) as error:
        load_conversations(path)
    assert "\n" not in str(error.value)


def test_missing_paths_and_bad_field_maps(tmp_path):
    with pytest.raises(MedLoRAError, match="no such file"):
        load_conversations(tmp_path / "missing.json")
    path = jsonl(tmp_path / "a.jsonl", [{"q": "Q", "a": "A"}])
    with pytest.raises(MedLoRAError, match="field 'answer' \\(mapped to 'output' by --field_map\\): missing"):
        load_conversations(path, '{"instruction": "q", "output": "answer"}')
    with pytest.raises(MedLoRAError, match="--field_map: not a JSON object"):
        load_conversations(path, "{instruction: q}")


def test_bundled_sample_data_loads(tiny_tokenizer):
    loaded = load_conversations(SAMPLE_SFT)
    formats = {source.rsplit("/", 1)[-1]: fmt for source, (fmt, _) in loaded.formats.items()}
    assert formats == {"medical_chat_en.json": "alpaca", "medical_chat_zh.jsonl": "messages",
                       "medical_multiturn.jsonl": "sharegpt"}
    assert len(loaded.conversations) >= 410


@pytest.mark.parametrize("relative, count, fmt", [
    ("chatdoctor/genmedgpt_5k.json", 5452, "alpaca"),
    ("huatuo/llama_data.jsonl", 8658, "alpaca"),
    ("medicalgpt/medical_sft_1k.jsonl", 1000, "sharegpt"),
])
def test_real_seed_project_files_load_and_tokenize(relative, count, fmt, tiny_tokenizer):
    path = shared_dataset(relative)
    loaded = load_conversations(path)
    assert list(loaded.formats.values()) == [(fmt, count)]
    encoder = ConversationEncoder(tiny_tokenizer, PromptTemplate.load("alpaca"), cutoff_len=1024)
    report = encoder.encode(loaded.conversations[:300])
    assert len(report.examples) + sum(report.dropped.values()) == 300
    assert all(any(label != -100 for label in e.labels) for e in report.examples)


# ---- dialogues packed into one field ------------------------------------------------------------------------
PACKED = [
    {"instruction": "Human: I have a cough.\nAssistant: How long has it lasted?\nHuman: Two weeks, with fever.",
     "output": "See a doctor: a cough with fever for two weeks needs an examination."},
    {"instruction": "If you are a doctor, answer the patient.", "input": "<user>: My knee hurts. <bot>: Since when? "
     "<user>: Since a fall yesterday. <bot>:", "output": "Rest it, use ice, and get an X-ray if you cannot bear weight."},
    {"instruction": "患者：我头痛三天了。\n医生：有发烧吗？\n患者：没有。", "output": "多休息，多喝水；如果加重请就医。"},
    {"instruction": "What helps a sore throat? Answer as a doctor would.", "output": "Fluids, rest and lozenges."},
]


def test_packed_dialogues_are_counted_and_left_alone_unless_asked(tmp_path):
    from medlora.data.records import load_conversations

    path = tmp_path / "packed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PACKED), encoding="utf-8")
    loaded = load_conversations(path)
    assert dict(loaded.packed_dialogues) == {("Human", "Assistant"): 1, ("<user>", "<bot>"): 1, ("患者", "医生"): 1}
    assert [len(c.messages) for c in loaded.conversations] == [2, 2, 2, 2]
    assert loaded.describe_packed_dialogues() == (
        "packed dialogues: 3 records hold a whole dialogue in one field (1 with 'Human:'/'Assistant:', 1 with "
        "'<user>:'/'<bot>:', 1 with '患者:'/'医生:'): trained as one long instruction with the markers as text; "
        "--split_dialogues makes them real turns")


def test_split_dialogues_makes_real_turns_and_trains_every_reply(tmp_path, tiny_tokenizer):
    from medlora.data.records import load_conversations
    from medlora.data.templates import PromptTemplate
    from medlora.data.tokenization import IGNORE_INDEX, ConversationEncoder

    path = tmp_path / "packed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PACKED), encoding="utf-8")
    loaded = load_conversations(path, split_dialogues=True)
    human, bot, chinese, plain = loaded.conversations
    assert human.messages == [
        {"role": "user", "content": "I have a cough."}, {"role": "assistant", "content": "How long has it lasted?"},
        {"role": "user", "content": "Two weeks, with fever."}, {"role": "assistant", "content": PACKED[0]["output"]}]
    assert bot.messages == [
        {"role": "user", "content": "If you are a doctor, answer the patient.\nMy knee hurts."},
        {"role": "assistant", "content": "Since when?"}, {"role": "user", "content": "Since a fall yesterday."},
        {"role": "assistant", "content": PACKED[1]["output"]}]
    assert [m["role"] for m in chinese.messages] == ["user", "assistant", "user", "assistant"]
    assert chinese.messages[1]["content"] == "有发烧吗？"
    assert len(plain.messages) == 2
    assert "split into turns" in loaded.describe_packed_dialogues()
    # Both replies of the split record are trained: their token runs are labelled, the user turns are not.
    example = ConversationEncoder(tiny_tokenizer, PromptTemplate.load("alpaca")).encode([human]).examples[0]
    trained_text = tiny_tokenizer.decode([t for t, label in zip(example.input_ids, example.labels)
                                          if label != IGNORE_INDEX])
    assert "How long has it lasted?" in trained_text and "needs an examination" in trained_text
    assert "I have a cough" not in trained_text and "Two weeks" not in trained_text


def test_a_packed_dialogue_that_cannot_be_split_is_named(tmp_path):
    from medlora.data.records import load_conversations
    from medlora.errors import MedLoRAError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "Human: Hi\nAssistant: Hello, what is wrong?", "output": "x"}) + "\n")
    with pytest.raises(MedLoRAError, match=r"bad.jsonl: record 1: field 'instruction': the packed dialogue ends "
                                           r"with an 'Assistant:' turn"):
        load_conversations(path, split_dialogues=True)
