"""RunFolder: the one place that reads run/adapter folders, and its one-line errors for broken ones."""

import json
import logging

import pytest

from medlora.errors import MedLoRAError
from medlora.run_folder import CHECKPOINT_COMPLETE, RunFolder


def broken_copy(tiny_adapter, tmp_path, damage) -> str:
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    damage(folder)
    return str(folder)


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


@pytest.mark.slow
@pytest.mark.parametrize("damage, problem", [
    (lambda f: (f / "adapter_model.safetensors").unlink(),
     "no adapter weights (adapter_model.safetensors) beside adapter_config.json"),
    (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json; is this a LoRA adapter folder?"),
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "adapter_config.json is not valid JSON"),
    (lambda f: truncate(f / "adapter_model.safetensors", lambda n: n - 100),
     "adapter_model.safetensors: truncated: "),
    (lambda f: truncate(f / "adapter_model.safetensors", lambda n: 4), "adapter_model.safetensors: truncated or empty"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!"),
     "adapter_model.safetensors: corrupt weights file"),
])
def test_a_broken_adapter_folder_is_named_with_its_problem(tiny_adapter, tmp_path, damage, problem):
    folder = broken_copy(tiny_adapter, tmp_path, damage)
    with pytest.raises(MedLoRAError) as raised:
        RunFolder.adapter(folder)
    assert str(raised.value).startswith(f"--lora_weights {folder}: {problem}")
    assert "\n" not in str(raised.value)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(MedLoRAError, match="no such folder$"):
        RunFolder.adapter(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedLoRAError, match="the folder is empty$"):
        RunFolder.adapter(str(tmp_path / "empty"), flag="--reward_model")
    with pytest.raises(MedLoRAError, match="^--lora_weights is empty"):
        RunFolder.adapter("")


def test_a_hub_adapter_id_is_left_to_peft_and_a_path_is_not(tmp_path):
    assert RunFolder.adapter("tloen/alpaca-lora-7b").hub_id == "tloen/alpaca-lora-7b"
    with pytest.raises(MedLoRAError, match="no such folder"):
        RunFolder.adapter("./tloen/alpaca-lora-7b")
    with pytest.raises(MedLoRAError, match="no such folder"):
        RunFolder.adapter("tloen/alpaca-lora-7b", allow_hub=False)


@pytest.mark.slow
def test_settings_are_inherited_with_a_line_saying_so(tiny_adapter, caplog):
    folder = RunFolder.adapter(tiny_adapter)
    recorded = json.loads((tiny_adapter / "medlora_run.json").read_text())
    with caplog.at_level(logging.INFO, logger="medlora.run_folder"):
        assert folder.inherit() == (recorded["base_model"], recorded["prompt_template_name"])
    assert caplog.messages == [f"inherited from {tiny_adapter}: base_model={recorded['base_model']}, "
                               f"prompt_template_name={recorded['prompt_template_name']}"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="medlora.run_folder"):
        assert folder.inherit("other/base", "chatml") == ("other/base", "chatml")
    assert caplog.messages == []


def test_the_newest_complete_checkpoint_is_the_one_resumed(tmp_path):
    for step, complete in [(2, True), (10, True), (12, False)]:
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "trainer_state.json").write_text("{}")
        if complete:
            (checkpoint / CHECKPOINT_COMPLETE).touch()
    run = RunFolder(tmp_path)
    assert run.resume_checkpoint(True) == str(tmp_path / "checkpoint-10")
    assert run.resume_checkpoint("true") == str(tmp_path / "checkpoint-10")
    assert run.resume_checkpoint(None) is None
    with pytest.raises(MedLoRAError, match="not a checkpoint folder"):
        run.resume_checkpoint(str(tmp_path))
    with pytest.raises(MedLoRAError, match="no complete checkpoint"):
        RunFolder(tmp_path / "checkpoint-12").resume_checkpoint(True)


@pytest.mark.slow
@pytest.mark.parametrize("script, flag", [
    ("chat.py", "--lora_weights"), ("generate.py", "--lora_weights"), ("evaluate.py", "--lora_weights"),
    ("export_hf_checkpoint.py", "--lora_weights"), ("export_state_dict_checkpoint.py", "--lora_weights"),
    ("finetune.py", "--lora_weights"), ("dpo.py", "--lora_weights"), ("rl.py", "--reward_model"),
])
def test_every_stage_refuses_an_adapter_without_weights_in_one_line(tiny_adapter, tmp_path, script, flag):
    from tests.conftest import TINY, run_script

    folder = broken_copy(tiny_adapter, tmp_path, lambda f: (f / "adapter_model.safetensors").unlink())
    output = tmp_path / "out"
    extra = {"chat.py": ["--prompt", "hi"], "generate.py": ["--data_file", "data/sample_questions.json",
                                                          "--predictions_file", output / "p.jsonl"]}.get(script, [])
    if script.startswith(("finetune", "dpo", "rl", "export")):
        extra = ["--output_dir", output]
    result = run_script(script, "--base_model", TINY, flag, folder, *extra, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: {flag} {folder}: no adapter weights (adapter_model.safetensors) beside adapter_config.json"
    assert "Traceback" not in result.stderr
    assert not output.exists()
