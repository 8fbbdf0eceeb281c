"""evaluate.py, medlora/data/questions.py and medlora/evaluation/scoring.py on the built-in tiny model: question
formats and their errors, loglik scores against a brute-force computation, acc vs acc_norm, answer
extraction, batching, perplexity, and --compare end to end."""

import json
import math

import pytest
import torch

from medlora.data.questions import (
    Question,
    conversation,
    load_question_file,
    pick_fewshot,
    question_files,
)
from medlora.data.records import load_conversations
from medlora.data.templates import PromptTemplate
from medlora.data.tokenization import ConversationEncoder
from medlora.errors import MedLoRAError
from medlora.evaluation.scoring import Evaluator, choose_options, extract_choice
from medlora.models.loading import load_for_inference
from tests.conftest import ROOT, SAMPLE_SFT, TINY, run_script

EVAL_DATA = ROOT / "data" / "eval"
MEDQA = EVAL_DATA / "medqa_style_sample.jsonl"
PUBMEDQA = EVAL_DATA / "pubmedqa_style_sample.jsonl"


@pytest.fixture(scope="module")
def alpaca():
    return PromptTemplate.load("alpaca")


@pytest.fixture(scope="module")
def base(tiny_model_path):
    return load_for_inference(str(tiny_model_path))


@pytest.fixture(scope="module")
def tuned(tiny_adapter):
    return load_for_inference(lora_weights=str(tiny_adapter))


def sample_questions():
    """Three MedQA-style questions (4 and 5 options) and two PubMedQA-style ones (context in the input slot)."""
    return load_question_file(MEDQA).questions[:3] + load_question_file(PUBMEDQA).questions[:2]


# ---- question files ------------------------------------------------------------------------------------------
def write(path, records, jsonl=True):
    text = "\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records, indent=2)
    path.write_text(text, encoding="utf-8")
    return path


def test_bundled_samples_cover_the_three_formats():
    files = [load_question_file(path) for path in question_files(EVAL_DATA)]
    counts = {f.format: len(f.questions) for f in files}
    assert counts["medqa"] >= 24 and counts["medmcqa"] >= 8 and counts["pubmedqa"] >= 8
    assert sum(counts.values()) >= 40
    for qfile in files:  # answers spread over the letters, no duplicated question
        assert len({q.answer for q in qfile.questions}) >= 3
        assert len({q.question for q in qfile.questions}) == len(qfile.questions)


def test_every_question_format_and_answer_form(tmp_path):
    medqa = write(tmp_path / "medqa.json", [
        {"question": "Q1?", "options": {"B": "two", "A": "one", "C": "three"}, "answer_idx": "C", "answer": "three"},
        {"question": "Q2?", "options": ["one", "two", "three", "four"], "answer": 1},
        {"question": "Q3?", "options": ["one", "two"], "answer": "b"},
        {"question": "Q4?", "options": ["one", "two", 3], "answer": "two"},
        {"question": "Q5?", "choices": ["one", "two", "three", "four"], "answer": 3},  # MMLU
    ], jsonl=False)
    loaded = load_question_file(medqa)
    assert loaded.format == "medqa"
    assert [q.answer for q in loaded.questions] == [2, 1, 1, 1, 3]
    assert loaded.questions[0].options == ["one", "two", "three"] and loaded.questions[3].options[2] == "3"
    assert loaded.questions[4].source == f"{medqa}: record 5"

    medmcqa = write(tmp_path / "medmcqa.jsonl", [
        {"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1},
        {"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 4},
    ])
    loaded = load_question_file(medmcqa)
    assert loaded.format == "medmcqa" and [q.answer for q in loaded.questions] == [0, 3]
    assert loaded.questions[1].options == ["w", "x", "y", "z"]

    pubmedqa = write(tmp_path / "pubmedqa.jsonl", [
        {"question": "Q?", "context": "plain text", "final_decision": "no"},
        {"question": "Q?", "context": {"contexts": ["one", "two"], "labels": ["A", "B"]}, "final_decision": "Maybe"},
    ])
    loaded = load_question_file(pubmedqa)
    assert loaded.format == "pubmedqa"
    assert [(q.options, q.answer, q.context) for q in loaded.questions] == [
        (["yes", "no", "maybe"], 1, "plain text"), (["yes", "no", "maybe"], 2, "one\ntwo")]


GOOD_MEDQA = {"question": "Q?", "options": {"A": "one", "B": "two", "C": "three", "D": "four"}, "answer_idx": "A"}
GOOD_MEDMCQA = {"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 2}
GOOD_PUBMEDQA = {"question": "Q?", "context": "text", "final_decision": "yes"}


def without(record, key):
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize("good, bad, message", [
    (GOOD_MEDQA, {**GOOD_MEDQA, "question": None}, "field 'question': missing"),
    (GOOD_MEDQA, without(GOOD_MEDQA, "answer_idx"), "field 'answer_idx': missing"),
    (GOOD_MEDQA, {**GOOD_MEDQA, "answer_idx": "F"}, "field 'answer_idx': 'F' is not an option; expected a letter A-D"),
    (GOOD_MEDQA, {**GOOD_MEDQA, "answer_idx": 4}, "field 'answer_idx': 4 is not an option"),
    (GOOD_MEDQA, {**GOOD_MEDQA, "options": {"A": "one", "C": "three"}}, "field 'options': keys must be the letters A, B"),
    (GOOD_MEDQA, {**GOOD_MEDQA, "options": ["one", ""]}, "field 'options[1]': empty"),
    (GOOD_MEDQA, {**GOOD_MEDQA, "options": "A. one B. two"}, "field 'options': expected an object"),
    (GOOD_MEDMCQA, {**GOOD_MEDMCQA, "cop": 0}, "field 'cop': expected 1-4"),
    (GOOD_MEDMCQA, {**GOOD_MEDMCQA, "cop": 5}, "field 'cop': expected 1-4"),
    (GOOD_MEDMCQA, {**GOOD_MEDMCQA, "cop": "b"}, "field 'cop': expected 1-4"),
    (GOOD_MEDMCQA, without(GOOD_MEDMCQA, "opc"), "field 'opc': missing"),
    (GOOD_PUBMEDQA, {**GOOD_PUBMEDQA, "final_decision": "perhaps"}, "field 'final_decision': expected yes, no or maybe"),
    (GOOD_PUBMEDQA, without(GOOD_PUBMEDQA, "context"), "field 'context': missing"),
    (GOOD_PUBMEDQA, {**GOOD_PUBMEDQA, "context": {"contexts": []}}, "field 'context.contexts'"),
])
def test_question_errors_name_file_record_and_field(tmp_path, good, bad, message):
    path = write(tmp_path / "questions.jsonl", [good, bad])
    with pytest.raises(MedLoRAError) as error:
        load_question_file(path)
    assert str(error.value).startswith(f"{path}: record 2: {message}")


@pytest.mark.parametrize("content, message", [
    ('{"question": "Q?", "answer": "A"}\n', "record 1: unknown question format"),
    ('{"question": "Q?", "opa": "w"\n', "record 1: invalid JSON"),
    ('["not an object"]', "record 1: expected a JSON object"),
    ("", "no records"),
])
def test_unreadable_question_files(tmp_path, content, message):
    path = tmp_path / "questions.json"
    path.write_text(content)
    with pytest.raises(MedLoRAError, match=message):
        load_question_file(path)


@pytest.mark.slow
def test_bad_input_exits_with_one_line_and_writes_no_report(tmp_path):
    bad = write(tmp_path / "bad.jsonl", [GOOD_MEDMCQA, {**GOOD_MEDMCQA, "cop": 0}])
    report = tmp_path / "report.json"
    result = run_script("evaluate.py", "--base_model", TINY, "--data_path", bad, "--output_file", report,
                        check=False)
    assert result.returncode == 2
    expected = (f"error: {bad}: record 2: field 'cop': expected 1-4 (1-based, 1 = opa, as in MedMCQA's files), "
                "got 0; 0-based exports need 1 added")
    assert result.stderr.strip().splitlines() == [expected]
    assert not report.exists() and list(tmp_path.iterdir()) == [bad]


# ---- prompts and few-shot -----------------------------------------------------------------------------------------
def test_fewshot_examples_are_seeded_exclude_the_question_and_ignore_limit():
    pool = load_question_file(MEDQA).questions
    shots = pick_fewshot(pool, pool, 3, seed=1, same_file=True)
    assert all(len(s) == 3 and pool[i] not in s for i, s in enumerate(shots))
    assert shots == pick_fewshot(pool, pool, 3, seed=1, same_file=True)
    assert pick_fewshot(pool[:5], pool, 3, seed=1, same_file=True) == shots[:5]  # --limit keeps each question's shots
    assert pick_fewshot(pool, pool, 3, seed=2, same_file=True) != shots
    other = load_question_file(PUBMEDQA).questions
    assert all(q in other for s in pick_fewshot(pool, other, 2, seed=1, same_file=False) for q in s)
    with pytest.raises(MedLoRAError, match="--num_fewshot 10: only 9 example questions"):
        pick_fewshot(other, other, 10, seed=1, same_file=True)
    copies = load_question_file(MEDQA).questions  # --fewshot_path naming the same file: other objects, same questions
    assert all(q.question not in [c.question for c in s] for q, s in zip(pool, pick_fewshot(pool, copies, 5, 3, False)))

    conv = conversation(pool[0], shots[0], reply_index=2)
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 4
    assert [m["content"] for m in conv.messages[1:6:2]] == [f"{q.letters[q.answer]}. {q.options[q.answer]}" for q in shots[0]]
    assert conv.messages[-1]["content"] == "C. Vitamin C" and "E. Vitamin K" in conv.messages[-2]["content"]


# ---- metrics -----------------------------------------------------------------------------------------------------
def test_acc_acc_norm_and_acc_bytes_on_given_logliks():
    # Long replies lose on the summed loglik but win per character: acc and acc_norm disagree.
    assert choose_options([-6.0, -9.0, -30.0], [3, 10, 40], [3, 10, 40]) == (0, 2, 2)
    assert choose_options([-12.0, -6.0], [4, 2], [4, 2]) == (1, 0, 0)  # -3.0/char vs -3.0/char: tie, the first wins
    assert choose_options([-1.0, -1.0, -2.0], [5, 5, 5], [5, 5, 5]) == (0, 0, 0)
    # Chinese: 3 UTF-8 bytes a character. "A. 坏血病" is 6 characters, 12 bytes; "B. scurvy disease" 17 of each.
    replies = ["A. 坏血病", "B. scurvy disease"]
    chars, byte_counts = [len(r) for r in replies], [len(r.encode("utf-8")) for r in replies]
    assert (chars, byte_counts) == ([6, 17], [12, 17])
    # per character: -2.0 vs -1.76 (B); per byte: -1.0 vs -1.76 (A): lm-eval's acc_norm and acc_bytes disagree.
    assert choose_options([-12.0, -30.0], chars, byte_counts) == (0, 1, 0)


EXTRACTION_TABLE = [
    ("The answer is (C)", 2), ("C.", 2), ("Answer: c", 2), ("**B**", 1), ("option D", 3),
    ("The correct answer is B: Metformin", 1), ("(A) Aspirin, because it thins the blood", 0), ("B) Metformin", 1),
    ("I would choose C because it lowers glucose", 2), ("Metformin is the first-line drug.", 1),
    ("Answer:\n\n**D. Warfarin**", 3), ("  \n[D]", 3), ("Correct option: (b) metformin", 1),
    ("The answer is E", None), ("The answer is a drug that thins the blood", None), ("I am not sure.", None),
    ("A lack of sleep is the cause.", None), ("Either B or C could be right", None), ("", None),
    ("The best choice would be insulin", 2), ("I think it is option d.", 3),
]
PUBMED_TABLE = [("Yes", 0), ("No, the study found no benefit.", 1), ("Maybe.", 2), ("The answer is yes", 0),
                ("Based on the abstract, the answer is: maybe", 2), ("B. no", 1), ("It is not known.", None)]


@pytest.mark.parametrize("response, expected", EXTRACTION_TABLE)
def test_answer_letter_extraction(response, expected):
    assert extract_choice(response, ["Aspirin", "Metformin", "Insulin", "Warfarin"]) == expected


@pytest.mark.parametrize("response, expected", PUBMED_TABLE)
def test_yes_no_maybe_extraction(response, expected):
    assert extract_choice(response, ["yes", "no", "maybe"]) == expected


# ---- scoring on the tiny model ---------------------------------------------------------------------------------------
def brute_force_loglik(model, tokenizer, template, question, shots, index) -> float:
    """Full forward on prompt + option; sum of log-softmax over the option's tokens."""
    prompt = template.render(conversation(question, shots)).text
    full = template.render(conversation(question, shots, index)).text
    assert full.startswith(prompt)
    prompt_ids, full_ids = tokenizer(prompt).input_ids, tokenizer(full).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([full_ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[position - 1, full_ids[position]].item() for position in range(len(prompt_ids), len(full_ids)))


def test_loglik_equals_brute_force_and_batching_changes_nothing(base, alpaca):
    questions = sample_questions()
    shots = pick_fewshot(questions, load_question_file(MEDQA).questions[10:], 1, seed=0, same_file=False)
    batched = Evaluator(base.model, base.tokenizer, alpaca, batch_size=7).loglik(questions, shots, "test")
    single = Evaluator(base.model, base.tokenizer, alpaca, batch_size=1).loglik(questions, shots, "test")
    for question, shot, row, single_row in zip(questions, shots, batched["questions"], single["questions"]):
        expected = [brute_force_loglik(base.model, base.tokenizer, alpaca, question, shot, i)
                    for i in range(len(question.options))]
        assert row["option_loglik"] == pytest.approx(expected, abs=1e-3)
        assert row["option_loglik"] == pytest.approx(single_row["option_loglik"], abs=1e-4)
        best = max(range(len(expected)), key=expected.__getitem__)
        assert row["pred"] == question.letters[best] and row["pred"] == single_row["pred"]
    assert batched["acc"] == sum(r["correct"] for r in batched["questions"]) / len(questions)


def test_acc_and_acc_norm_disagree_end_to_end(base, alpaca):
    long_text = "a slow progressive inflammatory condition of the joints of the hands and feet"
    question = Question("Which is it?", ["X", long_text], answer=1)
    result = Evaluator(base.model, base.tokenizer, alpaca).loglik([question], [[]], "test")
    row = result["questions"][0]
    assert row["option_chars"] == row["option_bytes"] == [len("A. X"), len("B. " + long_text)]
    short, long = row["option_loglik"]
    assert short > long and long / row["option_chars"][1] > short / row["option_chars"][0]
    assert (row["pred"], row["pred_norm"], row["pred_bytes"]) == ("A", "B", "B")
    assert (result["acc"], result["acc_norm"], result["acc_bytes"]) == (0.0, 1.0, 1.0)
    assert result["acc_stderr"] is None  # one question: no standard error (lm-eval's N/A)


def test_batched_generation_equals_one_by_one(base, alpaca):
    questions = sample_questions()
    prompts = [Evaluator(base.model, base.tokenizer, alpaca).encoder.encode_prompt(conversation(q)) for q in questions]
    assert len(set(map(len, prompts))) > 1  # real left padding in the batch
    batched = Evaluator(base.model, base.tokenizer, alpaca, batch_size=8, max_new_tokens=6).generate_replies(prompts, "t")
    single = Evaluator(base.model, base.tokenizer, alpaca, batch_size=1, max_new_tokens=6).generate_replies(prompts, "t")
    assert batched == single and all(batched)
    result = Evaluator(base.model, base.tokenizer, alpaca, batch_size=8, max_new_tokens=6).generate(
        questions, [[]] * len(questions), "test")
    rows = result["questions"]
    assert [r["response"] for r in rows] == batched
    assert result["unparsed"] == sum(extract_choice(r, q.options) is None for r, q in zip(batched, questions))
    assert result["acc"] == sum(r["correct"] for r in rows) / len(rows)


def test_perplexity_is_exp_of_the_mean_reply_token_loss(tuned, alpaca):
    conversations = load_conversations(SAMPLE_SFT / "medical_multiturn.jsonl").conversations[:6]
    result = Evaluator(tuned.model, tuned.tokenizer, alpaca, batch_size=4).perplexity(conversations, 96, True, "test")
    examples = ConversationEncoder(tuned.tokenizer, alpaca, 96, train_on_inputs=False).encode(conversations).examples
    total_loss, total_tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:  # transformers' own shifted cross-entropy, one example at a time
            loss = tuned.model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])).loss
            tokens = sum(label != -100 for label in example.labels[1:])
            total_loss, total_tokens = total_loss + loss.item() * tokens, total_tokens + tokens
    assert result["tokens"] == total_tokens and result["records"] == len(examples) >= 3
    assert result["records"] + result["dropped"] == 6 and result["truncated"] >= 1
    assert result["perplexity"] == pytest.approx(math.exp(total_loss / total_tokens), rel=1e-4)


def test_disabled_adapter_scores_like_the_base_model(base, tuned, alpaca):
    questions = sample_questions()[:2]
    shots = [[]] * len(questions)
    plain = Evaluator(base.model, base.tokenizer, alpaca).loglik(questions, shots, "test")
    with tuned.model.disable_adapter():
        disabled = Evaluator(tuned.model, tuned.tokenizer, alpaca).loglik(questions, shots, "test")
    enabled = Evaluator(tuned.model, tuned.tokenizer, alpaca).loglik(questions, shots, "test")
    for p, d, e in zip(plain["questions"], disabled["questions"], enabled["questions"]):
        assert d["option_loglik"] == pytest.approx(p["option_loglik"], abs=1e-4)
        assert max(abs(a - b) for a, b in zip(e["option_loglik"], p["option_loglik"])) > 1e-2


# ---- evaluate.py end to end --------------------------------------------------------------------------------------------
def check_report_consistency(task):
    rows = task["questions"]
    assert task["n"] == len(rows)
    assert task["acc"] == pytest.approx(sum(r["pred"] == r["answer"] for r in rows) / len(rows))
    assert task["acc_stderr"] == pytest.approx(math.sqrt(task["acc"] * (1 - task["acc"]) / (len(rows) - 1)))
    if task["method"] == "loglik":
        for metric, suffix, lengths in (("acc_norm", "_norm", "option_chars"), ("acc_bytes", "_bytes", "option_bytes")):
            assert task[metric] == pytest.approx(sum(r[f"pred{suffix}"] == r["answer"] for r in rows) / len(rows))
            assert task[f"{metric}_stderr"] == pytest.approx(math.sqrt(task[metric] * (1 - task[metric]) / (len(rows) - 1)))
            for r in rows:
                per_length = [ll / n for ll, n in zip(r["option_loglik"], r[lengths])]
                assert r[f"pred{suffix}"] == "ABCDE"[max(range(len(per_length)), key=per_length.__getitem__)]
        for r in rows:
            best = max(range(len(r["option_loglik"])), key=r["option_loglik"].__getitem__)
            assert r["pred"] == "ABCDE"[best]
    else:
        assert task["unparsed"] == sum(r["pred"] is None for r in rows)


@pytest.mark.slow
def test_compare_end_to_end(tiny_adapter, tmp_path):
    # The documented demo command, with the test adapter and a report file.
    report_path = tmp_path / "report.json"
    result = run_script("evaluate.py", "--lora_weights", tiny_adapter, "--data_path", "data/eval/medqa_style_sample.jsonl",
                        "--compare", "--output_file", report_path)
    header = next(line for line in result.stdout.splitlines() if "adapter" in line)
    assert header.split() == ["base", "adapter", "adapter", "-", "base"]
    assert "medqa_style_sample.jsonl (medqa, 26 questions, loglik, 0-shot)" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["settings"]["prompt_template_name"] == "alpaca" and report["settings"]["base_model"] == TINY
    tasks = {name: report["results"][name]["tasks"]["data/eval/medqa_style_sample.jsonl"] for name in ("base", "adapter")}
    for task in tasks.values():
        check_report_consistency(task)
        assert task["n"] == 26
        acc_row = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["acc"])
        assert f"{task['acc']:.4f} ± {task['acc_stderr']:.4f}" in acc_row
    assert tasks["base"]["questions"][0]["option_loglik"] != tasks["adapter"]["questions"][0]["option_loglik"]
    compared = report["comparison"]["data/eval/medqa_style_sample.jsonl"]
    assert list(compared) == ["acc", "acc_norm", "acc_bytes"]
    chart = report_path.with_suffix(".png")  # base vs adapter with error bars, beside the report
    assert f"chart: {chart}" in result.stdout
    assert_png(chart, min_width=600)
    for metric, entry in compared.items():
        combined = math.hypot(tasks["base"][f"{metric}_stderr"], tasks["adapter"][f"{metric}_stderr"])
        assert entry["difference"] == pytest.approx(tasks["adapter"][metric] - tasks["base"][metric])
        assert entry["combined_stderr"] == pytest.approx(combined)
        assert entry["exceeds_2se"] == (abs(entry["difference"]) > 2 * combined)
        row = next(line for line in result.stdout.splitlines() if line.split()[:1] == [metric])
        assert row.endswith(f"{entry['difference']:+.4f} {'>' if entry['exceeds_2se'] else '<='} 2SE={2 * combined:.4f}")


@pytest.mark.slow
def test_generate_fewshot_and_perplexity_end_to_end(tiny_adapter, tmp_path):
    # The documented generate example (medAlpaca style) on the folder of samples, with the test adapter.
    report_path = tmp_path / "report.json"
    result = run_script("evaluate.py", "--lora_weights", tiny_adapter, "--data_path", "data/eval", "--method", "generate",
                        "--num_fewshot", 2, "--fewshot_path", "data/eval/medmcqa_style_sample.jsonl", "--limit", 3,
                        "--perplexity_path", "data/sft/medical_multiturn.jsonl", "--output_file", report_path)
    report = json.loads(report_path.read_text())
    tasks = report["results"]["adapter"]["tasks"]
    assert list(report["results"]) == ["adapter"]
    assert {t["format"] for t in tasks.values()} == {"medqa", "medmcqa", "pubmedqa"}
    for task in tasks.values():
        assert task["n"] == 3 and task["num_fewshot"] == 2 and len(task["questions"]) == 3
        check_report_consistency(task)
    assert tasks["data/eval/medmcqa_style_sample.jsonl"]["questions"][0]["id"] == "sample-1"
    perplexity = report["results"]["adapter"]["perplexity"]
    assert perplexity["perplexity"] == pytest.approx(math.exp(perplexity["mean_nll"])) and perplexity["tokens"] > 0
    assert report["settings"]["cutoff_len"] == 128  # the adapter's own
    assert "perplexity" in result.stdout and "unparsed" in result.stdout


def assert_png(path, min_width=400):
    """A real PNG picture that matplotlib reads back, of at least min_width pixels, not one flat colour."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[1] >= min_width and pixels.std() > 0.01, (path, pixels.shape)

