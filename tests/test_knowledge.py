"""The knowledge base without a model: reading every file type, splitting text, the BM25 index and its
cache, the prompt block, and retrieval quality on our own disease table and symptom questions."""

import json
import re

import pytest

from medlora.data.knowledge import (
    BLOCK_INSTRUCTION,
    PASSAGE_CHARS,
    Passage,
    knowledge_block,
    source_lines,
    split_passages,
)
from medlora.data.records import load_conversations
from medlora.errors import MedLoRAError
from medlora.inference.retrieval import KnowledgeBase, load_knowledge, tokenize
from tests.conftest import ROOT, run_script, shared_dataset

DISEASES_CSV = ROOT / "data" / "knowledge" / "diseases.csv"
QUESTIONS = ROOT / "data" / "knowledge" / "symptom_questions.jsonl"
# Measured 0.84 and 0.96 (2026-12-01); the thresholds leave room for a tokenizer or library update.
MIN_RECALL_AT_1, MIN_RECALL_AT_3 = 0.75, 0.9


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLORA_CACHE", str(tmp_path / "cache"))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_rows_are_column_value_passages(tmp_path):
    table = write(tmp_path / "t.csv", "disease,symptoms,note\ngout,a hot swollen big toe,\nasthma,wheezing,night cough\n")
    knowledge = KnowledgeBase.load(table)
    assert knowledge.passages == [
        Passage("disease: gout\nsymptoms: a hot swollen big toe", "gout", "t.csv: record 1"),
        Passage("disease: asthma\nsymptoms: wheezing\nnote: night cough", "asthma", "t.csv: record 2")]
    found = knowledge.search("my big toe is swollen", top_k=3)
    assert [p.title for p in found] == ["gout"] and found[0].score > 0  # asthma shares no word: left out


def test_jsonl_json_txt_md_and_folders(tmp_path):
    folder = tmp_path / "kb"
    write(folder / "a.jsonl", '{"text": "Shingles is a painful rash.", "title": "Shingles", "source": "leaflet 4"}\n'
                              '\n{"text": "Gout attacks the big toe."}\n')
    write(folder / "b.json", json.dumps([{"text": "Sinusitis blocks the nose."}]))
    write(folder / "sub" / "c.md", "# Heart\nIntro line.\n\n## Blood pressure\nHigh blood pressure has no symptoms.\n")
    write(folder / "sub" / "d.txt", "Tinnitus is ringing in the ears.")
    write(folder / ".hidden" / "e.txt", "never read")
    write(folder / "notes.docx", "not a knowledge file")
    knowledge = KnowledgeBase.load(folder)
    assert [(p.title, p.source, p.text) for p in knowledge.passages] == [
        ("Shingles", "leaflet 4", "Shingles is a painful rash."),
        ("", "kb/a.jsonl: record 3", "Gout attacks the big toe."),  # JSON Lines records: their line numbers
        ("", "kb/b.json: record 1", "Sinusitis blocks the nose."),
        # paragraphs that fit share a passage, titled by the heading it starts under
        ("Heart", "kb/sub/c.md: line 1", "# Heart\nIntro line.\n\n## Blood pressure\nHigh blood pressure has no symptoms."),
        ("d", "kb/sub/d.txt: line 1", "Tinnitus is ringing in the ears.")]
    assert knowledge.search("ringing ears")[0].source == "kb/sub/d.txt: line 1"


def test_text_is_split_at_sentences_with_overlap_and_at_paragraphs():
    text = "A is one. B is two. C is three. D is four.\n\nE is five and longer.\n\nF is six."
    spans = split_passages(text, size=40, overlap=16)
    assert [text[a:b] for a, b in spans] == [
        "A is one. B is two. C is three.",
        "C is three. D is four.",  # cut inside a paragraph: its last sentence starts the next passage
        "E is five and longer.\n\nF is six."]  # a paragraph that does not fit starts afresh (no overlap)
    spans = split_passages("第一句话。" * 10, size=12, overlap=5)  # Chinese sentence ends
    assert {"第一句话。" * 10}.isdisjoint(("第一句话。" * 10)[a:b] for a, b in spans)
    assert all(("第一句话。" * 10)[a:b] in ("第一句话。第一句话。", "第一句话。") for a, b in spans)
    long_sentence = "word " * 200
    pieces = [long_sentence[a:b] for a, b in split_passages(long_sentence)]
    assert all(len(p) <= PASSAGE_CHARS and p.startswith("word") and p.endswith("word") for p in pieces)
    assert sum(p.count("word") for p in pieces) == 200  # no overlap inside a sentence cut at spaces


def test_tokenize_stems_english_and_segments_chinese():
    assert tokenize("The fevers of RUNNING patients") == ["fever", "run", "patient"]
    words = tokenize("流鼻涕，打喷嚏 and sneezing")
    assert {"鼻涕", "流鼻涕", "喷嚏", "打喷嚏", "sneez"} <= set(words)


def test_index_is_cached_by_content(tmp_path):
    table = write(tmp_path / "t.csv", "disease,symptoms\ngout,toe pain\n")
    first = KnowledgeBase.load(table)
    again = KnowledgeBase.load(table)
    assert first.build_seconds is not None and again.build_seconds is None
    assert again.index_dir == first.index_dir and "loaded from the cache" in again.describe()
    write(table, "disease,symptoms\ngout,big toe pain\n")
    changed = KnowledgeBase.load(table)
    assert changed.index_dir != first.index_dir and changed.build_seconds is not None
    assert changed.passages[0].text == "disease: gout\nsymptoms: big toe pain"


@pytest.mark.parametrize("name, content, message", [
    ("t.csv", "disease,symptoms\ngout,toe,extra\n", "t.csv: record 1: more values than the header has columns"),
    ("t.csv", "disease,symptoms\ngout,toe\n,\n", "t.csv: record 2: every value is empty"),
    ("t.jsonl", '{"text": "ok"}\n{"title": "no text"}\n', "t.jsonl: record 2: field 'text': missing"),
    ("t.jsonl", '{"text": "ok"}\n{"text": 3}\n', "t.jsonl: record 2: field 'text': expected a string, got int"),
    ("t.jsonl", '{"text": "ok"}\n{"text": \n', "t.jsonl: record 2: invalid JSON"),
    ("t.json", '["just a string"]', "t.json: record 1: expected a JSON object with a 'text' field, got str"),
    ("t.txt", "  \n\n ", "t.txt: no passages (empty file)"),
    ("t.pdf", "%PDF", "unsupported file type"),
])
def test_bad_files_name_the_file_and_record(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(MedLoRAError) as error:
        KnowledgeBase.load(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not list(tmp_path.rglob("config.json")) and not list(tmp_path.rglob("*.npy"))  # nothing half-built


def test_bad_flags():
    with pytest.raises(MedLoRAError, match="--knowledge_top_k 0: must be a whole number >= 1"):
        load_knowledge(str(DISEASES_CSV), 0)
    with pytest.raises(MedLoRAError, match="--knowledge_path /nonexistent: no such file or folder"):
        load_knowledge("/nonexistent", 3)
    assert load_knowledge("", 3) is None


def test_prompt_block_and_sources_lines():
    passages = [Passage("disease: gout\nsymptoms: toe pain", "gout", "t.csv: record 1"), Passage("Rest helps.")]
    assert knowledge_block(passages) == ("Sources:\n[1] gout\ndisease: gout\nsymptoms: toe pain\n\n[2] Rest helps.\n\n"
                                         + BLOCK_INSTRUCTION)
    assert knowledge_block([]) == ""
    assert source_lines(passages) == ["[1] gout (t.csv: record 1)", "[2] Rest helps."]


def test_training_records_with_context_get_the_same_block(tmp_path):
    write(tmp_path / "grounded.jsonl", "\n".join(json.dumps(r) for r in [
        {"instruction": "Why does my toe hurt?", "context": "Gout attacks the big toe.", "output": "It may be gout [1]."},
        {"instruction": "Q", "input": "age 40", "knowledge": [{"text": "A", "title": "T"}, "B"], "output": "See [1]."},
    ]) + "\n")
    write(tmp_path / "messages.jsonl", json.dumps(  # a folder of two files: one format each
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A [1]."}], "context": ["P"]}))
    conversations = load_conversations(tmp_path).conversations
    assert conversations[0].messages[0] == {"role": "user", "content": "Why does my toe hurt?",
                                            "input": knowledge_block([Passage("Gout attacks the big toe.")])}
    assert conversations[1].messages[0]["input"] == "age 40\n\n" + knowledge_block([Passage("A", "T"), Passage("B")])
    assert conversations[2].messages[0]["input"] == knowledge_block([Passage("P")])
    bad = write(tmp_path / "bad.jsonl", json.dumps({"instruction": "Q", "output": "A", "context": [{"title": "x"}]}))
    with pytest.raises(MedLoRAError, match=r"bad.jsonl: record 1: field 'context\[0\].text': missing"):
        load_conversations(bad)
    both = write(tmp_path / "both.jsonl", json.dumps({"instruction": "Q", "output": "A", "context": "x", "knowledge": "y"}))
    with pytest.raises(MedLoRAError, match="record 1: fields 'context' and 'knowledge'"):
        load_conversations(both)


# ---- our own data ------------------------------------------------------------------------------------------
def test_committed_knowledge_files_are_what_the_script_writes(tmp_path):
    run_script("scripts/make_knowledge_table.py", "--output_dir", tmp_path)
    for name in ("diseases.csv", "grounded_qa.jsonl"):
        assert (tmp_path / name).read_bytes() == (DISEASES_CSV.parent / name).read_bytes(), name


def test_grounded_records_carry_the_knowledge_bases_own_passages():
    """So that fine-tuning sees exactly the block that chat with --knowledge_path shows."""
    by_title = {p.title: p.text for p in KnowledgeBase.load(DISEASES_CSV).passages}
    records = [json.loads(line) for line in (DISEASES_CSV.parent / "grounded_qa.jsonl").read_text().splitlines()]
    assert len(records) == 40 and all(by_title[c["title"]] == c["text"] for r in records for c in r["context"])
    for record in records:
        cited = re.findall(r"source \[(\d)\]", record["output"])
        titles = [c["title"] for c in record["context"]]
        if cited:  # the cited source is the disease whose symptoms the question lists
            disease = titles[int(cited[0]) - 1]
            assert record["instruction"].startswith("I have ") and disease in record["output"]
        else:
            assert "do not cover" in record["output"]
    assert sum("do not cover" in r["output"] for r in records) == 8


def test_questions_are_not_copied_from_the_table():
    """The symptom questions were written apart from the table: no run of 4 words is shared."""
    def shingles(text, n=4):
        words = re.findall(r"[a-z]+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    table = shingles(DISEASES_CSV.read_text(encoding="utf-8"))
    questions = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    assert len(questions) == 50 and all(not (shingles(q["question"]) & table) for q in questions)


def test_recall_of_the_right_disease():
    knowledge = KnowledgeBase.load(DISEASES_CSV)
    questions = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines()]
    diseases = {p.title for p in knowledge.passages}
    assert all(q["disease"] in diseases for q in questions)
    ranked = [[p.title for p in knowledge.search(q["question"], top_k=3)] for q in questions]
    at_1 = sum(titles[:1] == [q["disease"]] for titles, q in zip(ranked, questions)) / len(questions)
    at_3 = sum(q["disease"] in titles for titles, q in zip(ranked, questions)) / len(questions)
    print(f"recall@1 {at_1:.2f}, recall@3 {at_3:.2f} on {len(questions)} questions")
    assert at_1 >= MIN_RECALL_AT_1 and at_3 >= MIN_RECALL_AT_3
    chinese = [(titles, q) for titles, q in zip(ranked, questions) if re.search(r"[\u4e00-\u9fff]", q["question"])]
    assert len(chinese) == 10 and sum(q["disease"] in titles for titles, q in chinese) >= 9


def test_benchmark_script_runs_on_a_small_corpus():
    shared_dataset("chatdoctor/disease_database.csv")
    result = run_script("scripts/benchmark_retrieval.py", "--passages", 1500, "--other_questions", 10)
    lines = result.stdout.splitlines()
    assert lines[1].startswith("passages: 1,500; index build ")
    assert [line.split(" | ")[1] for line in lines if line.startswith("| ") and "ms" not in line] == ["50", "10", "10"]
    assert lines[-1].startswith("recall of the right disease of our table among all 1,500 passages: recall@1 ")
