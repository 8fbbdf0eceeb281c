"""Pictures where people would rather look than read: a run's loss curves (written by every training stage into its
run folder, as LLaMA-Factory's plot_loss does) and evaluate.py --compare's chart of base against adapter.

matplotlib's object API (Figure, no pyplot): no display, no global backend switched in the user's process."""

from pathlib import Path

LOSS_CURVES = "loss_curves.png"


def plot_loss_curves(log_history: list, path, title: str = "") -> Path:
    """Training loss (each logged step) and validation loss (each evaluation) against the optimizer step."""
    from matplotlib.figure import Figure

    training = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    validation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure = Figure(figsize=(7, 4.2), dpi=110)
    axes = figure.add_subplot()
    for points, label, style in ((training, "training loss", "-o"), (validation, "validation loss", "--s")):
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=3)
    if not training:
        summary = next((entry for entry in reversed(log_history) if "train_loss" in entry), None)
        note = "no training loss logged (fewer steps than --logging_steps)"
        if summary is not None:
            note += f"; mean training loss {summary['train_loss']:.4f}"
        axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes, fontsize=9)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title or "loss")
    axes.grid(alpha=0.3)
    if training or validation:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return Path(path)


def plot_comparison(base: dict, adapter: dict, metrics: list, path, title: str = "") -> Path:
    """Base against adapter, one pair of bars per (task, metric), each with a ±1 standard error bar.
    base, adapter: {label: {metric: value, metric_stderr: value or None}}; metrics: [(label, metric)]."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.1 * len(metrics) + 2), 4.6), dpi=110)
    axes = figure.add_subplot()
    width = 0.38
    for offset, (name, results) in ((-width / 2, ("base", base)), (width / 2, ("adapter", adapter))):
        values = [results[label][metric] for label, metric in metrics]
        errors = [results[label].get(f"{metric}_stderr") or 0.0 for label, metric in metrics]
        axes.bar([i + offset for i in range(len(metrics))], values, width, yerr=errors, capsize=3, label=name)
    axes.set_xticks(range(len(metrics)), [f"{label}\n{metric}" for label, metric in metrics], fontsize=7,
                    rotation=20, ha="right")
    axes.set_ylabel("score (error bars: ±1 standard error)")
    axes.set_ylim(0, max(1.0, *(results[label][metric] for results in (base, adapter) for label, metric in metrics)))
    axes.set_title(title or "base vs adapter")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")
    return Path(path)
