r"""Score a base model and a LoRA adapter on medical multiple-choice questions (MedQA, MedMCQA, PubMedQA
formats) and on the perplexity of held-out chat data, side by side.

    python evaluate.py --lora_weights ./lora-medlora --data_path data/eval/medqa_style_sample.jsonl --compare
    python evaluate.py --base_model meta-llama/Llama-3.1-8B --lora_weights ./lora-chatdoctor --compare \
        --data_path medqa_test.jsonl --num_fewshot 3 --fewshot_path medqa_dev.jsonl --load_in_4bit \
        --perplexity_path held_out.json --output_file report.json
    python evaluate.py --lora_weights ./lora-medlora --method generate     # medAlpaca style: greedy reply, read the letter
    python evaluate.py --lora_weights ./lora-medlora --method perplexity --compare   # its held-out replies, base vs tuned
    python evaluate.py --lora_weights ./lora-medlora --compare --harness lm_eval \
        --tasks medqa_4options,medmcqa,pubmedqa,mmlu_clinical_knowledge     # lm-evaluation-harness's own tasks
    python evaluate.py --help                                              # every flag

Question files are read and checked before any model loads. Scores: --method loglik gives acc, acc_norm
(per character) and acc_bytes (per UTF-8 byte), as lm-evaluation-harness defines them, each with its
standard error; --method generate gives acc and the number of replies with no readable answer; --method
perplexity scores only the replies of held-out chat data (--perplexity_path, default: the adapter's own
validation records). --harness lm_eval runs lm-evaluation-harness's tasks instead (pip install lm-eval==0.4.13).
--compare says whether each difference exceeds twice the combined standard error. See docs/evaluate.md.
Scores on benchmarks are not evidence of clinical safety.
"""

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.flag_groups import MODEL
from medlora.flags import Flag, FlagGroup, stage_flags
from medlora.models.builtin import DEFAULT_BASE_MODEL, default_template_for
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "eval")
METHODS = ("loglik", "generate", "perplexity")


@stage_flags(
    MODEL.without("precision"),
    FlagGroup("questions", data_path=DEFAULT_DATA, method="loglik", num_fewshot=0, fewshot_path="", limit=0,
              batch_size=8, output_file="", compare=False, max_new_tokens=32, seed=42, skip_bad_records=False),
    FlagGroup("perplexity", perplexity_path="", cutoff_len=Flag(None, int | None)),
    FlagGroup("lm-evaluation-harness", harness="", tasks="", include_path=""),
)
def main(flags):
    """Evaluate BASE_MODEL (+ LORA_WEIGHTS) on the questions in DATA_PATH, or on lm-eval's TASKS with --harness lm_eval.

    Args:
        base_model: Hub id or local folder (or a merged export); default: the adapter's base, else builtin:smollm2-135m-instruct.
        lora_weights: LoRA adapter folder; empty scores the base model alone.
        prompt_template_name: Default: the adapter's template (medlora_run.json), else the base model's own, else alpaca.
        data_path: Question file (.json/.jsonl), a folder of them, or "a.jsonl,b.jsonl".
        method: loglik (acc, acc_norm, acc_bytes), generate (greedy reply, letter extracted) or perplexity (replies only).
        num_fewshot: Solved examples before each question (with --harness: lm-eval's num_fewshot).
        fewshot_path: Question file to draw examples from; default: the same file, minus the question.
        limit: Score only the first N questions of each file (or lm-eval task), and N held-out records (0: all).
        batch_size: Sequences per forward pass.
        output_file: JSON report with per-question predictions and option scores.
        compare: Score the base (adapter disabled) and the adapter in one run.
        max_new_tokens: --method generate: reply length.
        seed: Few-shot example draw.
        skip_bad_records: Drop invalid question (and --perplexity_path) records, listed and counted by reason, instead of stopping with a list of them.
        perplexity_path: Held-out SFT data (any format finetune.py reads); --method perplexity: default, the adapter's validation records.
        cutoff_len: Perplexity truncation; default: the adapter's cutoff_len, else 256.
        harness: "lm_eval": run lm-evaluation-harness's --tasks on the loaded model instead of --data_path.
        tasks: --harness lm_eval: task names, e.g. medqa_4options,medmcqa,pubmedqa,mmlu_clinical_knowledge.
        include_path: --harness lm_eval: a folder of your own lm-eval task YAML files.
    """
    check_flags(flags)
    inputs = read_inputs(flags)  # every question and record read and checked before any model loads

    from medlora.models.loading import load_for_inference

    loaded = load_for_inference(flags.base_model or (None if flags.lora_weights else DEFAULT_BASE_MODEL),
                                inputs.run if flags.lora_weights else None, flags.load_in_4bit, flags.load_in_8bit,
                                trust_remote_code=flags.trust_remote_code)
    if flags.compare:
        runs = {"base": loaded.model.disable_adapter(), "adapter": nullcontext()}
    else:
        runs = {"adapter" if flags.lora_weights else "model": nullcontext()}
    results, sections = score(flags, inputs, loaded, runs)
    report(flags, inputs, results, sections)


@dataclass
class EvaluationInputs:
    run: object  # the adapter's (or merged export's) RunFolder, or None
    template: object
    question_sets: list  # (QuestionFile, questions scored, few-shot examples per question)
    held_out: list | None  # conversations whose replies' perplexity is measured
    perplexity_path: str  # where held_out came from, for the report
    cutoff_len: int
    task_names: list | None = None  # --harness lm_eval
    task_manager: object = None


def check_flags(flags) -> None:
    if flags.method not in METHODS:
        raise MedLoRAError(f"--method: unknown value {flags.method!r}; use loglik, generate or perplexity")
    if flags.compare and not flags.lora_weights:
        raise MedLoRAError("--compare needs --lora_weights (the base is scored with the adapter disabled)")
    if flags.batch_size < 1 or flags.num_fewshot < 0 or flags.limit < 0:
        raise MedLoRAError("--batch_size must be >= 1, --num_fewshot and --limit >= 0")
    if flags.harness not in ("", "lm_eval"):
        raise MedLoRAError(f"--harness: unknown value {flags.harness!r}; use lm_eval (or leave it out)")
    if flags.harness:
        given = [flag for flag, used in (("--method", flags.method != "loglik"),
                                         ("--data_path", flags.data_path != DEFAULT_DATA),
                                         ("--fewshot_path", flags.fewshot_path),
                                         ("--perplexity_path", flags.perplexity_path),
                                         ("--prompt_template_name", flags.prompt_template_name)) if used]
        if given:
            raise MedLoRAError(f"--harness lm_eval runs lm-eval's own tasks and prompts; {', '.join(given)} "
                               f"{'does' if len(given) == 1 else 'do'} not apply to it")
    elif flags.tasks or flags.include_path:
        raise MedLoRAError("--tasks and --include_path are for --harness lm_eval")


def read_inputs(flags) -> EvaluationInputs:
    """The run folder, template, question sets with their few-shot examples, and held-out records."""
    from medlora.data.questions import load_question_file, pick_fewshot, question_files
    from medlora.data.records import load_held_out
    from medlora.data.templates import PromptTemplate
    from medlora.run_folder import RunFolder

    base_model, lora_weights = flags.base_model, flags.lora_weights
    run = RunFolder.adapter(lora_weights) if lora_weights else (  # (a merged export carries the settings too)
        RunFolder(base_model) if base_model and Path(base_model).is_dir() else None)
    settings = run.settings if run else {}
    template = PromptTemplate.load(flags.prompt_template_name or settings.get("prompt_template_name")
                                   or default_template_for(base_model or settings.get("base_model") or DEFAULT_BASE_MODEL))
    task_names = task_manager = None
    if flags.harness:
        from medlora.evaluation import harness as lm_harness

        task_names = lm_harness.task_names(flags.tasks)
        task_manager = lm_harness.task_manager(task_names, flags.include_path)  # unknown names fail here
    files = ([] if flags.method == "perplexity" or flags.harness
             else [load_question_file(path, flags.skip_bad_records) for path in question_files(flags.data_path)])
    fewshot_pool = load_question_file(flags.fewshot_path, flags.skip_bad_records).questions if flags.fewshot_path else None
    question_sets = []
    for qfile in files:
        questions = qfile.questions[:flags.limit] if flags.limit else qfile.questions
        pool = fewshot_pool if fewshot_pool is not None else qfile.questions
        question_sets.append((qfile, questions, pick_fewshot(questions, pool, flags.num_fewshot, flags.seed,
                                                             fewshot_pool is None)))
    perplexity_path = flags.perplexity_path
    held_out = load_held_out(perplexity_path, flags.skip_bad_records) if perplexity_path else None
    if flags.method == "perplexity" and held_out is None:
        held_out, perplexity_path = validation_records(settings, lora_weights)
    if held_out is not None and flags.limit:
        held_out = held_out[:flags.limit]
    return EvaluationInputs(run, template, question_sets, held_out, perplexity_path,
                            flags.cutoff_len or settings.get("cutoff_len") or 256, task_names, task_manager)


def score(flags, inputs: EvaluationInputs, loaded, runs: dict) -> tuple:
    """(results per run, report sections): each run (the base with the adapter disabled, the adapter) scored."""
    from medlora.evaluation.report import ModelResults, Section
    from medlora.evaluation.scoring import Evaluator

    if flags.harness:
        from medlora.evaluation import harness as lm_harness

        results = lm_harness.score_runs(loaded.model, loaded.tokenizer, runs, inputs.task_names, inputs.task_manager,
                                        flags.num_fewshot, flags.limit, flags.batch_size)
        return results, lm_harness.sections(next(iter(results.values())).tasks)
    evaluator = Evaluator(loaded.model, loaded.tokenizer, inputs.template, flags.batch_size, flags.max_new_tokens)
    score_questions = evaluator.loglik if flags.method == "loglik" else evaluator.generate
    add_eos_token = (inputs.run.settings if inputs.run else {}).get("add_eos_token", True)
    results = {}
    for name, context in runs.items():
        results[name] = ModelResults()
        with context:
            for qfile, questions, shots in inputs.question_sets:
                task = score_questions(questions, shots, desc=f"{name}: {Path(qfile.path).name}")
                results[name].tasks[qfile.path] = dict(format=qfile.format, method=flags.method,
                                                       num_fewshot=flags.num_fewshot, **task)
            if inputs.held_out is not None:
                results[name].perplexity = evaluator.perplexity(inputs.held_out, inputs.cutoff_len, add_eos_token,
                                                                desc=f"{name}: perplexity")
    metrics = ("acc", "acc_norm", "acc_bytes") if flags.method == "loglik" else ("acc", "unparsed")
    sections = []
    for qfile, questions, _ in inputs.question_sets:
        triage = "under_triage" in next(iter(results.values())).tasks[qfile.path]  # scoring found urgency levels
        sections.append(Section(qfile.path, f"{Path(qfile.path).name} ({qfile.format}{', triage' if triage else ''}, "
                                            f"{len(questions)} questions, {flags.method}, {flags.num_fewshot}-shot)",
                                metrics + (("under_triage", "over_triage") if triage else ())))
    return results, sections


def report(flags, inputs: EvaluationInputs, results: dict, sections: list) -> None:
    """The side-by-side table, and with --output_file the JSON report (written atomically)."""
    from medlora.evaluation.report import comparisons, perplexity_label, summary_table

    print(summary_table(results, sections, perplexity_label(inputs.perplexity_path)))
    if flags.output_file:
        harness_name = None
        if flags.harness:
            from medlora.evaluation import harness as lm_harness

            harness_name = lm_harness.describe()
        settings = inputs.run.settings if inputs.run else {}
        written = {
            "settings": {"base_model": flags.base_model or settings.get("base_model") or DEFAULT_BASE_MODEL,
                         "lora_weights": flags.lora_weights,
                         "prompt_template_name": None if flags.harness else inputs.template.name,
                         "method": flags.method, "harness": harness_name, "tasks": inputs.task_names,
                         "include_path": flags.include_path, "num_fewshot": flags.num_fewshot,
                         "fewshot_path": flags.fewshot_path, "limit": flags.limit, "seed": flags.seed,
                         "load_in_4bit": flags.load_in_4bit, "load_in_8bit": flags.load_in_8bit,
                         "perplexity_path": inputs.perplexity_path, "cutoff_len": inputs.cutoff_len,
                         "max_new_tokens": flags.max_new_tokens},
            "results": {name: {"tasks": r.tasks, "perplexity": r.perplexity} for name, r in results.items()},
        }
        if flags.compare:
            written["comparison"] = comparisons(results, sections)
        write_json_atomically(flags.output_file, written)
        print(f"report: {flags.output_file}")
        if flags.compare and sections:
            print(f"chart: {comparison_chart(flags.output_file, results, sections)}")
    print("Benchmark scores say nothing about clinical safety; model outputs are not medical advice.")


def comparison_chart(output_file, results: dict, sections: list) -> Path:
    """Base against adapter, each metric with its error bar, beside the JSON report (report.json -> report.png)."""
    from medlora.plots import plot_comparison

    base, adapter = results["base"].tasks, results["adapter"].tasks
    metrics = [(s.key, m) for s in sections for m in s.metrics if f"{m}_stderr" in base[s.key]]
    label = {s.key: Path(s.key).name for s in sections}
    return plot_comparison({label[k]: base[k] for k in label}, {label[k]: adapter[k] for k in label},
                           [(label[key], metric) for key, metric in metrics], Path(output_file).with_suffix(".png"),
                           "evaluate.py --compare: base vs adapter")


def validation_records(settings: dict, lora_weights: str) -> tuple:
    """(records, description): the adapter's held-out validation records, split again from its training data
    exactly as finetune.py split them (same file, hygiene flags, --val_set_size and --seed)."""
    from medlora.data.hygiene import as_trained
    from medlora.data.records import load_conversations
    from medlora.data.splits import split_validation

    if not settings.get("val_set_size") or not settings.get("data_path"):
        raise MedLoRAError(f"--method perplexity needs --perplexity_path: {lora_weights or 'the model'} has no "
                           f"validation records (trained by MedLoRA with --val_set_size > 0)")
    conversations = load_conversations(settings["data_path"], settings.get("field_map") or "",
                                       settings.get("skip_bad_records", False),
                                       settings.get("split_dialogues", False)).conversations
    _, held_out = split_validation(as_trained(conversations, settings), settings["val_set_size"],
                                   settings.get("seed", 42))
    return held_out, f"validation records of {Path(lora_weights).name} ({settings['data_path']})"


def write_json_atomically(path, data) -> None:
    """Write beside the target and rename, so an interrupted run never leaves half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staging, path)


if __name__ == "__main__":
    cli.run(main)
