"""Every command in the fenced bash blocks of README.md and docs/*.md, run as written on the real default model
(SmolLM2-135M-Instruct), so that a documented command cannot break unnoticed (issues 14 and 28).

How each command is treated, in this order:
  * SKIP: a command that cannot run here (a hub model, a GPU, another program, the reader's own files...) matches a
    rule of the table below, which says why. A rule that matches no command fails the test (a stale rule hides
    nothing).
  * COVERED: a command that another test already runs as written (the offline pipeline, the quick benchmark)
    names that test, and the test must exist.
  * A command identical to one run earlier is not run twice.
  * A server (`python serve.py ...`, `python generate.py ...` without --data_file) starts as a process on a free
    port of 127.0.0.1, answers one request (serve.py: a chat completion through the official openai client; the
    chat page: its configuration, which must carry the not-medical-advice notice), and stops on SIGTERM without
    a traceback.
  * Everything else runs. Each document's commands run in document order in one working folder (tmp) that holds
    links to the repository's scripts, data, templates and scripts/ folder, so relative paths (./lora-medlora,
    data/eval/...) mean what they mean in a clone; a document that uses ./lora-medlora before training one gets a
    copy of the one README.md's `python finetune.py` trained (docs/evaluate.md and docs/generate.md say to make it
    with demo.sh, which is skipped). A `python X.py ...` command runs in this process through the script's own
    command (medlora.cli.run, exactly what `python X.py` calls; tests/test_bad_input.py does the same), with stdin
    at end of file (a terminal chat ends at once, as on Ctrl-D); a `bash scripts/run_*.sh` launcher runs as a
    process. A command that matches no rule and does not run fails the test.

So the stages chain as a user chains them: README.md's `python finetune.py` trains a SmolLM2 adapter, and
evaluate (loglik, generate, perplexity), chat, batch answers, serve, the three exports, and pretrain / dpo /
reward / rl run on it or on SmolLM2 itself. What may be added to a command (never changed in it): small step
counts and few tokens (SMALL_STEPS: --max_steps, a --batch_size of one micro-batch, --val_set_size, --cutoff_len,
--block_size, --limit, --max_new_tokens, --eval_prompts...; a command's own larger --max_steps is lowered to
SMALL_STEPS's, the one change made in a command), --overwrite_output_dir on training commands (a page lists alternatives that share a stage's
default --output_dir, which a stage refuses to train into twice), and a free port for a server.

Cost (2026-12-06, 2 idle cores of an Intel Xeon with AMX, fp32 through MEDLORA_AUTO_PRECISION=fp32): 4 min 31 s
for this file, 34 commands run. The largest parts: README.md's `python finetune.py` (30 s, with the one-off
conversion of SmolLM2 into the test cache), the grounded fine-tuning at its --cutoff_len 1024 (27 s), the GGUF export
with its read-back (21 s), the full fine-tuning of `pretrain.py --use_lora False` (16 s) and the README's perplexity
of 40 GenMedGPT answers (16 s).
"""

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED_DATASETS, stage_function

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}
LINKED = ["data", "templates", "scripts", "medlora", *sorted(f"{name}.py" for name in SCRIPTS)]
SHARED_MISSING = not SHARED_DATASETS.is_dir()

# (pattern, reason): the first that matches a command skips it. Patterns are searched in the command's text.
SKIP = [
    (r"^bash scripts/demo\.sh", "demo.sh installs the requirements and trains SmolLM2-135M for minutes; "
                                "its steps are the documented commands run here"),
    (r"^bash scripts/test\.sh", "test.sh installs the test requirements and runs this suite"),
    (r"--device cuda", "needs a CUDA GPU"),
    (r"^bash scripts/gpu_check\.sh$", "needs a CUDA GPU (tests/test_gpu.py's tests, timed and reported)"),
    (r"^bash scripts/gpu_wheels\.sh$", "downloads about 155 MB of wheels from PyPI for the lent GPU machine"),
    (r"^scripts/benchmark\.py$|^python scripts/benchmark\.py$", "the full CPU bench: about 4 minutes, and it "
                                                                 "rewrites docs/BENCHMARKS.md"),
    (r"^python scripts/benchmark\.py --shapes smollm2-135m\b", "the SmolLM2-135M bench: minutes per configuration, "
                                                              "and it rewrites docs/BENCHMARKS.md"),
    (r"^python scripts/benchmark_hygiene\.py$", "the 100,000-record hygiene bench: half a minute, for "
                                                "docs/BENCHMARKS.md; tests/test_hygiene.py runs it at 3,000 records"),
    (r"^python scripts/memory_breakdown\.py$", "SmolLM2-135M forward passes of one micro-batch under four "
                                              "settings: minutes on 2 cores, for docs/BENCHMARKS.md"),
    (r"(^|\s)\.\.\.(\s|$)", "an elided command (`...`): a pattern to fill in, not a command"),
    (r"^(vllm|cd gguf|ollama)\b|\bollama (create|run)\b", "needs vLLM or Ollama, which are other programs"),
    (r"^(git clone|pip install)\b", "needs the network (GitHub, PyPI)"),
    (r"llama\.cpp/", "needs llama.cpp, cloned and built"),
    (r"^torchrun\b|^accelerate launch\b", "several processes or GPUs"),
    (r"(^|\s)--base_model (meta-llama|mistralai|Qwen)/", "a model on the Hugging Face hub: no network here"),
    (r"--harness lm_eval --tasks (medqa_4options|cmmlu_)", "lm-eval downloads these tasks' datasets from the hub"),
    (r"(^|\s|\")(questions\.jsonl|questions\.txt|medqa_test\.jsonl|genmedgpt_5k\.json|\./sft-merged|\./lora-chatdoctor"
     r"|\./Llama-3\.1-8B|\./my_leaflets/|triage=\./lora-triage\S*)(\s|\"|$)",
     "names the reader's own file, folder, model or adapters, which the repository does not ship"),
]
if SHARED_MISSING:  # a user's clone: the seed project's datasets live beside the repository on dev and CI machines
    SKIP.append((r"\.\./shared/", f"{SHARED_DATASETS} is absent (the README gives each dataset's hub name)"))
    SKIP.append((r"--lora_weights \./lora-genmedgpt\b", "the adapter of docs/recipes.md's GenMedGPT-5k run, which needs "
                                                        f"{SHARED_DATASETS}"))
# Commands another test runs as written: (pattern, "tests/file.py::test").
COVERED = [
    (r"^(WORK_DIR=\S+ )?bash scripts/run_pipeline_offline\.sh$",
     "tests/test_stages.py::test_offline_pipeline_script_chains_every_stage"),
    (r"^python scripts/benchmark\.py --quick --shapes cpu --configs medlora,alpaca_lora --no_write$",
     "tests/test_benchmark.py::quick_run"),
    (r"^bash scripts/gpu_check\.sh --dry_run$", "tests/test_gpu_check.py::test_dry_run_lists_every_step_and_passes"),
    (r"^bash scripts/gpu_check\.sh --record FILES_AT/gpu_check\.md$",
     "tests/test_gpu_check.py::test_record_puts_each_section_into_its_place"),
    (r"--harness lm_eval --tasks medmcqa_style_sample --include_path data/eval/lm_eval_tasks$",
     "tests/test_lm_eval_parity.py::test_harness_compare_end_to_end"),
]
# Small step counts appended to a command that runs (only flags it does not give itself).
SMALL_STEPS = {
    "finetune": ["--max_steps", "1", "--batch_size", "4", "--val_set_size", "2", "--cutoff_len", "128",
                 "--save_steps", "1000"],
    "pretrain": ["--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "2", "--block_size", "128", "--save_steps", "1000"],
    "dpo": ["--max_steps", "1", "--val_set_size", "2", "--batch_size", "2", "--micro_batch_size", "2", "--cutoff_len", "128",
            "--save_steps", "1000"],
    "reward": ["--max_steps", "1", "--val_set_size", "2", "--batch_size", "2", "--micro_batch_size", "2", "--cutoff_len", "128",
               "--save_steps", "1000"],
    "rl": ["--max_steps", "1", "--eval_prompts", "2", "--max_completion_length", "8", "--save_steps", "1000"],
    "evaluate": ["--limit", "4", "--max_new_tokens", "8"],
    "chat": ["--max_new_tokens", "8"],
    "generate": ["--max_new_tokens", "8"],
}
for script, launcher in (("finetune", "run_sft"), ("pretrain", "run_pt"), ("dpo", "run_dpo"), ("reward", "run_rm"),
                         ("rl", "run_rl")):
    SMALL_STEPS[launcher] = SMALL_STEPS[script]
TRAINING = {"finetune", "pretrain", "dpo", "reward", "rl"}
LAUNCHERS = {"run_sft", "run_pt", "run_dpo", "run_rm", "run_rl"}
# Servers: the script and the flag that gives it a port.
SERVERS = {"serve": "--port", "generate": "--server_port"}
# The command that trains ./lora-medlora, the adapter the documents' other commands load (they say to make it with
# demo.sh, whose training step this is): it runs first, and documents that use ./lora-medlora get a copy of it.
ADAPTER_COMMAND = ("README.md", "python finetune.py")


@dataclass
class Command:
    document: str
    line: int
    text: str

    @property
    def place(self) -> str:
        return f"{self.document}:{self.line}"


def fenced_bash_commands(paths=DOCUMENTS) -> list:
    """Every command line of every ```bash block: continuations joined, comments and blank lines dropped."""
    commands = []
    for path in paths:
        language, pending, start = None, "", 0
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            stripped = raw.strip()
            if stripped.startswith("```"):
                language = None if language is not None else (stripped[3:].strip() or "text")
                pending = ""
                continue
            if language not in ("bash", "sh", "shell"):
                continue
            text = re.sub(r"(^|\s)#.*$", "", stripped).strip()  # comments (no command here has # in a word)
            if not pending:
                start = number
            if text.endswith("\\"):
                pending += text[:-1].strip() + " "
                continue
            text, pending = (pending + text).strip(), ""
            if text:
                name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
                commands.append(Command(name, start, text))
    return commands


def rule_for(command: Command):
    """("skip" | "covered", reason) of the first rule the command matches, or None."""
    for pattern, reason in SKIP:
        if re.search(pattern, command.text):
            return "skip", reason
    for pattern, test in COVERED:
        if re.search(pattern, command.text):
            return "covered", test
    return None


def with_small_steps(name: str, argv: list) -> list:
    given = {word.split("=", 1)[0] for word in argv if word.startswith("--")}
    argv = list(argv)
    small = dict(zip(SMALL_STEPS.get(name, [])[::2], SMALL_STEPS.get(name, [])[1::2]))
    if "--max_steps" in argv and "--max_steps" in small:  # a measured recipe's own step count: lowered, not removed
        at = argv.index("--max_steps") + 1
        argv[at] = str(min(int(argv[at]), int(small["--max_steps"])))
    extra = []
    steps = SMALL_STEPS.get(name, [])
    for index in range(0, len(steps), 2):
        if steps[index] not in given:
            extra += steps[index:index + 2]
    if (name in TRAINING or name in LAUNCHERS) and not given & {"--overwrite_output_dir", "--resume_from_checkpoint"}:
        extra.append("--overwrite_output_dir")  # a page's alternatives share a stage's default --output_dir
    if "--help" in given or "--list_templates" in given:
        return argv
    return argv + extra


def run_in_process(script: str, argv: list, workdir: Path) -> tuple:
    """(exit status, output) of `python script.py argv` in workdir, through the script's own command."""
    from medlora import cli

    function = stage_function(script)
    saved = sys.argv, sys.stdin, Path.cwd()
    output = io.StringIO()
    sys.argv, sys.stdin = [f"{script}.py", *argv], io.StringIO("")  # a terminal chat ends at once (Ctrl-D)
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                cli.run(function)
                status = 0
            except SystemExit as stop:
                status = stop.code or 0
    finally:
        sys.argv, sys.stdin = saved[0], saved[1]
        os.chdir(saved[2])
    return status, output.getvalue()


def run_launcher(command: Command, workdir: Path) -> tuple:
    """(exit status, output) of a `[VAR=value ...] bash scripts/run_*.sh flags...` line, with small steps.

    The launcher itself runs as written, with its documented $PYTHON set to a stand-in that records the command
    line the launcher builds (its defaults, the variables, the flags) and the folder it runs it in; that command
    then runs in this process like the `python X.py` lines (a Python start costs more than the tiny training)."""
    words = shlex.split(command.text)
    launcher = next(word for word in words if re.fullmatch(r"scripts/run_\w+\.sh", word))
    given = words[words.index(launcher) + 1:]
    extra = with_small_steps(Path(launcher).stem, given)[len(given):]
    recorder = workdir / ".python-command"
    stand_in = workdir / ".python"
    stand_in.write_text(f"#!/bin/sh\npwd > {recorder}\nprintf '%s\\n' \"$@\" >> {recorder}\n", encoding="utf-8")
    stand_in.chmod(0o755)
    result = subprocess.run(shlex.join(words + extra), shell=True, cwd=workdir, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHON=str(stand_in)))
    if result.returncode != 0 or not recorder.is_file():
        return result.returncode or 1, result.stdout + result.stderr
    folder, script, *argv = recorder.read_text(encoding="utf-8").splitlines()
    recorder.unlink()
    assert Path(folder).resolve() == workdir.resolve() and re.fullmatch(r"\w+\.py", script), (folder, script)
    return run_in_process(script.removesuffix(".py"), argv, workdir)


def working_folder(root: Path, name: str, adapter: Path | None = None, commands=()) -> Path:
    """A folder that looks like a clone to the commands run in it: links to the scripts, data, templates and
    scripts/, ../shared beside it where the repository has one, and ./lora-medlora when the commands use it before
    they train one."""
    folder = root / name.replace("/", "_")
    folder.mkdir()
    for entry in LINKED:
        (folder / entry).symlink_to(ROOT / entry)
    if not SHARED_MISSING and not (root / "shared").exists():
        (root / "shared").symlink_to(SHARED_DATASETS.parent)
    texts = " ".join(command.text for command in commands)
    trains_it = re.search(r"(OUTPUT_DIR=|--output_dir )\./lora-medlora\b", texts)
    if adapter and "./lora-medlora" in texts and not (trains_it and trains_it.start() <= texts.index("./lora-medlora")):
        shutil.copytree(adapter, folder / "lora-medlora")
    return folder


def is_server(words: list) -> bool:
    name = words[1].removesuffix(".py") if len(words) > 1 and words[0] == "python" else ""
    return name in SERVERS and not (name == "generate" and "--data_file" in words)


def run_server(words: list, workdir: Path) -> tuple:
    """(exit status, output) of a server command: started as a process on a free port, asked one thing, stopped with
    SIGTERM (exit status 1 when it did not answer as it should; its output says why)."""
    import httpx
    import openai

    from medlora.inference.generation import DISCLAIMER
    from tests.conftest import free_port

    name, port = words[1].removesuffix(".py"), free_port()
    argv = [*words[2:], SERVERS[name], str(port)] + (["--max_new_tokens", "8"] if name == "serve" else [])
    process = subprocess.Popen([sys.executable, f"{name}.py", *argv], cwd=workdir, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    url, problem = f"http://127.0.0.1:{port}", ""
    try:
        deadline = time.time() + 240
        while process.poll() is None and time.time() < deadline:
            try:
                if httpx.get(url + ("/health" if name == "serve" else "/config"), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            problem = "did not start"
        if not problem and name == "serve":
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("MEDLORA_API_KEY", "unused"))
            models = [model.id for model in client.models.list().data]
            adapter = next((m for m in models if m == "lora-medlora"), models[0])  # the adapter, where one is served
            answer = client.chat.completions.create(model=adapter, temperature=0, messages=[
                {"role": "user", "content": "I have had a sore throat for two days. What should I do?"}])
            if not answer.choices[0].message.content.strip() or answer.usage.completion_tokens > 8:
                problem = f"answer from {adapter}: {answer}"
        elif not problem and DISCLAIMER not in httpx.get(url + "/config", timeout=10).text:
            problem = "the chat page does not show the not-medical-advice notice"
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    return (1 if problem or "Traceback" in output else 0), f"{problem}\n{output}"


def run(command: Command, workdir: Path):
    """(exit status, output, seconds) of a command that can run here, or None when it cannot."""
    words = shlex.split(command.text)
    started = time.perf_counter()
    if is_server(words):
        status, output = run_server(words, workdir)
    elif words[0] == "python" and len(words) > 1 and words[1].removesuffix(".py") in SCRIPTS:
        name = words[1].removesuffix(".py")
        status, output = run_in_process(name, with_small_steps(name, words[2:]), workdir)
    elif "bash" in words and any(re.fullmatch(r"scripts/run_\w+\.sh", word) for word in words):
        status, output = run_launcher(command, workdir)
    else:
        return None
    return status, output, time.perf_counter() - started


def test_every_skip_and_covered_rule_is_used_and_names_a_real_test():
    commands = fenced_bash_commands()
    assert len(commands) >= 60
    for pattern, _ in SKIP:
        assert any(re.search(pattern, c.text) for c in commands), f"skip rule {pattern!r} matches no command"
    for pattern, test in COVERED:
        assert any(re.search(pattern, c.text) for c in commands), f"covered rule {pattern!r} matches no command"
        file, name = test.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(encoding="utf-8"), re.M), test


def test_the_extraction_joins_continuations_and_drops_comments(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```bash\npython a.py \\\n    --x 1   # a comment\n# only a comment\n\nbash b.sh\n```\n"
                   "```json\n{\"not\": \"a command\"}\n```\n```\nnot bash\n```\n", encoding="utf-8")
    found = [(c.line, c.text) for c in fenced_bash_commands([doc])]
    assert found == [(3, "python a.py --x 1"), (7, "bash b.sh")]


def test_docs_say_hf_auth_login_not_huggingface_cli():
    """huggingface_hub 2 installs `hf`; `huggingface-cli login` may only appear as its old name."""
    for path in [*DOCUMENTS, *ROOT.glob("*.py"), *(ROOT / "medlora").rglob("*.py"), *(ROOT / "scripts").glob("*")]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if "huggingface-cli" in line:
                    assert "hf auth login" in line and "older" in line, f"{path.name}: {line.strip()}"
    assert "hf auth login" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_every_documented_command_runs_as_written(tmp_path, tiny_model_path):
    commands = fenced_bash_commands()
    outcomes, failures, unhandled = [], [], []
    done = {}  # command text -> where it ran

    def record(command, result):
        status, output, seconds = result
        done[command.text] = command.place
        outcomes.append((command.place, "ran", f"exit {status} in {seconds:.1f}s: {command.text}"))
        if status != 0 or "Traceback" in output:
            failures.append(f"{command.place}: {command.text} -> exit {status}\n{output[-2500:]}")

    first = next(c for c in commands if (c.document, c.text) == ADAPTER_COMMAND)
    record(first, run(first, working_folder(tmp_path, "adapter")))
    adapter = tmp_path / "adapter" / "lora-medlora"
    assert not failures and (adapter / "adapter_model.safetensors").is_file(), failures
    for document in dict.fromkeys(command.document for command in commands):
        in_document = [command for command in commands if command.document == document]
        workdir = working_folder(tmp_path, document, adapter, in_document)
        for command in in_document:
            rule = rule_for(command)
            if rule:
                outcomes.append((command.place, *rule))
            elif command.text in done:
                outcomes.append((command.place, "same", f"as {done[command.text]}"))
            elif (result := run(command, workdir)) is not None:
                record(command, result)
            else:
                unhandled.append(f"{command.place}: {command.text}")
    print("\n".join(f"{place}: {kind}: {detail}" for place, kind, detail in outcomes))
    assert unhandled == [], "commands that match no rule and cannot run here: add a rule or make them run"
    assert failures == [], "\n\n".join(failures)
    assert sum(1 for outcome in outcomes if outcome[1] == "ran") >= 25
