"""The README's own commands: --help and --list_templates (the demo launcher: tests/test_real_model.py)."""

import os
import subprocess
import sys

from tests.conftest import ROOT, run_script


def test_help_documents_every_flag():
    import inspect

    import finetune

    result = run_script("finetune.py", "--help", env=dict(os.environ, PAGER="cat"))
    for name, parameter in inspect.signature(finetune.train).parameters.items():
        assert f"--{name}" in result.stdout + result.stderr
    # Every flag has a sentence of its own under it, not only its type and default.
    docstring = finetune.train.__doc__
    for name in inspect.signature(finetune.train).parameters:
        assert f"        {name}: " in docstring, name


def test_list_templates():
    result = run_script("finetune.py", "--list_templates")
    assert result.stdout.splitlines()[0].startswith("alpaca ")
    assert len(result.stdout.splitlines()) >= 12


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


def test_export_gguf_help_describes_every_flag():
    import inspect

    import export_gguf

    result = run_script("export_gguf.py", "--help", env=dict(os.environ, PAGER="cat"))
    for name in inspect.signature(export_gguf.main).parameters:
        assert f"--{name}" in result.stdout + result.stderr
        assert f"        {name}: " in export_gguf.main.__doc__, name
    assert "q8_0 (8-bit blocks" in result.stdout + result.stderr
