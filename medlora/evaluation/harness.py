"""evaluate.py --harness lm_eval: lm-evaluation-harness's own tasks (MedQA, MedMCQA, PubMedQA, the medical
MMLU and CMMLU subjects, or a task YAML of your own) on the model evaluate.py has already loaded.

lm-eval is imported here only, and only when --harness lm_eval is asked for. The loaded model object
(base + adapter, 4/8-bit as loaded) goes to lm-eval's HFLM wrapper, so it is never loaded twice; the base
is scored inside PEFT's disable_adapter(). Prompts are the tasks' own (not the adapter's template), so
the numbers are lm-eval's numbers for that model, task, --num_fewshot and --limit.
"""

import difflib
import importlib
import logging
import sys
from pathlib import Path

from medlora.errors import MedLoRAError
from medlora.evaluation.report import ModelResults, Section
from medlora.paths import PROJECT_ROOT

LM_EVAL_PIN = "lm-eval==0.4.13"
# The standard medical tasks of lm-eval 0.4.13, by name (each downloads its dataset from the Hugging Face hub).
MEDICAL_TASKS = {
    "English": ["medqa_4options", "medmcqa", "pubmedqa", "mmlu_anatomy", "mmlu_clinical_knowledge",
                "mmlu_college_biology", "mmlu_college_medicine", "mmlu_medical_genetics", "mmlu_professional_medicine"],
    "Chinese": ["cmmlu_anatomy", "cmmlu_clinical_knowledge", "cmmlu_college_medicine", "cmmlu_genetics",
                "cmmlu_nutrition", "cmmlu_professional_medicine", "cmmlu_traditional_chinese_medicine",
                "cmmlu_virology"],
}


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise MedLoRAError(f"--harness lm_eval needs lm-evaluation-harness: pip install {LM_EVAL_PIN}") from None
    _import_hf_evaluate()
    return lm_eval


def _import_hf_evaluate() -> None:
    """lm-eval's generation tasks (meqsum, ...) `import evaluate`, Hugging Face's metrics library, which lm-eval
    installs; `python evaluate.py` puts this repository first on sys.path, where that name is this script.
    Importing the library first, past the repository, makes their import find it."""
    if "evaluate" in sys.modules:
        return
    root = PROJECT_ROOT
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    try:
        importlib.import_module("evaluate")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


def task_names(tasks) -> list:
    """--tasks: "a,b" (or the tuple fire makes of it)."""
    names = [str(t).strip() for t in (tasks if isinstance(tasks, (list, tuple)) else str(tasks).split(","))]
    names = [name for name in names if name]
    if not names:
        raise MedLoRAError("--harness lm_eval needs --tasks, e.g. --tasks medqa_4options,medmcqa,pubmedqa")
    return names


def task_manager(names: list, include_path: str = ""):
    """lm-eval's task index, every name checked. Indexing lm-eval's ~15,000 built-in tasks takes tens of
    seconds, so when --include_path holds every task asked for, the built-ins are left out."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in manager.all_tasks for name in names):
            return manager
    manager = TaskManager(include_path=include_path or None)
    for name in names:
        if name not in manager.all_tasks:
            raise MedLoRAError(unknown_task(name, manager.all_tasks, include_path))
    return manager


def unknown_task(name: str, known: list, include_path: str = "") -> str:
    """The one-line error for a task name lm-eval does not have, with the nearest names ("medqa" ->
    medqa_4options: a longer name that starts with it comes first, then a near spelling)."""
    close = sorted(task for task in known if task.startswith(f"{name}_"))[:3]
    close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see docs/evaluate.md for the medical tasks"
    where = f" (nor has --include_path {include_path})" if include_path else ""
    return f"--tasks: lm-eval has no task {name!r}{where}{hint}"


def harness_model(model, tokenizer, batch_size: int):
    """lm-eval's HFLM around the already loaded model and tokenizer (no second load)."""
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it warns that a model object skips its loading options
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def run_tasks(lm, names: list, manager, num_fewshot: int, limit: int, log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on the tasks; its raw output (results, n-shot, n-samples, samples...)."""
    from lm_eval import simple_evaluate

    try:
        return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit or None,
                               task_manager=manager, log_samples=log_samples)
    except ConnectionError as error:  # datasets offline or the hub unreachable
        raise MedLoRAError(f"--tasks {','.join(names)}: a dataset could not be downloaded ({error}); lm-eval's "
                           f"hub tasks need network access the first time (then the Hugging Face cache)") from None


def task_metrics(output: dict) -> dict:
    """{task: {metric: value, metric_stderr: value or None, ..., n, num_fewshot, metrics: [names]}} from
    simple_evaluate's output. A metric under a filter other than "none" is named "metric,filter"."""
    tasks = {}
    for task, entry in output["results"].items():
        metrics = {}
        for key, value in entry.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else key
            stderr = entry.get(f"{metric}_stderr,{filter_name}")
            metrics[name] = value
            if stderr is not None:
                metrics[f"{name}_stderr"] = None if stderr == "N/A" else stderr
        samples = output.get("n-samples", {}).get(task, {})
        tasks[task] = dict(metrics, metrics=[m for m in metrics if not m.endswith("_stderr")],
                           n=samples.get("effective"), num_fewshot=output.get("n-shot", {}).get(task))
    return tasks


def score_runs(model, tokenizer, runs: dict, names: list, manager, num_fewshot: int, limit: int,
               batch_size: int) -> dict:
    """{run name: ModelResults} with each run's context (the base: the adapter disabled) around lm-eval."""
    lm = harness_model(model, tokenizer, batch_size)
    results = {}
    for name, context in runs.items():
        with context:
            results[name] = ModelResults(task_metrics(run_tasks(lm, names, manager, num_fewshot, limit)))
    return results


def sections(tasks: dict) -> list:
    return [Section(task, f"{task} ({describe()}, "
                          f"{'group' if entry['n'] is None else str(entry['n']) + ' questions'}, "
                          f"{entry['num_fewshot']}-shot)", tuple(entry["metrics"])) for task, entry in tasks.items()]


def describe() -> str:
    return f"lm-eval {_lm_eval().__version__}"
