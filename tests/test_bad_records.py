"""Every bad record of a file is reported in one run; --skip_bad_records drops them, counted by reason."""

import json

import pytest

from medlora.data.records import MAX_PROBLEMS_SHOWN, load_conversations
from medlora.errors import MedLoRAError
from tests.conftest import TINY, run_script


def conversation(*turns):
    return {"conversations": [{"from": role, "value": text} for role, text in turns]}


GOOD = conversation(("human", "I have a cough."), ("gpt", "How long have you had it?"),
                    ("human", "Two weeks."), ("gpt", "Please see a doctor for a chest examination."))


def write_multiturn(path, bad_at: dict, total=24):
    records = [bad_at.get(number, GOOD) for number in range(1, total + 1)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


BAD = {
    3: conversation(("human", "Hello"), ("gpt", "")),  # an empty turn
    7: conversation(("human", "Is this serious?"), ("gpt", "No."), ("human", "Are you sure?")),  # ends on the user
    11: "not an object",
}


def test_every_bad_record_is_listed_in_one_error(tmp_path):
    path = write_multiturn(tmp_path / "chats.jsonl", BAD)
    with pytest.raises(MedLoRAError) as raised:
        load_conversations(path)
    lines = str(raised.value).splitlines()
    assert lines[0].startswith(f"{path}: 3 bad records (nothing was written; --skip_bad_records drops them")
    assert lines[1:] == [
        f"  {path}: record 3: field 'conversations[1].value': empty",
        f"  {path}: record 7: field 'conversations': the last turn must be the assistant's reply",
        f"  {path}: record 11: expected a JSON object, got str",
    ]


def test_a_single_bad_record_is_one_line(tmp_path):
    path = write_multiturn(tmp_path / "chats.jsonl", {5: BAD[7]})
    with pytest.raises(MedLoRAError) as raised:
        load_conversations(path)
    assert str(raised.value) == f"{path}: record 5: field 'conversations': the last turn must be the assistant's reply"


def test_only_the_first_problems_are_shown_with_the_count_of_the_rest(tmp_path):
    path = write_multiturn(tmp_path / "chats.jsonl", {n: BAD[3] for n in range(1, 31)}, total=32)
    with pytest.raises(MedLoRAError) as raised:
        load_conversations(path)
    lines = str(raised.value).splitlines()
    assert "30 bad records" in lines[0] and len(lines) == 1 + MAX_PROBLEMS_SHOWN + 1
    assert lines[-1] == f"  ... and {30 - MAX_PROBLEMS_SHOWN} more"


def test_skip_bad_records_keeps_the_rest_and_counts_each_reason(tmp_path):
    loaded = load_conversations(write_multiturn(tmp_path / "chats.jsonl", BAD), skip_bad_records=True)
    assert len(loaded.conversations) == 21
    assert loaded.skipped == {"field 'conversations[1].value': empty": 1, "expected a JSON object, got str": 1,
                              "field 'conversations': the last turn must be the assistant's reply": 1}
    assert [problem.split(": ")[1] for problem in loaded.skipped_records] == [
        f"record {number}" for number in sorted(BAD)]


@pytest.mark.slow
def test_finetune_refuses_a_file_with_bad_records_then_trains_on_the_rest_when_asked(tmp_path):
    data = write_multiturn(tmp_path / "chats.jsonl", BAD)
    output_dir = tmp_path / "out"
    flags = ["--base_model", TINY, "--data_path", data, "--output_dir", output_dir, "--max_steps", 1,
             "--batch_size", 4, "--micro_batch_size", 4, "--val_set_size", 0, "--cutoff_len", 64, "--save_steps", 1000]
    refused = run_script("finetune.py", *flags, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.count(f"{data}: record ") == 3 and not output_dir.exists()
    trained = run_script("finetune.py", *flags, "--skip_bad_records")
    assert "records: 24 read, 21 used (21 train, 0 validation), 3 dropped" in trained.stdout
    assert "1 dropped: field 'conversations[1].value': empty" in trained.stdout
    assert "1 dropped: expected a JSON object, got str" in trained.stdout
    # Exactly which records were dropped, each with its place and reason.
    skipped = [line.strip() for line in trained.stdout.splitlines() if line.startswith("  skipped: ")]
    assert skipped == [f"skipped: {problem}" for problem in load_bad_problems(data)]
    assert (output_dir / "adapter_model.safetensors").is_file()


def load_bad_problems(data) -> list:
    return load_conversations(data, skip_bad_records=True).skipped_records
