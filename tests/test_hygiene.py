"""Data hygiene (medlora/data/hygiene.py, medlora/data/pii.py; docs/data_hygiene.md) on real records with planted
problems: every planted duplicate, copied evaluation question and personal identifier is found, named and counted,
and its flag removes it; the same code runs in finetune.py, pretrain.py, dpo.py and reward.py."""

import json
import re
from collections import Counter
from types import SimpleNamespace

import pytest

from medlora.data.hygiene import (
    DROPPED_CONTAMINATED,
    DROPPED_DUPLICATE,
    clean_conversations,
    clean_documents,
    clean_pairs,
)
from medlora.data.preference import load_preference_pairs
from medlora.data.questions import load_question_file
from medlora.data.records import load_conversations
from medlora.errors import MedLoRAError
from tests.conftest import ROOT, TINY, run_script, shared_dataset

EVAL = ROOT / "data" / "eval"
REAL_RECORDS = 300
CHECK_ONLY = SimpleNamespace(dedup=False, decontaminate=False, scrub_pii=False, contamination_check="data/eval")
ALL_ON = SimpleNamespace(dedup=True, decontaminate=True, scrub_pii=True, contamination_check="data/eval")
PII_RECORD = {"instruction": "Please help, my doctor said to write to you.",
              "input": "Mail me at jane.doe@example.org or call +1 617 555 0199; my insurance number is MRN00451236.",
              "output": "Please see https://www.example.org/advice and do not share 192.168.10.27 or card 4111 1111 "
                        "1111 1111 with anyone."}
PII_SCRUBBED = {"input": "Mail me at [EMAIL] or call [PHONE]; my insurance number is [ID].",
                "output": "Please see [URL] and do not share [IP_ADDRESS] or card [CREDIT_CARD] with anyone."}
PII_KINDS = Counter({"EMAIL": 1, "PHONE": 1, "ID": 1, "URL": 1, "IP_ADDRESS": 1, "CREDIT_CARD": 1})


def word_shingles(record: dict) -> set:
    """The near-duplicate definition written out again: lower-cased word 5-shingles over all fields."""
    words = re.findall(r"\w+", " ".join(record.values()).lower())
    return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}


def eval_questions(name: str, long: bool) -> list:
    questions = load_question_file(EVAL / name).questions
    return [q for q in questions if (len(re.findall(r"\w+", q.question)) >= 13) == long]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """GenMedGPT-5k's first records, then planted copies (the originals keep their record numbers) and what each
    check must find among the planted ones: {check: {planted record number: detail}}."""
    records = json.loads(shared_dataset("chatdoctor/genmedgpt_5k.json").read_text())[:REAL_RECORDS]
    extra, expected = [], {"exact": {}, "near": {}, "contaminated": {}}

    def plant(record, check=None, detail=None):
        extra.append(record)
        if check:
            expected[check][REAL_RECORDS + len(extra)] = detail

    original = records[4]
    plant({key: "  " + value.upper().replace(" ", "   ") for key, value in original.items()}, "exact", 5)
    plant(dict(records[9]), "exact", 10)
    near = dict(records[19], output=records[19]["output"].replace(" the ", " a ", 1) + " Take care.")
    plant(near, "near", (20, len(word_shingles(near) & word_shingles(records[19]))
                         / len(word_shingles(near) | word_shingles(records[19]))))
    words = records[29]["output"].split()
    plant(dict(records[29], output=" ".join(w if i % 3 else "changed" for i, w in enumerate(words))))  # too far
    long_question = eval_questions("medqa_style_sample.jsonl", long=True)[0]
    short_question = eval_questions("pubmedqa_style_sample.jsonl", long=False)[0]
    plant({**records[40], "input": f"I read this in a quiz: {long_question.question} Is it about me?"},
          "contaminated", long_question.source.rsplit("/", 1)[-1])
    plant({**records[41], "input": f"My friend asked me: {short_question.question} I wonder too."},
          "contaminated", short_question.source.rsplit("/", 1)[-1])
    twelve_words = " ".join(long_question.question.split()[:12])  # one word short of an n-gram: not contaminated
    plant({**records[42], "input": f"Someone wrote '{twelve_words}' on a forum."})
    plant(PII_RECORD)
    path = tmp_path_factory.mktemp("hygiene") / "planted.json"
    path.write_text(json.dumps(records + extra, ensure_ascii=False))
    real_only = path.with_name("real.json")
    real_only.write_text(json.dumps(records, ensure_ascii=False))
    return SimpleNamespace(path=path, real=real_only, expected=expected, total=len(records) + len(extra))


def numbers(places) -> dict:
    """{record number: the place it points to} of (place, other place, ...) tuples."""
    return {int(place.rsplit(" ", 1)[1]): other for place, other, *_ in places}


def test_every_planted_problem_is_found_and_named(planted):
    _, baseline = clean_conversations(load_conversations(planted.real).conversations, CHECK_ONLY)
    _, report = clean_conversations(load_conversations(planted.path).conversations, CHECK_ONLY)
    assert report.checked == planted.total and not report.dropped
    # What the real records hold themselves is found again, plus exactly what was planted.
    exact = {n: int(other.rsplit(" ", 1)[1]) for n, other in numbers(report.exact_duplicates).items()}
    assert exact == {**{n: int(o.rsplit(" ", 1)[1]) for n, o in numbers(baseline.exact_duplicates).items()},
                     **planted.expected["exact"]}
    near = {int(place.rsplit(" ", 1)[1]): (int(other.rsplit(" ", 1)[1]), jaccard)
            for place, other, jaccard in report.near_duplicates}
    baseline_near = {int(place.rsplit(" ", 1)[1]): (int(other.rsplit(" ", 1)[1]), jaccard)
                     for place, other, jaccard in baseline.near_duplicates}
    planted_near = {n: near.pop(n) for n in planted.expected["near"]}
    assert near == baseline_near
    for number, (original, jaccard) in planted.expected["near"].items():
        assert 0.8 <= jaccard < 1 and planted_near[number] == (original, pytest.approx(jaccard))
    file_and_record = lambda places: {n: q.rsplit("/", 1)[-1] for n, q in numbers(places).items()}  # noqa: E731
    assert file_and_record(report.contaminated) == {**file_and_record(baseline.contaminated),
                                                    **planted.expected["contaminated"]}
    assert report.identifiers == baseline.identifiers + PII_KINDS
    assert report.records_with_identifiers == baseline.records_with_identifiers + 1


def test_the_flags_remove_what_was_found(planted):
    conversations = load_conversations(planted.path).conversations
    _, found = clean_conversations(conversations, CHECK_ONLY)
    kept, report = clean_conversations(load_conversations(planted.path).conversations, ALL_ON)
    duplicates = {place for place, *_ in found.exact_duplicates + found.near_duplicates}
    contaminated = {place for place, _ in found.contaminated} - duplicates
    assert report.dropped == {DROPPED_DUPLICATE: len(duplicates), DROPPED_CONTAMINATED: len(contaminated)}
    assert {c.source for c in kept} == {c.source for c in conversations} - duplicates - contaminated
    scrubbed = next(c for c in kept if c.source.endswith(f"record {planted.total}"))
    assert scrubbed.messages[0]["input"] == PII_SCRUBBED["input"]
    assert scrubbed.messages[1]["content"] == PII_SCRUBBED["output"]
    assert report.identifiers == found.identifiers  # counted the same whether replaced or not
    assert "replaced by typed placeholders (--scrub_pii)" in "\n".join(report.lines())


def test_chinese_records_are_checked_character_by_character():
    """HuaTuo's records have no spaces: each Chinese character is a word, so a changed character leaves a near
    duplicate and a copied 13-character sequence of an evaluation question is contamination."""
    records = [json.loads(line) for line in
               shared_dataset("huatuo/llama_data.jsonl").read_text(encoding="utf-8").splitlines()[:200]]
    zh_question = load_question_file(EVAL / "triage_safety_zh.jsonl").questions[0]
    changed = dict(records[7], output=records[7]["output"][:-1] + "。")
    planted = records + [changed, {**records[8], "instruction": zh_question.question}]
    conversations = [SimpleNamespace(messages=[{"content": r["instruction"]}, {"content": r["output"]}],
                                     system=None, source=f"huatuo: record {n}") for n, r in enumerate(planted, 1)]
    _, baseline = clean_conversations(conversations[:200], CHECK_ONLY)
    _, report = clean_conversations(conversations, CHECK_ONLY)
    near = numbers(report.near_duplicates) | numbers(report.exact_duplicates)
    assert near == {**numbers(baseline.near_duplicates), **numbers(baseline.exact_duplicates),
                    201: "huatuo: record 8"}
    assert {n: q.rsplit("/", 1)[-1] for n, q in numbers(report.contaminated).items()} == {
        **{n: q.rsplit("/", 1)[-1] for n, q in numbers(baseline.contaminated).items()},
        202: zh_question.source.rsplit("/", 1)[-1]}


def test_pretraining_documents_and_preference_pairs_go_through_the_same_checks(tmp_path):
    lines = [line.strip() for line in shared_dataset("medicalgpt/pretrain_en_articles.txt").read_text().splitlines()
             if len(line.split()) > 8][:60]
    lines[5] += " Contact jane.doe@example.org."
    documents = lines + [lines[3].upper()]
    kept, report = clean_documents(list(documents), {"notes.txt": len(documents)}, ALL_ON)
    assert ("notes.txt: document 61", "notes.txt: document 4") in report.exact_duplicates
    assert report.identifiers["EMAIL"] >= 1 and kept[5].endswith("Contact [EMAIL].")

    pairs_file = tmp_path / "pairs.jsonl"
    pairs = [json.loads(line) for line in
             shared_dataset("medicalgpt/dpo_zh_500.jsonl").read_text(encoding="utf-8").splitlines()[:40]]
    pairs[3] = dict(pairs[3], chosen=pairs[3]["chosen"] + " 电话 13812345678")
    pairs.append(pairs[2])
    pairs_file.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs), encoding="utf-8")
    loaded = load_preference_pairs(pairs_file)
    kept, report = clean_pairs(loaded.pairs, ALL_ON)
    assert (f"{pairs_file}: record 41", f"{pairs_file}: record 3") in report.exact_duplicates
    assert report.identifiers["PHONE"] >= 1 and kept[3].chosen.endswith("电话 [PHONE]")
    assert len(kept) == len(pairs) - report.dropped[DROPPED_DUPLICATE]


def test_a_missing_contamination_file_is_one_line_naming_the_flag(tmp_path):
    with pytest.raises(MedLoRAError, match=r"^--contamination_check: .*nowhere.jsonl: no such file"):
        clean_conversations([], SimpleNamespace(**{**vars(CHECK_ONLY), "contamination_check": "nowhere.jsonl"}))
    result = run_script("finetune.py", "--base_model", TINY, "--output_dir", tmp_path / "out",
                        "--contamination_check", tmp_path / "missing", check=False)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].startswith("error: --contamination_check: ")


@pytest.mark.slow
@pytest.mark.parametrize("script, data", [
    ("finetune.py", "sft"), ("pretrain.py", "pretrain"), ("dpo.py", "pairs"), ("reward.py", "pairs")])
def test_each_stage_reports_and_applies_the_checks(tmp_path, planted, script, data):
    """The stage's data summary counts the planted problems and the records dropped, before any training."""
    if data == "sft":
        path = planted.path
    elif data == "pretrain":
        text = shared_dataset("medicalgpt/pretrain_en_articles.txt").read_text().splitlines()
        path = tmp_path / "notes.txt"
        path.write_text("\n".join(text + [text[0], "Write to jane.doe@example.org"]))
    else:
        lines = shared_dataset("medicalgpt/dpo_zh_500.jsonl").read_text(encoding="utf-8").splitlines()[:40]
        path = tmp_path / "pairs.jsonl"
        path.write_text("\n".join(lines + [lines[0]]), encoding="utf-8")
    result = run_script(script, "--base_model", TINY, "--data_path", path, "--output_dir", tmp_path / "out",
                        "--max_steps", 1, "--dedup", "--decontaminate", "--scrub_pii", "--val_set_size", 0,
                        "--save_steps", 1000)
    summary = result.stdout
    exact = int(re.search(r"exact duplicates \(after case and whitespace folding\): (\d+)", summary)[1])
    near = int(re.search(r"near duplicates \(Jaccard >= 0.8 over 5-word shingles\): (\d+)", summary)[1])
    assert exact >= 1 and f"{exact + near} dropped: {DROPPED_DUPLICATE}" in summary
    assert re.search(r"evaluation contamination \(13-word overlap with data/eval", summary)
    if data == "sft":
        assert f"dropped: {DROPPED_CONTAMINATED}" in summary and "1 EMAIL" in summary
    if data == "pretrain":
        assert "1 EMAIL" in summary
    assert "done in" in summary


def test_near_duplicates_match_a_brute_force_search_of_real_records():
    """GenMedGPT records and edited copies, against every pair compared exactly (records in order; a record
    repeats an earlier kept one at Jaccard >= 0.8): nothing is reported that is not a near duplicate, and the LSH
    index misses at most 5% of them (a pair at 0.8 is a candidate with probability 0.986)."""
    from medlora.data.hygiene import record_shingles, words

    import random

    records = json.loads(shared_dataset("chatdoctor/genmedgpt_5k.json").read_text())[:1000]
    rng = random.Random(0)
    for _ in range(120):  # copies with 1 to 4 words of the answer changed: Jaccard from about 0.95 down to 0.7
        record = dict(rng.choice(records))
        answer = record["output"].split()
        for _ in range(rng.randint(1, 4)):
            answer[rng.randrange(len(answer))] = rng.choice(["mild", "severe", "often", "rarely"])
        records.append(dict(record, output=" ".join(answer)))
    conversations = load_conversations_from(records)
    _, report = clean_conversations(conversations, SimpleNamespace(**{**vars(CHECK_ONLY), "contamination_check": "none"}))
    found = {int(place.rsplit(" ", 1)[1]) for place, *_ in report.near_duplicates}
    exact = {int(place.rsplit(" ", 1)[1]) for place, _ in report.exact_duplicates}
    kept, expected = [], set()
    for number, record in enumerate(records, start=1):
        shingles = record_shingles([words(record[key]) for key in ("instruction", "input", "output") if record[key]])
        if number in exact:
            continue
        if any(len(shingles & other) / len(shingles | other) >= 0.8 for other in kept):
            expected.add(number)
        else:
            kept.append(shingles)
    assert len(expected) >= 30, "the sample should hold near duplicates"
    assert found <= expected and len(found) >= 0.95 * len(expected)


def load_conversations_from(records: list) -> list:
    return [SimpleNamespace(messages=[{"content": r["instruction"], "input": r["input"]}, {"content": r["output"]}],
                            system=None, source=f"genmedgpt: record {n}") for n, r in enumerate(records, start=1)]


def test_the_benchmark_finds_what_it_plants_and_the_same_in_every_process():
    """scripts/benchmark_hygiene.py (docs/BENCHMARKS.md) at a small size, twice with different string-hash seeds:
    the findings may not depend on the process (MinHash hashes shingles with xxHash, not Python's seeded hash)."""
    import os

    shared_dataset("huatuo/llama_data.jsonl")
    outputs = []
    for seed in ("1", "2"):
        result = run_script("scripts/benchmark_hygiene.py", "--records", 3000, env={**os.environ, "PYTHONHASHSEED": seed})
        row = next(line for line in result.stdout.splitlines() if line.startswith("| "))
        outputs.append((row.rsplit("|", 3)[-2], result.stdout.split("planted / found: ")[1]))
    assert outputs[0] == outputs[1]
    assert "evaluation questions 3 / 3" in outputs[0][1] and "phone numbers 30 / 30" in outputs[0][1]


def test_data_without_a_candidate_identifier_never_imports_presidio(tmp_path):
    """The GPU check carries no Presidio or spaCy (scripts/gpu_wheels.txt): the bundled data must not need them,
    while one phone number must load them."""
    import subprocess
    import sys

    code = ("import sys; from types import SimpleNamespace as N; from medlora.data.hygiene import clean_conversations;"
            "from medlora.data.records import load_conversations;"
            "flags = N(dedup=False, decontaminate=False, scrub_pii=False, contamination_check='data/eval');"
            "c = load_conversations(sys.argv[1]).conversations; r = clean_conversations(c, flags)[1];"
            "print(sum(r.identifiers.values()), 'presidio_analyzer' in sys.modules)")
    with_phone = json.loads((ROOT / "data" / "sft" / "medical_chat_en.json").read_text())[:3]
    with_phone[0]["input"] = "Call me on +1 617 555 0199."
    (tmp_path / "phone.json").write_text(json.dumps(with_phone))
    for data, expected in ((ROOT / "data" / "sft", "0 False"), (tmp_path / "phone.json", "1 True")):
        result = subprocess.run([sys.executable, "-c", code, str(data)], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.stdout.strip().splitlines()[-1] == expected, result.stderr[-2000:]
