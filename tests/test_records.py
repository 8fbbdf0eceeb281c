"""Reading and validating training data: formats, field maps, and a clear error for every kind of bad record."""

import json

import pytest

from medlora.errors import MedLoRAError
from medlora.records import load_conversations
from medlora.templates import PromptTemplate
from medlora.tokenization import ConversationEncoder
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
