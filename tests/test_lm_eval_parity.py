"""evaluate.py against lm-evaluation-harness 0.4.13 (lm-eval), offline, on the built-in tiny model.

The parity check: the same questions and prompts (evaluate.py's own, alpaca template) through evaluate.py's
scorer and through lm-eval's HFLM on a custom local-file task whose prompt is evaluate.py's prompt
(target_delimiter ""). lm-eval moves the prompt's trailing newline into the continuation and scores it, so
its log-likelihoods carry one extra term per question, log P(trailing whitespace | rest of the prompt),
measured here with lm-eval itself. Less that term, per-option log-likelihoods agree within 1e-4, and
lm-eval's own metric code gives the same acc, acc_norm (per character) and acc_bytes (per UTF-8 byte).
Then --harness lm_eval end to end, and the standard errors against lm-eval's own function.
"""

import importlib.util
import json
import math
import sys

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr
from lm_eval.tasks import get_task_dict

from medlora.data.questions import (
    Question,
    conversation,
    load_question_file,
    reply_text,
)
from medlora.data.templates import PromptTemplate
from medlora.errors import MedLoRAError
from medlora.evaluation.harness import (
    harness_model,
    run_tasks,
    task_manager,
    task_metrics,
    unknown_task,
)
from medlora.evaluation.report import difference, mean_stderr
from medlora.evaluation.scoring import Evaluator
from medlora.models.loading import load_for_inference
from tests.conftest import ROOT, run_script

EVAL_DATA = ROOT / "data" / "eval"
SAMPLE_TASKS = EVAL_DATA / "lm_eval_tasks"
# Chinese options: characters and UTF-8 bytes differ (3 bytes a character), so acc_norm and acc_bytes can part.
CHINESE = [
    Question("维生素C缺乏会导致哪种疾病？", ["坏血病", "佝偻病", "夜盲症", "脚气病"], 0, source="chinese: 1"),
    Question("胰岛素由哪个器官分泌？", ["肝", "胰腺", "脾脏", "肾上腺皮质"], 1, source="chinese: 2"),
    Question("Which drug is an anticoagulant?", ["华法林 (warfarin)", "Aspirin", "对乙酰氨基酚", "Ibuprofen"], 0,
             source="mixed: 3"),
]
TASK = "medlora_parity"


@pytest.fixture(scope="module")
def base(tiny_model_path):
    return load_for_inference(str(tiny_model_path), precision="fp32")


def parity_questions():
    return (load_question_file(EVAL_DATA / "medqa_style_sample.jsonl").questions[:5]
            + load_question_file(EVAL_DATA / "pubmedqa_style_sample.jsonl").questions[:2] + CHINESE)


def write_parity_task(folder, questions, template, tokenizer):
    """A local-file lm-eval task whose prompts and choices are evaluate.py's, and its folder for include_path."""
    data = folder / "questions.jsonl"
    with open(data, "w", encoding="utf-8") as out:
        for question in questions:
            out.write(json.dumps({"prompt": template.render(conversation(question), tokenizer).text,
                                  "choices": [reply_text(question, i) for i in range(len(question.options))],
                                  "answer": question.answer}, ensure_ascii=False) + "\n")
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in ("acc", "acc_norm", "acc_bytes"))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        f"output_type: multiple_choice\ndoc_to_text: \"{{{{prompt}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\n"
        f"doc_to_target: answer\ntarget_delimiter: \"\"\nmetric_list:\n{metrics}", encoding="utf-8")
    return folder


def trailing_whitespace_logliks(lm, prompts: list) -> list:
    """lm-eval's log-likelihood of each prompt's trailing whitespace after the rest of the prompt."""
    requests = [Instance("loglikelihood", {}, (p.rstrip(), p[len(p.rstrip()):]), index)
                for index, p in enumerate(prompts)]
    return [loglik for loglik, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def check_parity(loaded, folder, questions):
    template = PromptTemplate.load("alpaca")
    ours = Evaluator(loaded.model, loaded.tokenizer, template, batch_size=4).loglik(
        questions, [[]] * len(questions), "evaluate.py")
    manager = task_manager([TASK], str(write_parity_task(folder, questions, template, loaded.tokenizer)))
    lm = harness_model(loaded.model, loaded.tokenizer, batch_size=4)
    output = run_tasks(lm, [TASK], manager, num_fewshot=0, limit=0, log_samples=True)
    samples = sorted(output["samples"][TASK], key=lambda sample: sample["doc_id"])
    task = get_task_dict([TASK], manager)[TASK]
    prompts = [sample["doc"]["prompt"] for sample in samples]
    assert all(prompt.endswith("### Response:\n") for prompt in prompts)  # the difference being handled is real
    offsets = trailing_whitespace_logliks(lm, prompts)

    assert len(samples) == len(questions) == len(ours["questions"])
    for sample, offset, row in zip(samples, offsets, ours["questions"]):
        lm_eval_logliks = [loglik for loglik, _ in sample["filtered_resps"]]
        assert offset < -1e-3  # the newline costs something: without the correction the two would differ
        assert [ll - offset for ll in lm_eval_logliks] == pytest.approx(row["option_loglik"], abs=1e-4)
        assert sample["acc"] == float(row["correct"])  # lm-eval's own acc needs no correction
        corrected = task.process_results(sample["doc"], [(ll - offset, False) for ll in lm_eval_logliks])
        assert corrected == {"acc": float(row["correct"]), "acc_norm": float(row["correct_norm"]),
                             "acc_bytes": float(row["correct_bytes"])}
    chinese = [row for question, row in zip(questions, ours["questions"]) if question in CHINESE]
    assert chinese and all(r["option_chars"] != r["option_bytes"] for r in chinese)  # per character is not per byte
    reported = output["results"][TASK]
    assert reported["acc,none"] == pytest.approx(ours["acc"]) and reported["acc_stderr,none"] == pytest.approx(
        ours["acc_stderr"], abs=1e-12)
    return ours


def test_option_logliks_and_metrics_equal_lm_eval(base, tmp_path):
    ours = check_parity(base, tmp_path, parity_questions())
    assert ours["n"] == 10 and ours["acc_stderr"] == pytest.approx(
        math.sqrt(ours["acc"] * (1 - ours["acc"]) / (ours["n"] - 1)))


@pytest.mark.slow  # bitsandbytes' 8-bit matmul is slow on CPU
def test_parity_holds_on_an_8bit_model_handed_to_lm_eval(tiny_model_path, tmp_path):
    quantized = load_for_inference(str(tiny_model_path), load_in_8bit=True)
    assert any("8bit" in type(module).__name__ for module in quantized.model.modules())
    check_parity(quantized, tmp_path, parity_questions()[:1] + CHINESE[:1])


def test_stderr_is_lm_evals_formula_and_the_compare_rule():
    for values in ([1, 0, 0, 1, 1], [True] * 3 + [False] * 9, [0.0, 1.0], [1, 1, 1, 1], [0.25, 0.5, 1.0]):
        assert mean_stderr(values) == lm_eval_mean_stderr([float(v) for v in values])  # the same operations, bit-equal
    assert mean_stderr([1]) is None and mean_stderr([]) is None  # lm-eval reports N/A below two samples
    assert mean_stderr([True] * 6 + [False] * 6) == pytest.approx(0.1508, abs=1e-4)  # 6 of 12 right: ±0.15

    base, tuned = {"acc": 0.5, "acc_stderr": 0.1}, {"acc": 0.8, "acc_stderr": 0.1}
    assert difference(base, tuned, "acc") == {"difference": pytest.approx(0.3), "combined_stderr": pytest.approx(
        math.sqrt(0.02)), "exceeds_2se": True}  # 0.3 > 2 * 0.1414
    assert difference(base, {"acc": 0.7, "acc_stderr": 0.1}, "acc")["exceeds_2se"] is False  # 0.2 < 0.2828
    assert difference(base, {"acc": 0.7, "acc_stderr": None}, "acc")["exceeds_2se"] is None


@pytest.mark.slow
def test_harness_compare_end_to_end(tiny_adapter, tiny_model_path, tmp_path):
    # The documented offline command, with the test adapter, --limit and --num_fewshot passed through.
    report_path = tmp_path / "report.json"
    result = run_script("evaluate.py", "--lora_weights", tiny_adapter, "--compare", "--harness", "lm_eval",
                        "--tasks", "medmcqa_style_sample", "--include_path", "data/eval/lm_eval_tasks",
                        "--limit", 6, "--num_fewshot", 1, "--output_file", report_path)
    assert result.stdout.splitlines()[0].split() == ["base", "adapter", "adapter", "-", "base"]
    assert "medmcqa_style_sample (lm-eval 0.4.13, 6 questions, 1-shot)" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["settings"]["harness"] == "lm-eval 0.4.13" and report["settings"]["tasks"] == ["medmcqa_style_sample"]
    tasks = {name: report["results"][name]["tasks"]["medmcqa_style_sample"] for name in ("base", "adapter")}

    # The base column is lm-eval on the plain base model, exactly.
    plain = load_for_inference(str(tiny_model_path))
    manager = task_manager(["medmcqa_style_sample"], str(SAMPLE_TASKS))
    expected = task_metrics(run_tasks(harness_model(plain.model, plain.tokenizer, 8), ["medmcqa_style_sample"],
                                      manager, num_fewshot=1, limit=6))["medmcqa_style_sample"]
    assert tasks["base"] == expected and expected["n"] == 6 and expected["num_fewshot"] == 1
    assert expected["metrics"] == ["acc", "acc_norm", "acc_bytes"]
    for task in tasks.values():
        row = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["acc_norm"])
        assert f"{task['acc_norm']:.4f} ± {task['acc_norm_stderr']:.4f}" in row
    for metric, compared in report["comparison"]["medmcqa_style_sample"].items():
        assert compared == difference(tasks["base"], tasks["adapter"], metric)


def test_harness_flags_are_checked_before_any_model_loads():
    script = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
    evaluate_script = importlib.util.module_from_spec(script)
    script.loader.exec_module(evaluate_script)
    for flags, message in [
        ({"harness": "lm_eval", "tasks": "medmcqa", "method": "generate"},
         "--harness lm_eval runs lm-eval's own tasks and prompts; --method does not apply to it"),
        ({"harness": "lm_eval", "tasks": "medmcqa", "data_path": "q.jsonl", "prompt_template_name": "chatml"},
         "--harness lm_eval runs lm-eval's own tasks and prompts; --data_path, --prompt_template_name do not apply to it"),
        ({"harness": "lm_eval", "tasks": " , "}, "--harness lm_eval needs --tasks, e.g. --tasks medqa_4options,"),
        ({"tasks": "medmcqa"}, "--tasks and --include_path are for --harness lm_eval"),
        ({"harness": "lm-eval", "tasks": "medmcqa"}, "--harness: unknown value 'lm-eval'; use lm_eval"),
    ]:
        with pytest.raises(MedLoRAError) as error:
            evaluate_script.main(**flags)
        assert str(error.value).startswith(message)


def test_unknown_task_names_the_nearest_ones():
    known = ["medqa_4options", "medmcqa", "mmlu_anatomy", "mmlu_clinical_knowledge", "pubmedqa"]
    assert unknown_task("medqa", known) == "--tasks: lm-eval has no task 'medqa'; did you mean medqa_4options?"
    assert unknown_task("pubmed_qa", known, "my_tasks") == (
        "--tasks: lm-eval has no task 'pubmed_qa' (nor has --include_path my_tasks); did you mean pubmedqa?")
    assert unknown_task("cardiology", known).endswith("; see docs/evaluate.md for the medical tasks")


def test_lm_evals_evaluate_import_finds_hugging_faces_library_not_this_script():
    import medlora.evaluation.harness

    medlora.evaluation.harness.task_names("x")  # (no import yet)
    sys.modules.pop("evaluate", None)
    medlora.evaluation.harness._lm_eval()
    assert "site-packages" in sys.modules["evaluate"].__file__ and hasattr(sys.modules["evaluate"], "load")


@pytest.mark.slow
def test_evaluate_help_does_not_import_lm_eval():
    result = run_script("-X", "importtime", "evaluate.py", "--help")
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "medlora.cli" in imported and not [name for name in imported if name.startswith("lm_eval")]
    assert "--harness" in result.stdout and "--include_path" in result.stdout  # MedLoRA's --help, on stdout
