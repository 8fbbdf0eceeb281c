"""The README's own commands: --help of every script and --list_templates (the demo launcher: tests/test_real_model.py)."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_script, stage_function

STAGE_SCRIPTS = ["finetune", "pretrain", "dpo", "reward", "rl", "chat", "generate", "serve", "evaluate", "export_gguf",
                 "export_hf_checkpoint", "export_state_dict_checkpoint"]


def test_every_flag_of_every_script_has_a_description():
    from medlora.flags import flag_descriptions

    undocumented = {script: [name for name, text in flag_descriptions(stage_function(script)).items() if not text]
                    for script in STAGE_SCRIPTS}
    assert undocumented == {script: [] for script in STAGE_SCRIPTS}


@pytest.mark.slow
def test_help_lists_every_flag_with_its_description_and_default():
    import inspect

    from medlora.flags import flag_descriptions

    processes = {script: subprocess.Popen([sys.executable, f"{script}.py", "--help"], cwd=ROOT, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in STAGE_SCRIPTS}
    for script, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{script}.py --help: {stderr[-2000:]}"
        function = stage_function(script)
        flags = stdout.split("Flags:", 1)[1]
        for name, description in flag_descriptions(function).items():
            default = inspect.signature(function).parameters[name].default
            assert f"  --{name} (default: {default!r})" in flags, (script, name)
            assert " ".join(description.split()[:4]) in " ".join(flags.split()), (script, name)
        assert stderr.strip() == "", f"{script}.py --help printed to stderr: {stderr[-2000:]}"


@pytest.mark.slow
def test_help_imports_no_heavy_library():
    """--help answers at once: it must not import torch, transformers, TRL, PEFT or datasets."""
    for script in STAGE_SCRIPTS:
        result = subprocess.run([sys.executable, "-X", "importtime", f"{script}.py", "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
        assert not imported & {"torch", "transformers", "trl", "peft", "datasets", "gradio"}, script


@pytest.mark.slow
def test_list_templates():
    result = run_script("finetune.py", "--list_templates")
    assert result.stdout.splitlines()[0].startswith("alpaca ")
    assert len(result.stdout.splitlines()) >= 12


@pytest.mark.slow
def test_no_script_opens_with_the_bitsandbytes_cpu_notice():
    """medlora/__init__.py filters it, which works only if a script imports medlora before anything that
    imports bitsandbytes (TRL, PEFT): each script is imported in a fresh process, side by side."""
    scripts = sorted(path.stem for path in ROOT.glob("*.py"))
    processes = {name: subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=ROOT, text=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for name in scripts}
    assert {"finetune", "generate", "chat", "dpo", "rl"} <= processes.keys()
    for name, process in processes.items():
        stderr = process.communicate(timeout=300)[1]
        assert process.returncode == 0, f"import {name}: {stderr[-2000:]}"
        assert "kernels-community" not in stderr, f"{name}.py: {stderr[-2000:]}"


def documented_commands() -> list:
    """(file, command) for every `python X.py ...` / `torchrun ... X.py ...` line in README.md and docs/*.md code
    blocks, backslash continuations joined and trailing comments dropped."""
    import re

    commands = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_block, pending = False, ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            line = pending + " " + line.split("  #")[0].strip() if pending else line.split("  #")[0].strip()
            if line.endswith("\\"):
                pending = line[:-1].strip()
                continue
            pending = ""
            if re.search(r"(^|\s)(python|torchrun)\b.*?\b\w+\.py\b", line) and not line.startswith("#"):
                commands.append((path.name, line))
    return commands


def test_every_documented_command_uses_only_flags_its_script_has():
    """A renamed or removed flag breaks the documented commands that use it: caught here, at once."""
    import re
    import shlex

    from medlora.cli import unknown_flag_error
    from medlora.flags import canonical_argv

    checked, problems = 0, []
    for source, command in documented_commands():
        words = shlex.split(command.replace("...", ""))
        script = next((word for word in words if re.fullmatch(r"\w+\.py", word)), None)
        if script is None or not (ROOT / script).is_file():
            continue
        if script.startswith(("merge", "benchmark")) or script == "demo.py":
            continue
        argv = words[words.index(script) + 1:]
        function = stage_function(script[:-3])
        problem = unknown_flag_error(function, canonical_argv(function, argv))
        if problem:
            problems.append(f"{source}: {command}: {problem}")
        checked += 1
    assert checked >= 40
    assert problems == []
