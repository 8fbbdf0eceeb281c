"""Saving what a stage trained: an adapter (or a whole model after full fine-tuning), its tokenizer,
medlora_run.json, the training log and its loss curves (loss_curves.png), written to a staging folder first and
moved into place."""

import json
import shutil
from pathlib import Path

from medlora.run_folder import RunFolder


def save_trained_model(model, tokenizer, output_dir, settings: dict, log_history=None) -> None:
    """Save through the model's own save_pretrained (never through a patched state_dict, which is how
    alpaca-lora users got empty adapter files), then check that the weights file holds tensors."""
    output_dir = Path(output_dir)
    staging = output_dir / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    RunFolder(staging).write_settings(settings)
    if log_history is not None:
        from medlora.plots import LOSS_CURVES, plot_loss_curves

        (staging / "training_log.json").write_text(json.dumps(log_history, indent=1) + "\n")
        plot_loss_curves(log_history, staging / LOSS_CURVES, f"{settings.get('stage', 'training')}: "
                                                             f"{Path(output_dir).name} on {settings.get('base_model')}")
    check_weights_not_empty(staging)
    output_dir.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        destination = output_dir / item.name
        if destination.is_dir():
            shutil.rmtree(destination)
        item.replace(destination)
    staging.rmdir()


def check_weights_not_empty(folder: Path) -> None:
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"{folder}: no .safetensors weights were written")
    for path in files:
        with safe_open(path, framework="pt") as saved:
            if not list(saved.keys()):
                raise RuntimeError(f"{path}: the saved weights hold no tensors")
