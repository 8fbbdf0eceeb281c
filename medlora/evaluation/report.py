"""What evaluate.py prints and writes: the models side by side, each accuracy with its standard error,
and (with --compare) whether the adapter's difference from the base is larger than noise.

Standard errors are lm-evaluation-harness's for a mean (lm_eval.api.metrics.mean_stderr): the sample
standard deviation of the per-question scores (n - 1 in the denominator) over sqrt(n); with fewer than
two questions there is none. The base-vs-adapter test is the one the harness's users apply by eye: the
difference counts only when it exceeds twice the combined standard error sqrt(SE_base^2 + SE_adapter^2).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelResults:
    tasks: dict = field(default_factory=dict)  # task key (question file path or lm-eval task) -> metrics
    perplexity: dict | None = None


@dataclass
class Section:
    """One block of the table: a task, its heading and the metrics shown for it."""

    key: str
    title: str
    metrics: tuple


def mean_stderr(values) -> float | None:
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n); None below two values."""
    values = [float(v) for v in values]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))


def mean_with_stderr(name: str, values) -> dict:
    """{name: mean, name_stderr: its standard error} of per-question scores (True/False count as 1/0)."""
    values = [float(v) for v in values]
    return {name: sum(values) / len(values) if values else 0.0, f"{name}_stderr": mean_stderr(values)}


def difference(base: dict, adapter: dict, metric: str) -> dict:
    """adapter - base for one metric, and whether it exceeds twice the combined standard error
    (None when either side has no standard error)."""
    delta = adapter[metric] - base[metric]
    errors = (base.get(f"{metric}_stderr"), adapter.get(f"{metric}_stderr"))
    if None in errors:
        return {"difference": delta, "combined_stderr": None, "exceeds_2se": None}
    combined = math.sqrt(errors[0] ** 2 + errors[1] ** 2)
    return {"difference": delta, "combined_stderr": combined, "exceeds_2se": abs(delta) > 2 * combined}


def comparisons(results: dict, sections: list) -> dict:
    """{task key: {metric: difference(...)}} for every metric that has a standard error."""
    base, adapter = results["base"].tasks, results["adapter"].tasks
    return {s.key: {m: difference(base[s.key], adapter[s.key], m) for m in s.metrics if f"{m}_stderr" in base[s.key]}
            for s in sections}


def _with_stderr(task: dict, metric: str) -> str:
    value = task[metric]
    if f"{metric}_stderr" not in task:
        return f"{value}" if isinstance(value, int) else f"{value:.4f}"
    stderr = task[f"{metric}_stderr"]
    return f"{value:.4f} ± {'N/A' if stderr is None else f'{stderr:.4f}'}"


def _difference_cell(compared: dict) -> str:
    text = f"{compared['difference']:+.4f}"
    if compared["combined_stderr"] is None:
        return f"{text} (no SE)"
    sign = ">" if compared["exceeds_2se"] else "<="
    return f"{text} {sign} 2SE={2 * compared['combined_stderr']:.4f}"


def summary_table(results: dict, sections: list, perplexity_label: str = "") -> str:
    """One column per model (value ± standard error), one row per metric; with base and adapter, a last
    column with their difference against twice the combined standard error."""
    names = list(results)
    compared = comparisons(results, sections) if names == ["base", "adapter"] else {}
    compare = any(compared.values())
    lines = [f"{'':34s}" + "".join(f"{name:>18s}" for name in names) + ("    adapter - base" if compare else "")]

    def row(label, cells, last=""):
        lines.append(f"  {label:32s}" + "".join(f"{cell:>18s}" for cell in cells) + (f"    {last}" if last else ""))

    for section in sections:
        lines.append(section.title)
        for metric in section.metrics:
            last = _difference_cell(compared[section.key][metric]) if metric in compared.get(section.key, {}) else ""
            row(metric, [_with_stderr(results[name].tasks[section.key], metric) for name in names], last)
    if perplexity_label:
        first = results[names[0]].perplexity
        lines.append(f"{perplexity_label} ({first['records']} records, {first['tokens']} reply tokens, "
                     f"{first['truncated']} truncated at cutoff_len, {first['dropped']} dropped)")
        row("perplexity", [f"{results[name].perplexity['perplexity']:.3f}" for name in names])
    if compare:
        lines.append("adapter - base: a difference within twice the combined standard error (<= 2SE) is not "
                     "distinguishable from noise on these questions.")
    return "\n".join(lines)


def perplexity_label(perplexity_path: str) -> str:
    return Path(perplexity_path).name if perplexity_path and Path(perplexity_path).exists() else perplexity_path
