"""What a run folder is: the one place that reads, writes and checks the folders MedLoRA's stages write.

A run folder holds an adapter (adapter_config.json + adapter_model.safetensors) or, after full fine-tuning, a
whole model, plus the tokenizer and medlora_run.json: the settings the run was trained with, so later stages
need no repeated flags. Hub/PEFT adapter folders without medlora_run.json are run folders with no settings.
Checkpoints are checkpoint-N subfolders; one whose save finished carries a marker file.
"""

import json
import logging
import os
from pathlib import Path

from medlora.errors import MedLoRAError

logger = logging.getLogger(__name__)

RUN_SETTINGS_FILE = "medlora_run.json"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_COMPLETE = "medlora_checkpoint_complete"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _describe_folder_problem(folder: Path) -> str | None:
    """Why folder is not a usable adapter folder, or None when it is."""
    if not folder.exists():
        return "no such folder"
    if not folder.is_dir():
        return "is a file, not an adapter folder"
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        if not any(folder.iterdir()):
            return "the folder is empty"
        return f"no {ADAPTER_CONFIG}; is this a LoRA adapter folder?"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{ADAPTER_CONFIG} is not valid JSON ({error})"
    weights = [p for p in folder.iterdir() if p.name.startswith("adapter_model") and p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        return "no adapter weights (adapter_model.safetensors) beside adapter_config.json"
    for path in weights:
        if path.suffix == ".safetensors" and (problem := _safetensors_problem(path)):
            return f"{path.name}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A truncated or corrupt safetensors file, caught from its header: 8 bytes of header length, the JSON
    header (each tensor's byte range), then the data, which must reach the last range's end."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    if size < 8:
        return "truncated or empty file"
    with path.open("rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        if 8 + header_length > size:
            return f"truncated or corrupt: {size} bytes, its header alone would take {8 + header_length}"
        try:
            header = json.loads(handle.read(header_length))
            data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                           default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as error:
            return f"corrupt weights file (unreadable header: {error})"
    if 8 + header_length + data_end > size:
        return f"truncated: {size} bytes, its header describes {8 + header_length + data_end}"
    try:
        with safe_open(path, framework="pt") as tensors:
            names = list(tensors.keys())
    except (SafetensorError, OSError, ValueError) as error:
        return f"corrupt weights file ({str(error).splitlines()[0]})"
    return None if names else "the weights file holds no tensors"


def looks_like_local_path(name: str) -> bool:
    """A hub id is OWNER/NAME; anything that starts like a path, or exists, is a local folder."""
    return str(name).startswith((".", "/", "~")) or Path(str(name)).expanduser().exists() or str(name).count("/") > 1


class RunFolder:
    """A folder written by a MedLoRA stage (or a PEFT adapter folder); `settings` is its medlora_run.json."""

    def __init__(self, path):
        self.path = Path(str(path)).expanduser()
        self.hub_id = None  # set for a hub adapter id, which has no local folder to read
        self._settings = None

    # ---- reading ----------------------------------------------------------------------------------------------
    @classmethod
    def adapter(cls, path, flag: str = "--lora_weights", allow_hub: bool = True) -> "RunFolder":
        """The adapter folder at path, checked before any model loads: one line naming the flag, folder and
        problem when it is missing, empty, has no adapter_config.json or no/corrupt/truncated weights.
        With allow_hub, an OWNER/NAME that is no local folder is a hub adapter id, which PEFT downloads."""
        folder = cls(path)
        if not str(path):
            raise MedLoRAError(f"{flag} is empty; give the adapter folder that finetune.py wrote")
        if allow_hub and not looks_like_local_path(str(path)) and str(path).count("/") == 1:
            folder.hub_id = str(path)
            return folder
        problem = _describe_folder_problem(folder.path)
        if problem:
            hint = " (download a hub adapter first: hf download OWNER/NAME --local-dir ./NAME)" \
                if not folder.path.exists() and not looks_like_local_path(str(path)) else ""
            raise MedLoRAError(f"{flag} {path}: {problem}{hint}")
        return folder

    @property
    def settings(self) -> dict:
        """The settings the run was trained with, {} for a folder MedLoRA did not write (read once)."""
        if self._settings is None:
            path = self.path / RUN_SETTINGS_FILE
            try:
                self._settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise MedLoRAError(f"{path}: not valid JSON ({error})") from None
        return self._settings

    @property
    def peft_config(self) -> dict:
        path = self.path / ADAPTER_CONFIG
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    @property
    def stage(self) -> str | None:
        return self.settings.get("stage")

    @property
    def has_tokenizer(self) -> bool:
        """Stages save the tokenizer beside the adapter (it may carry an added pad token): load it from here."""
        return (self.path / "tokenizer_config.json").is_file()

    def recorded_base_model(self) -> str | None:
        """The base the adapter was trained on: medlora_run.json, else PEFT's base_model_name_or_path."""
        return self.settings.get("base_model") or self.peft_config.get("base_model_name_or_path") or None

    def inherit(self, base_model: str = "", template_name: str = "") -> tuple:
        """(base model, template name): the flags where given, else what this run was trained with; each
        inherited value is printed once so the user sees where it came from."""
        inherited = {}
        if not base_model and (recorded := self.recorded_base_model()):
            base_model = inherited["base_model"] = recorded
        if not template_name and (recorded := self.settings.get("prompt_template_name")):
            template_name = inherited["prompt_template_name"] = recorded
        if inherited:
            logger.info("inherited from %s: %s", self.path,
                        ", ".join(f"{name}={value}" for name, value in inherited.items()))
        return base_model, template_name

    # ---- writing ----------------------------------------------------------------------------------------------
    def write_settings(self, settings: dict) -> Path:
        path = self.path / RUN_SETTINGS_FILE
        path.write_text(json.dumps(settings, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        self._settings = None
        return path

    def holds_finished_run(self) -> bool:
        return (self.path / RUN_SETTINGS_FILE).is_file() and any(self.path.glob("*.safetensors"))

    def refuse_finished_run(self, flag: str = "--output_dir") -> None:
        """Stop before any work when this folder holds a finished run: training into it would replace it."""
        if self.holds_finished_run():
            raise MedLoRAError(f"{flag} {self.path} already holds a finished run; pass --overwrite_output_dir to "
                               f"replace it, --resume_from_checkpoint True to continue it, or choose another folder")

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def latest_complete_checkpoint(self) -> str | None:
        """The newest checkpoint-N folder whose save finished (a run killed mid-save leaves one without the marker)."""
        folders = [p for p in self.path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        complete = [p for p in folders if (p / CHECKPOINT_COMPLETE).is_file()]
        return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None

    def resume_checkpoint(self, resume_from_checkpoint) -> str | None:
        """--resume_from_checkpoint: True (the newest complete checkpoint here), a checkpoint folder, or None."""
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
            checkpoint = self.latest_complete_checkpoint()
            if checkpoint is None:
                raise MedLoRAError(f"--resume_from_checkpoint True: no complete checkpoint in {self.path}")
            return checkpoint
        if resume_from_checkpoint and not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.json")):
            raise MedLoRAError(f"--resume_from_checkpoint {resume_from_checkpoint}: not a checkpoint folder")
        return resume_from_checkpoint or None
