"""The JSON of resolved settings saved beside every adapter, so later stages need no repeated flags."""

import json
from pathlib import Path

RUN_SETTINGS_FILE = "medlora_run.json"


def save_run_settings(output_dir, settings: dict) -> Path:
    path = Path(output_dir) / RUN_SETTINGS_FILE
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def load_run_settings(adapter_dir) -> dict:
    """The settings an adapter was trained with, or {} for a folder MedLoRA did not write (a hub adapter)."""
    path = Path(str(adapter_dir)) / RUN_SETTINGS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
