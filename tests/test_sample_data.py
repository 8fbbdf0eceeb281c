"""Checks for the sample training data in data/ and the script that generates it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
SCRIPT_PATH = REPO_ROOT / "scripts" / "make_sample_data.py"

GENERATED_FILES = [
    "sft/medical_chat_en.json",
    "sft/medical_multiturn.jsonl",
    "sft/medical_chat_zh.jsonl",
    "sample_questions.json",
]
CJK = re.compile(r"[\u4e00-\u9fff]")


def load_generator():
    # scripts/ is not a package, so load the module straight from its file. It must be
    # registered in sys.modules before running, because dataclasses look it up there.
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def regenerated_dir(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("regenerated")
    load_generator().main(output_dir=output_dir)
    return output_dir


@pytest.fixture(scope="module")
def english_records() -> list[dict]:
    return json.loads((DATA_DIR / "sft/medical_chat_en.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    return read_jsonl(DATA_DIR / "sft/medical_multiturn.jsonl")


@pytest.fixture(scope="module")
def chinese_records() -> list[dict]:
    return read_jsonl(DATA_DIR / "sft/medical_chat_zh.jsonl")


@pytest.mark.parametrize("file_name", GENERATED_FILES)
def test_committed_files_are_exactly_what_the_script_makes(regenerated_dir, file_name):
    committed = (DATA_DIR / file_name).read_bytes()
    regenerated = (regenerated_dir / file_name).read_bytes()
    assert regenerated == committed, f"{file_name} is stale: run python scripts/make_sample_data.py"


def test_record_counts(english_records, conversations, chinese_records):
    assert len(english_records) >= 300
    assert len(conversations) >= 50
    assert len(chinese_records) >= 50


def test_english_records_are_well_formed(english_records):
    for record in english_records:
        assert set(record) == {"instruction", "input", "output"}
        assert record["instruction"].strip()
        assert record["output"].strip()
        assert 40 <= len(record["output"].split()) <= 120


def test_some_english_records_have_the_question_in_the_instruction(english_records):
    empty_input = sum(record["input"] == "" for record in english_records)
    assert 0.15 <= empty_input / len(english_records) <= 0.25


def test_english_records_are_unique(english_records):
    keys = [(r["instruction"], r["input"], r["output"]) for r in english_records]
    assert len(set(keys)) == len(keys)


def test_multiturn_conversations_alternate_and_end_with_gpt(conversations):
    with_system = 0
    for conversation in conversations:
        turns = conversation["conversations"]
        roles = [turn["from"] for turn in turns]
        if roles[0] == "system":
            with_system += 1
            roles = roles[1:]
        assert 2 <= len(roles) // 2 <= 4, roles
        assert roles == ["human", "gpt"] * (len(roles) // 2), roles
        assert all(turn["value"].strip() for turn in turns)
    assert 0 < with_system < len(conversations)


def test_chinese_records_are_chat_messages_in_chinese(chinese_records):
    for record in chinese_records:
        messages = record["messages"]
        roles = [message["role"] for message in messages]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles and roles == ["user", "assistant"] * (len(roles) // 2), roles
        for message in messages:
            assert CJK.search(message["content"]), message


def test_sample_questions():
    questions = json.loads((DATA_DIR / "sample_questions.json").read_text(encoding="utf-8"))
    assert len(questions) == 8
    assert all(isinstance(question, str) and question.strip() for question in questions)


def test_disease_table_has_the_expected_fields():
    diseases = json.loads((DATA_DIR / "diseases.json").read_text(encoding="utf-8"))
    assert len(diseases) >= 35
    sizes = {
        "symptoms": (3, 6),
        "symptoms_zh": (3, 6),
        "advice": (2, 4),
        "advice_zh": (2, 4),
        "tests": (1, 3),
        "red_flags": (1, 3),
        "red_flags_zh": (1, 3),
    }
    for disease in diseases:
        assert disease["name"] and CJK.search(disease["name_zh"]) and disease["specialist"]
        for field, (low, high) in sizes.items():
            assert low <= len(disease[field]) <= high, (disease["name"], field)
        # The generator pairs English and Chinese entries by index.
        for field in ("symptoms", "advice", "red_flags"):
            assert len(disease[field]) == len(disease[f"{field}_zh"]), (disease["name"], field)
