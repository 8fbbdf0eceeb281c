"""Score a base model and a LoRA adapter on medical multiple-choice questions (MedQA, MedMCQA, PubMedQA
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
from pathlib import Path

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.models.builtin import DEFAULT_BASE_MODEL, default_template_for
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "eval")
METHODS = ("loglik", "generate", "perplexity")


def main(
    base_model: str = "",  # hub id or local folder (or a merged export); default: the adapter's base, else builtin:smollm2-135m-instruct
    lora_weights: str = "",  # LoRA adapter folder; empty scores the base model alone
    data_path: str = DEFAULT_DATA,  # question file (.json/.jsonl), a folder of them, or "a.jsonl,b.jsonl"
    method: str = "loglik",  # loglik (acc, acc_norm, acc_bytes), generate (greedy reply, letter extracted) or perplexity (replies only)
    num_fewshot: int = 0,  # solved examples before each question (with --harness: lm-eval's num_fewshot)
    fewshot_path: str = "",  # question file to draw examples from; default: the same file, minus the question
    limit: int = 0,  # score only the first N questions of each file (or lm-eval task), and N held-out records (0: all)
    batch_size: int = 8,  # sequences per forward pass
    prompt_template_name: str = "",  # default: the adapter's template (medlora_run.json), else alpaca
    output_file: str = "",  # JSON report with per-question predictions and option scores
    compare: bool = False,  # score the base (adapter disabled) and the adapter in one run
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    perplexity_path: str = "",  # held-out SFT data (any format finetune.py reads); --method perplexity: default, the adapter's validation records
    skip_bad_records: bool = False,  # drop invalid question (and --perplexity_path) records, listed and counted by reason, instead of stopping with a list of them
    cutoff_len: int | None = None,  # perplexity truncation; default: the adapter's cutoff_len, else 256
    max_new_tokens: int = 32,  # --method generate: reply length
    seed: int = 42,  # few-shot example draw
    trust_remote_code: bool = False,
    harness: str = "",  # "lm_eval": run lm-evaluation-harness's --tasks on the loaded model instead of --data_path
    tasks: str = "",  # --harness lm_eval: task names, e.g. medqa_4options,medmcqa,pubmedqa,mmlu_clinical_knowledge
    include_path: str = "",  # --harness lm_eval: a folder of your own lm-eval task YAML files
):
    """Evaluate BASE_MODEL (+ LORA_WEIGHTS) on the questions in DATA_PATH, or on lm-eval's TASKS with --harness lm_eval."""
    from medlora.data.questions import load_question_file, pick_fewshot, question_files
    from medlora.data.records import load_held_out
    from medlora.data.templates import PromptTemplate
    from medlora.evaluation.report import (
        ModelResults,
        Section,
        comparisons,
        perplexity_label,
        summary_table,
    )
    from medlora.evaluation.scoring import Evaluator
    from medlora.run_folder import RunFolder

    # ---- check flags and read every question before any model loads ------------------------------------------
    if method not in METHODS:
        raise MedLoRAError(f"--method: unknown value {method!r}; use loglik, generate or perplexity")
    if compare and not lora_weights:
        raise MedLoRAError("--compare needs --lora_weights (the base is scored with the adapter disabled)")
    if batch_size < 1 or num_fewshot < 0 or limit < 0:
        raise MedLoRAError("--batch_size must be >= 1, --num_fewshot and --limit >= 0")
    if harness not in ("", "lm_eval"):
        raise MedLoRAError(f"--harness: unknown value {harness!r}; use lm_eval (or leave it out)")
    if harness:
        given = [flag for flag, used in (("--method", method != "loglik"), ("--data_path", data_path != DEFAULT_DATA),
                                         ("--fewshot_path", fewshot_path), ("--perplexity_path", perplexity_path),
                                         ("--prompt_template_name", prompt_template_name)) if used]
        if given:
            raise MedLoRAError(f"--harness lm_eval runs lm-eval's own tasks and prompts; {', '.join(given)} "
                               f"{'does' if len(given) == 1 else 'do'} not apply to it")
        from medlora.evaluation import harness as lm_harness

        task_names = lm_harness.task_names(tasks)
        manager = lm_harness.task_manager(task_names, include_path)  # unknown task names fail before the model loads
    elif tasks or include_path:
        raise MedLoRAError("--tasks and --include_path are for --harness lm_eval")
    run = RunFolder.adapter(lora_weights) if lora_weights else (  # (a merged export carries the settings too)
        RunFolder(base_model) if base_model and Path(base_model).is_dir() else None)
    settings = run.settings if run else {}
    template = PromptTemplate.load(prompt_template_name or settings.get("prompt_template_name") or default_template_for(
        base_model or settings.get("base_model") or DEFAULT_BASE_MODEL))
    files = [] if method == "perplexity" or harness else [load_question_file(path, skip_bad_records)
                                                          for path in question_files(data_path)]
    fewshot_pool = load_question_file(fewshot_path, skip_bad_records).questions if fewshot_path else None
    question_sets = []
    for qfile in files:
        questions = qfile.questions[:limit] if limit else qfile.questions
        pool = fewshot_pool if fewshot_pool is not None else qfile.questions
        question_sets.append((qfile, questions, pick_fewshot(questions, pool, num_fewshot, seed, fewshot_pool is None)))
    held_out = load_held_out(perplexity_path, skip_bad_records) if perplexity_path else None
    if method == "perplexity" and held_out is None:
        held_out, perplexity_path = validation_records(settings, lora_weights)
    if held_out is not None and limit:
        held_out = held_out[:limit]
    cutoff_len = cutoff_len or settings.get("cutoff_len") or 256

    # ---- model ------------------------------------------------------------------------------------------------
    from medlora.models.loading import load_for_inference

    loaded = load_for_inference(base_model or (None if lora_weights else DEFAULT_BASE_MODEL), run if lora_weights else None,
                                load_in_4bit, load_in_8bit, trust_remote_code=trust_remote_code)
    if compare:
        runs = {"base": loaded.model.disable_adapter(), "adapter": nullcontext()}
    else:
        runs = {"adapter" if lora_weights else "model": nullcontext()}

    # ---- score ------------------------------------------------------------------------------------------------
    if harness:
        results = lm_harness.score_runs(loaded.model, loaded.tokenizer, runs, task_names, manager, num_fewshot,
                                        limit, batch_size)
        sections = lm_harness.sections(next(iter(results.values())).tasks)
    else:
        evaluator = Evaluator(loaded.model, loaded.tokenizer, template, batch_size, max_new_tokens)
        score = evaluator.loglik if method == "loglik" else evaluator.generate
        results = {}
        for name, context in runs.items():
            results[name] = ModelResults()
            with context:
                for qfile, questions, shots in question_sets:
                    task = score(questions, shots, desc=f"{name}: {Path(qfile.path).name}")
                    results[name].tasks[qfile.path] = dict(format=qfile.format, method=method,
                                                           num_fewshot=num_fewshot, **task)
                if held_out is not None:
                    results[name].perplexity = evaluator.perplexity(
                        held_out, cutoff_len, settings.get("add_eos_token", True), desc=f"{name}: perplexity")
        metrics = ("acc", "acc_norm", "acc_bytes") if method == "loglik" else ("acc", "unparsed")
        sections = [Section(qfile.path, f"{Path(qfile.path).name} ({qfile.format}, {len(questions)} questions, "
                                        f"{method}, {num_fewshot}-shot)", metrics)
                    for qfile, questions, _ in question_sets]

    # ---- report -----------------------------------------------------------------------------------------------
    print(summary_table(results, sections, perplexity_label(perplexity_path)))
    if output_file:
        report = {
            "settings": {"base_model": base_model or settings.get("base_model") or DEFAULT_BASE_MODEL,
                         "lora_weights": lora_weights, "prompt_template_name": None if harness else template.name,
                         "method": method, "harness": lm_harness.describe() if harness else None,
                         "tasks": task_names if harness else None, "include_path": include_path,
                         "num_fewshot": num_fewshot, "fewshot_path": fewshot_path, "limit": limit, "seed": seed,
                         "load_in_4bit": load_in_4bit, "load_in_8bit": load_in_8bit,
                         "perplexity_path": perplexity_path, "cutoff_len": cutoff_len, "max_new_tokens": max_new_tokens},
            "results": {name: {"tasks": r.tasks, "perplexity": r.perplexity} for name, r in results.items()},
        }
        if compare:
            report["comparison"] = comparisons(results, sections)
        write_json_atomically(output_file, report)
        print(f"report: {output_file}")
    print("Benchmark scores say nothing about clinical safety; model outputs are not medical advice.")


def validation_records(settings: dict, lora_weights: str) -> tuple:
    """(records, description): the adapter's held-out validation records, split again from its training data
    exactly as finetune.py split them (same file, --val_set_size and --seed)."""
    from medlora.data.records import load_conversations
    from medlora.data.splits import split_validation

    if not settings.get("val_set_size") or not settings.get("data_path"):
        raise MedLoRAError(f"--method perplexity needs --perplexity_path: {lora_weights or 'the model'} has no "
                           f"validation records (trained by MedLoRA with --val_set_size > 0)")
    conversations = load_conversations(settings["data_path"], settings.get("field_map") or "",
                                       settings.get("skip_bad_records", False),
                                       settings.get("split_dialogues", False)).conversations
    _, held_out = split_validation(conversations, settings["val_set_size"], settings.get("seed", 42))
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
