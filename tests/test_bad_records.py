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


# ---- rl.py's prompt files and evaluate.py's question files: the same refusal, the same --skip_bad_records ----
PROMPT_BAD = {
    2: {"messages": [{"role": "user", "content": "  "}]},  # an empty turn
    5: {"messages": [{"role": "assistant", "content": "Hello."}]},  # no user turn first
    6: ["not", "an", "object"],
}
GOOD_PROMPT = {"messages": [{"role": "user", "content": "I have had a cough for two weeks. Should I see a doctor?"}]}
QUESTION = {"question": "Which vitamin is made in the skin?", "options": {"A": "C", "B": "D"}, "answer_idx": "B"}
QUESTION_BAD = {
    2: {"question": "Which vitamin?", "options": {}, "answer_idx": "A"},  # no options
    4: {"question": "Which vitamin?", "options": {"A": "C", "B": "D"}, "answer_idx": "E"},
    5: {"question": "", "options": {"A": "C", "B": "D"}, "answer_idx": "A"},
}


def write_records(path, good, bad_at: dict, total: int):
    path.write_text("".join(json.dumps(bad_at.get(number, good)) + "\n" for number in range(1, total + 1)))
    return path


def prompt_problems(path) -> list:
    return [
        f"{path}: record 2: field 'messages[0].content': empty",
        f"{path}: record 5: field 'messages[0].role': expected a user turn (turns must alternate, user first)",
        f"{path}: record 6: expected a JSON object, got list",
    ]


def question_problems(path) -> list:
    return [
        f"{path}: record 2: field 'options': expected 2 to 26 options, got 0",
        f"{path}: record 4: field 'answer_idx': 'E' is not an option; expected a letter A-B or a 0-based index 0-1",
        f"{path}: record 5: field 'question': empty",
    ]


def test_every_bad_prompt_record_is_listed_in_one_error(tmp_path):
    from medlora.training.rewards import load_prompts

    path = write_records(tmp_path / "prompts.jsonl", GOOD_PROMPT, PROMPT_BAD, total=8)
    with pytest.raises(MedLoRAError) as raised:
        load_prompts(path)
    lines = str(raised.value).splitlines()
    assert lines[0] == (f"{path}: 3 bad records (nothing was written; --skip_bad_records drops them and trains on "
                        "the rest):")
    assert lines[1:] == [f"  {problem}" for problem in prompt_problems(path)]


def test_skip_bad_prompt_records_keeps_the_rest_and_says_which_were_dropped(tmp_path, capsys):
    from medlora.training.rewards import load_prompts

    path = write_records(tmp_path / "prompts.jsonl", GOOD_PROMPT, PROMPT_BAD, total=8)
    assert len(load_prompts(path, skip_bad_records=True)) == 5
    assert capsys.readouterr().out.splitlines() == [
        f"{path}: 3 bad prompt records dropped (--skip_bad_records); 1 dropped: field 'messages[0].content': empty; "
        "1 dropped: field 'messages[0].role': expected a user turn (turns must alternate, user first); "
        "1 dropped: expected a JSON object, got list",
        *[f"  skipped: {problem}" for problem in prompt_problems(path)]]


def test_every_bad_preference_prompt_is_listed_and_skipped_alike(tmp_path, capsys):
    from medlora.training.rewards import load_prompts

    good = {"prompt": "What helps a sore throat?", "chosen": "Rest and fluids.", "rejected": "Antibiotics."}
    path = write_records(tmp_path / "pairs.jsonl", good, {3: {**good, "prompt": ""}, 4: {**good, "rejected": None}}, 6)
    with pytest.raises(MedLoRAError) as raised:
        load_prompts(path)
    assert str(raised.value).splitlines()[1:] == [f"  {path}: record 3: field 'prompt': empty",
                                                  f"  {path}: record 4: field 'rejected': missing"]
    assert len(load_prompts(tmp_path, skip_bad_records=True)) == 4  # a folder: file by file
    assert capsys.readouterr().out.splitlines()[1:] == [f"  skipped: {path}: record 3: field 'prompt': empty",
                                                        f"  skipped: {path}: record 4: field 'rejected': missing"]


def test_every_bad_question_is_listed_in_one_error(tmp_path):
    from medlora.data.questions import load_question_file

    path = write_records(tmp_path / "questions.jsonl", QUESTION, QUESTION_BAD, total=6)
    with pytest.raises(MedLoRAError) as raised:
        load_question_file(path)
    lines = str(raised.value).splitlines()
    assert lines[0] == (f"{path}: 3 bad records (nothing was written; --skip_bad_records drops them and scores "
                        "the rest):")
    assert lines[1:] == [f"  {problem}" for problem in question_problems(path)]


def test_skip_bad_questions_keeps_the_rest_and_says_which_were_dropped(tmp_path, capsys):
    from medlora.data.questions import load_question_file

    path = write_records(tmp_path / "questions.jsonl", QUESTION, QUESTION_BAD, total=6)
    loaded = load_question_file(path, skip_bad_records=True)
    assert [q.source for q in loaded.questions] == [f"{path}: record {n}" for n in (1, 3, 6)]
    assert loaded.skipped_records == question_problems(path)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: 3 bad questions dropped (--skip_bad_records); 1 dropped: field 'options': ")
    assert out[1:] == [f"  skipped: {problem}" for problem in question_problems(path)]
    every = write_records(tmp_path / "all_bad.jsonl", QUESTION, {1: QUESTION_BAD[2], 2: QUESTION_BAD[5]}, total=2)
    with pytest.raises(MedLoRAError, match="every record is bad; the first: .*record 1: field 'options'"):
        load_question_file(every, skip_bad_records=True)


def test_questions_without_options_or_with_repeated_options_are_bad_records(tmp_path):
    """A record with no options (a traceback, KeyError 'choices', before issue 28) and options that repeat the same
    text (scored silently before: both get the same score but the letter) are refused like any bad record."""
    from medlora.data.questions import load_question_file

    path = write_records(tmp_path / "questions.jsonl", QUESTION, {
        2: {"question": "Which vitamin?", "answer_idx": "A"},
        3: {"question": "Which drug?", "choices": ["Aspirin", "Ibuprofen", "  ASPIRIN "], "answer": 0},
    }, total=3)
    with pytest.raises(MedLoRAError) as raised:
        load_question_file(path)
    assert str(raised.value).splitlines()[1:] == [
        f"  {path}: record 2: field 'options': missing (give the options as 'options' or 'choices')",
        f"  {path}: record 3: field 'choices': options A and C are the same text ('ASPIRIN'); a question needs "
        "distinct options"]
    medmcqa = write_records(tmp_path / "medmcqa.jsonl", {"question": "Q?", "opa": "a", "opb": "b", "opc": "c",
                                                         "opd": "d", "cop": 1}, {2: {"question": "Q?", "opa": "a",
                                                         "opb": "b", "opc": "b", "opd": "d", "cop": 1}}, total=2)
    assert [q.source for q in load_question_file(medmcqa, skip_bad_records=True).questions] == [
        f"{medmcqa}: record 1"]
    with pytest.raises(MedLoRAError, match=r"record 2: field 'opa-opd': options B and C are the same text \('b'\)"):
        load_question_file(medmcqa)


@pytest.mark.slow
def test_rl_refuses_a_prompt_file_with_bad_records_then_trains_on_the_rest_when_asked(tmp_path):
    data = write_records(tmp_path / "prompts.jsonl", GOOD_PROMPT, PROMPT_BAD, total=8)
    output_dir = tmp_path / "out"
    flags = ["--base_model", TINY, "--data_path", data, "--output_dir", output_dir, "--max_steps", 1,
             "--batch_size", 4, "--micro_batch_size", 4, "--num_generations", 2, "--max_completion_length", 4,
             "--eval_prompts", 0, "--save_steps", 1000]
    refused = run_script("rl.py", *flags, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert [line.strip() for line in refused.stderr.splitlines()[1:]] == prompt_problems(data)
    assert not output_dir.exists()
    trained = run_script("rl.py", *flags, "--skip_bad_records")
    skipped = [line.strip() for line in trained.stdout.splitlines() if line.startswith("  skipped: ")]
    assert skipped == [f"skipped: {problem}" for problem in prompt_problems(data)]
    assert f"{data}: 3 bad prompt records dropped (--skip_bad_records)" in trained.stdout
    assert f"prompts: 5 read from {data}, 5 used" in trained.stdout
    assert (output_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_evaluate_refuses_a_question_file_with_bad_records_then_scores_the_rest_when_asked(tmp_path):
    data = write_records(tmp_path / "questions.jsonl", QUESTION, QUESTION_BAD, total=6)
    report = tmp_path / "report.json"
    flags = ["--base_model", TINY, "--data_path", data, "--output_file", report]
    refused = run_script("evaluate.py", *flags, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert [line.strip() for line in refused.stderr.splitlines()[1:]] == question_problems(data)
    assert not report.exists()
    scored = run_script("evaluate.py", *flags, "--skip_bad_records")
    skipped = [line.strip() for line in scored.stdout.splitlines() if line.startswith("  skipped: ")]
    assert skipped == [f"skipped: {problem}" for problem in question_problems(data)]
    assert "questions.jsonl (medqa, 3 questions, loglik, 0-shot)" in scored.stdout
    assert len(json.loads(report.read_text())["results"]["model"]["tasks"][str(data)]["questions"]) == 3


def test_generate_batch_files_list_every_bad_record_without_offering_a_flag_generate_lacks(tmp_path):
    from medlora.inference.predictions import read_prediction_records

    path = write_records(tmp_path / "questions.jsonl", {"instruction": "What helps a cough?"},
                         {2: {"instruction": 7}, 3: {"output": "an answer"}}, total=4)
    with pytest.raises(MedLoRAError) as raised:
        read_prediction_records(path)
    assert str(raised.value).splitlines() == [
        f"{path}: 2 bad records (nothing was written):",
        f"  {path}: record 2: field 'instruction': expected a string, got int",
        f"  {path}: record 3: field 'instruction': missing"]
