"""The bad-input table: every script, given a bad flag, file, record, template or folder, stops with one line
naming what is wrong (the flag, or the file, record and field), exits 2, prints no traceback and writes nothing.

Each case runs the script's real command (medlora.cli.run, as `python script.py ...` does) in this process, so
the table stays quick; tests/test_cli.py and tests/test_run_folder.py run some of the same refusals as processes.
"""

import contextlib
import io
import json
import sys

import pytest

from tests.conftest import TINY, stage_function

GOOD_SFT = [{"instruction": "What helps a sore throat?", "output": "Rest, fluids and lozenges."}] * 4
GOOD_PAIRS = [{"prompt": "What helps a sore throat?", "chosen": "Rest and fluids; see a doctor if it lasts.",
               "rejected": "Antibiotics always."}] * 4
GOOD_QUESTION = {"question": "Which vitamin is made in the skin?", "options": {"A": "C", "B": "D"}, "answer_idx": "B"}


def write(folder, name, content) -> str:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in content), encoding="utf-8")
    else:
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return str(path)


def run_command(script: str, argv: list) -> tuple:
    """(exit status, stderr) of `python script.py argv...`, run in this process through the same cli.run."""
    from medlora import cli

    function = stage_function(script)
    saved_argv, sys.argv = sys.argv, [f"{script}.py", *map(str, argv)]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli.run(function)
                status = 0
            except SystemExit as stop:
                status = stop.code
    finally:
        sys.argv = saved_argv
    return status, stderr.getvalue()


# Each case: (script, flags, expected text of the error line), with {d} a folder of prepared bad inputs and {out}
# the output path the script must not create. Files are made by `bad_files` below.
CASES = [
    # ---- finetune.py: flags ----
    ("finetune", ["--micro_batchsize", 4], "unknown flag --micro_batchsize; did you mean --micro_batch_size?"),
    ("finetune", ["--num_epochs", 0], "--num_epochs must be > 0 unless --max_steps is; got 0"),
    ("finetune", ["--learning_rate", 0], "--learning_rate must be > 0; got 0"),
    ("finetune", ["--val_set_size", -1], "--val_set_size must be >= 0"),
    ("finetune", ["--cutoff_len", 0], "--cutoff_len must be > 0; got 0"),
    ("finetune", ["--micro_batch_size", 0], "--micro_batch_size must be > 0; got 0"),
    ("finetune", ["--batch_size", -8], "--batch_size must be > 0; got -8"),
    ("finetune", ["--lora_r", 0], "--lora_r must be > 0; got 0"),
    ("finetune", ["--lora_dropout", 1.5], "--lora_dropout must be in [0, 1); got 1.5"),
    ("finetune", ["--warmup_ratio", 2], "--warmup_ratio must be in [0, 1); got 2"),
    ("finetune", ["--neftune_noise_alpha", -1], "--neftune_noise_alpha must be >= 0; got -1"),
    ("finetune", ["--batch_size", 6, "--micro_batch_size", 4], "--batch_size 6 must be a multiple of --micro_batch_size 4"),
    ("finetune", ["--report_to", "mlflow"], "--report_to: unknown value 'mlflow'"),
    ("finetune", ["--precision", "fp8"], "--precision"),
    ("finetune", ["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit exclude each other"),
    # ---- finetune.py: data ----
    ("finetune", ["--data_path", "{d}/missing.json"], "{d}/missing.json: no such file or folder"),
    ("finetune", ["--data_path", "{d}/empty.jsonl"], "{d}/empty.jsonl: no records (empty file)"),
    ("finetune", ["--data_path", "{d}/broken_line.jsonl"], "{d}/broken_line.jsonl: record 2: invalid JSON"),
    ("finetune", ["--data_path", "{d}/broken_array.json"], "{d}/broken_array.json: invalid JSON at line 1"),
    ("finetune", ["--data_path", "{d}/latin1.jsonl"], "{d}/latin1.jsonl: not UTF-8 text: byte offset 62 (line 1)"),
    ("finetune", ["--data_path", "{d}/strings.json"], "{d}/strings.json: record 1: expected a JSON object, got str"),
    ("finetune", ["--data_path", "{d}/no_output.jsonl"], "{d}/no_output.jsonl: record 1: field 'output': missing"),
    ("finetune", ["--data_path", "{d}/empty_output.jsonl"], "{d}/empty_output.jsonl: record 1: field 'output': empty"),
    ("finetune", ["--data_path", "{d}/ends_on_user.jsonl"], "{d}/ends_on_user.jsonl: record 1: field 'messages'"),
    ("finetune", ["--data_path", "{d}/unknown_format.jsonl"], "{d}/unknown_format.jsonl: record 1: unknown format"),
    ("finetune", ["--data_path", "{d}/empty_folder"], "{d}/empty_folder: folder has no"),
    ("finetune", ["--data_path", "{d}/good.jsonl", "--field_map", "{not json"], "--field_map: not a JSON object"),
    ("finetune", ["--data_path", "{d}/good.jsonl", "--field_map", '{"answer": "output"}'],
     "--field_map: key 'answer' is not one of our fields"),
    ("finetune", ["--data_path", "{d}/good.jsonl", "--field_map", '{"input": "q", "instruction": "q"}'],
     "--field_map: keys 'input' and 'instruction' both map to column 'q'"),
    ("finetune", ["--data_path", "{d}/no_output.jsonl", "--field_map", '{"output": "answer"}'],
     "{d}/no_output.jsonl: record 1: field 'answer' (mapped to 'output' by --field_map): missing"),
    ("finetune", ["--data_path", "{d}/good.jsonl", "--field_map", '["output"]'], "--field_map: must map"),
    # ---- finetune.py: templates, models, adapters, checkpoints ----
    ("finetune", ["--data_path", "{d}/good.jsonl", "--prompt_template_name", "no-such"], "unknown prompt template 'no-such'"),
    ("finetune", ["--data_path", "{d}/good.jsonl", "--prompt_template_name", "{d}/bad_placeholder.json"],
     "{d}/bad_placeholder.json: field 'prompt_no_input': unknown placeholder {question}"),
    ("finetune", ["--data_path", "{d}/good.jsonl", "--prompt_template_name", "{d}/broken_template.json"],
     "{d}/broken_template.json: invalid JSON"),
    ("finetune", ["--data_path", "{d}/good.jsonl", "--prompt_template_name", "{d}/missing_field_template.json"],
     "{d}/missing_field_template.json: field 'prompt_next_turn': missing or not a string"),
    ("finetune", ["--base_model", "./no-such-model"], "--base_model ./no-such-model: no such model folder"),
    ("finetune", ["--base_model", "{d}/empty_folder"], "--base_model {d}/empty_folder: no config.json there"),
    ("finetune", ["--base_model", "builtin:no-such"], "builtin:no-such"),
    ("finetune", ["--lora_weights", "{d}/missing_adapter"], "--lora_weights {d}/missing_adapter: no such folder"),
    ("finetune", ["--lora_weights", "{d}/empty_folder"], "--lora_weights {d}/empty_folder: the folder is empty"),
    ("finetune", ["--resume_from_checkpoint", "True"], "--resume_from_checkpoint True: no complete checkpoint in"),
    ("finetune", ["--resume_from_checkpoint", "{d}/empty_folder"], "not a checkpoint folder"),
    # ---- pretrain.py ----
    ("pretrain", ["--data_path", "{d}/missing.txt"], "{d}/missing.txt: no such file or folder"),
    ("pretrain", ["--data_path", "{d}/latin1.txt"], "{d}/latin1.txt: not UTF-8 text: byte offset"),
    ("pretrain", ["--data_path", "{d}/no_text.jsonl"], "{d}/no_text.jsonl: record 1: field 'text': missing"),
    ("pretrain", ["--data_path", "{d}/notes.csv"], "unsupported file type '.csv'"),
    ("pretrain", ["--block_size", 0], "--block_size must be > 0; got 0"),
    ("pretrain", ["--learning_rate", -1], "--learning_rate must be > 0; got -1"),
    # ---- dpo.py / reward.py ----
    ("dpo", ["--loss", "kto"], "--loss: unknown value 'kto'"),
    ("dpo", ["--micro_batch_size", 0], "--micro_batch_size must be > 0; got 0"),
    ("dpo", ["--data_path", "{d}/same_pair.jsonl"], "{d}/same_pair.jsonl: record 1: field 'rejected': identical to 'chosen'"),
    ("dpo", ["--data_path", "{d}/pairs.jsonl", "--field_map", '{"output": "chosen"}'],
     "--field_map: key 'output' is not one of our fields"),
    ("dpo", ["--lora_weights", "{d}/missing_adapter"], "--lora_weights {d}/missing_adapter: no such folder"),
    ("reward", ["--data_path", "{d}/no_rejected.jsonl"], "{d}/no_rejected.jsonl: record 1: field 'rejected': missing"),
    ("reward", ["--cutoff_len", -5], "--cutoff_len must be > 0; got -5"),
    # ---- rl.py ----
    ("rl", ["--num_generations", 1], "--num_generations 1"),
    ("rl", ["--temperature", 0], "--temperature must be > 0"),
    ("rl", ["--reward_model", "{d}/empty_folder"], "--reward_model {d}/empty_folder: the folder is empty"),
    ("rl", ["--max_completion_length", 0], "--max_completion_length must be > 0; got 0"),
    ("rl", ["--data_path", "{d}/bad_prompt.jsonl"], "{d}/bad_prompt.jsonl: record 2: field 'messages[0].content': empty"),
    ("rl", ["--data_path", "{d}/same_pair.jsonl"], "{d}/same_pair.jsonl: record 1: field 'rejected': identical to"),
    ("rl", ["--data_path", "{d}/strings_in_object.jsonl"],
     "{d}/strings_in_object.jsonl: record 1: field 'instruction': expected a string, got int"),
    ("rl", ["--data_path", "{d}/latin1.jsonl"], "{d}/latin1.jsonl: not UTF-8 text: byte offset 62 (line 1)"),
    ("rl", ["--data_path", "{d}/only_bad_prompts.jsonl", "--skip_bad_records"],
     "{d}/only_bad_prompts.jsonl: every record is bad; the first: {d}/only_bad_prompts.jsonl: record 1: field "
     "'messages[0].content': empty"),
    # ---- chat.py ----
    ("chat", ["--prompt_templat", "chatml"], "unknown flag --prompt_templat; did you mean --prompt_template_name?"),
    ("chat", ["--base_model", TINY, "--prompt", "hi", "--temperature", -1], "--temperature"),
    ("chat", ["--base_model", TINY, "--prompt", "hi", "--max_new_tokens", 0], "--max_new_tokens"),
    ("chat", ["--base_model", TINY, "--prompt", "hi", "--top_p", 1.5], "--top_p"),
    ("chat", ["--base_model", TINY, "--prompt", "hi", "--prompt_template", "nope"], "unknown prompt template 'nope'"),
    ("chat", ["--base_model", "./no-such-model", "--prompt", "hi"], "--base_model ./no-such-model: no such model folder"),
    ("chat", ["--lora_weights", "{d}/no_weights_adapter", "--prompt", "hi"],
     "--lora_weights {d}/no_weights_adapter: no adapter weights"),
    # ---- generate.py ----
    ("generate", ["--base_model", TINY, "--data_file", "{d}/missing.jsonl", "--predictions_file", "{out}"],
     "--data_file {d}/missing.jsonl: no such file"),
    ("generate", ["--base_model", TINY, "--data_file", "{d}/notes.txt", "--predictions_file", "{out}"],
     "--data_file {d}/notes.txt: unsupported file type"),
    ("generate", ["--base_model", TINY, "--data_file", "{d}/latin1.jsonl", "--predictions_file", "{out}"],
     "{d}/latin1.jsonl: not UTF-8 text"),
    ("generate", ["--lora_weights", "{d}/corrupt_adapter", "--data_file", "{d}/good.jsonl", "--predictions_file",
                  "{out}"], "--lora_weights {d}/corrupt_adapter: adapter_model.safetensors: corrupt weights file"),
    ("generate", ["--server_prot", 7879], "unknown flag --server_prot; did you mean --server_port?"),
    # ---- serve.py ----
    ("serve", ["--max_concurrency", 0], "--max_concurrency must be >= 1"),
    ("serve", ["--lora_weights", "a=x=y=,=", "--base_model", TINY], "--lora_weights"),
    ("serve", ["--lora_weights", "med={d}/missing_adapter"], "no such folder"),
    ("serve", ["--lora_weights", "med={d}/truncated_adapter"], "adapter_model.safetensors: truncated"),
    ("serve", ["--base_model", TINY, "--temperature", -2], "--temperature"),
    # ---- evaluate.py ----
    ("evaluate", ["--method", "bleu"], "--method: unknown value 'bleu'"),
    ("evaluate", ["--compare"], "--compare needs --lora_weights"),
    ("evaluate", ["--batch_size", 0], "--batch_size must be >= 1"),
    ("evaluate", ["--data_path", "{d}/no_options.jsonl", "--output_file", "{out}"], "{d}/no_options.jsonl: record 1"),
    ("evaluate", ["--data_path", "{d}/latin1.jsonl", "--output_file", "{out}"], "{d}/latin1.jsonl: not UTF-8 text"),
    ("evaluate", ["--data_path", "{d}/bad_answer.jsonl", "--output_file", "{out}"],
     "{d}/bad_answer.jsonl: record 2: field 'answer_idx': 'E' is not an option"),
    ("evaluate", ["--data_path", "{d}/questions.jsonl", "--num_fewshot", 1, "--fewshot_path", "{d}/no_options.jsonl",
                  "--output_file", "{out}"], "{d}/no_options.jsonl: record 1: field 'options': expected 2 to 26"),
    ("evaluate", ["--data_path", "{d}/no_options.jsonl", "--skip_bad_records", "--output_file", "{out}"],
     "{d}/no_options.jsonl: every record is bad; the first: {d}/no_options.jsonl: record 1: field 'options'"),
    ("evaluate", ["--method", "perplexity", "--perplexity_path", "{d}/empty_output.jsonl", "--output_file", "{out}"],
     "{d}/empty_output.jsonl: record 1: field 'output': empty"),
    ("evaluate", ["--lora_weights", "{d}/truncated_adapter", "--output_file", "{out}"],
     "--lora_weights {d}/truncated_adapter: adapter_model.safetensors: truncated"),
    # ---- exports ----
    ("export_hf_checkpoint", ["--lora_weights", "{d}/missing_adapter", "--output_dir", "{out}"],
     "--lora_weights {d}/missing_adapter: no such folder"),
    ("export_hf_checkpoint", ["--lora_weights", "{d}/no_weights_adapter", "--output_dir", "{out}"],
     "--lora_weights {d}/no_weights_adapter: no adapter weights"),
    ("export_hf_checkpoint", ["--lora_weights", "{d}/truncated_adapter", "--output_dir", "{out}"],
     "adapter_model.safetensors: truncated"),
    ("export_hf_checkpoint", ["--lora_weights", "{d}/good_adapter", "--output_dir", "{out}", "--dtype", "float8"],
     "--dtype"),
    ("export_gguf", ["--lora_weights", "{d}/no_weights_adapter", "--output_dir", "{out}"],
     "--lora_weights {d}/no_weights_adapter: no adapter weights"),
    ("export_gguf", ["--lora_weights", "{d}/good_adapter", "--output_dir", "{out}", "--outtype", "q4_k"], "--outtype"),
    ("export_state_dict_checkpoint", ["--lora_weights", "{d}/empty_folder", "--output_dir", "{out}"],
     "--lora_weights {d}/empty_folder: the folder is empty"),
    ("export_state_dict_checkpoint", ["--lora_weights", "tloen/alpaca-lora-7b", "--output_dir", "{out}"],
     "--lora_weights tloen/alpaca-lora-7b: no such folder"),
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_adapter):
    """A folder of bad (and a few good) inputs, written once for the whole table."""
    import shutil

    d = tmp_path_factory.mktemp("bad")
    write(d, "good.jsonl", GOOD_SFT)
    write(d, "empty.jsonl", "")
    write(d, "broken_line.jsonl", json.dumps(GOOD_SFT[0]) + "\n{\"instruction\": \n")
    write(d, "broken_array.json", "[{\"instruction\": 1,,]")
    write(d, "latin1.jsonl", '{"instruction": "Was hilft bei Halsschmerzen?", "output": "Tee'.encode() + b"\xe4" +
          b' und Ruhe."}\n')
    write(d, "latin1.txt", "Patient notes.\n".encode() + b"Fi\xe8vre et toux.\n")
    write(d, "strings.json", ["What helps a sore throat?"])
    write(d, "no_output.jsonl", [{"instruction": "What helps a sore throat?"}])
    write(d, "empty_output.jsonl", [{"instruction": "What helps a sore throat?", "output": "  "}])
    write(d, "ends_on_user.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello"},
                                                  {"role": "user", "content": "My head hurts"}]}])
    write(d, "unknown_format.jsonl", [{"question": "q", "answer": "a"}])
    (d / "empty_folder").mkdir()
    write(d, "bad_placeholder.json", {"prompt_input": "{instruction} {input}", "prompt_no_input": "Q: {question}",
                                      "prompt_next_turn": "{instruction}", "assistant_format": "{content}"})
    write(d, "broken_template.json", "{\"prompt_input\": ")
    write(d, "missing_field_template.json", {"prompt_input": "{instruction}", "prompt_no_input": "{instruction}",
                                             "assistant_format": "{content}"})
    write(d, "no_text.jsonl", [{"body": "Hypertension is common."}])
    write(d, "notes.csv", "text\nHypertension is common.\n")
    write(d, "notes.txt", "What helps a sore throat?\n")
    write(d, "same_pair.jsonl", [{"prompt": "p", "chosen": "same answer", "rejected": "same answer"}])
    write(d, "pairs.jsonl", GOOD_PAIRS)
    write(d, "no_rejected.jsonl", [{"prompt": "p", "chosen": "an answer"}])
    write(d, "no_options.jsonl", [{"question": "Which vitamin?", "options": {}, "answer_idx": "A"}])
    write(d, "questions.jsonl", [GOOD_QUESTION] * 3)
    write(d, "bad_answer.jsonl", [GOOD_QUESTION, {**GOOD_QUESTION, "answer_idx": "E"}, GOOD_QUESTION])
    good_prompt = {"messages": [{"role": "user", "content": "What helps a sore throat?"}]}
    empty_prompt = {"messages": [{"role": "user", "content": " "}]}
    write(d, "bad_prompt.jsonl", [good_prompt, empty_prompt, good_prompt])
    write(d, "only_bad_prompts.jsonl", [empty_prompt, empty_prompt])
    write(d, "strings_in_object.jsonl", [{"instruction": 7}])
    shutil.copytree(tiny_adapter, d / "good_adapter")
    shutil.copytree(tiny_adapter, d / "no_weights_adapter")
    (d / "no_weights_adapter" / "adapter_model.safetensors").unlink()
    shutil.copytree(tiny_adapter, d / "corrupt_adapter")
    (d / "corrupt_adapter" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    shutil.copytree(tiny_adapter, d / "truncated_adapter")
    weights = d / "truncated_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return d


def test_the_table_covers_every_script_with_sixty_cases():
    scripts = {case[0] for case in CASES}
    assert len(CASES) >= 60
    assert scripts == {"finetune", "pretrain", "dpo", "reward", "rl", "chat", "generate", "serve", "evaluate",
                       "export_hf_checkpoint", "export_state_dict_checkpoint", "export_gguf"}


@pytest.mark.parametrize("script, flags, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_stops_with_one_line_exit_2_and_writes_nothing(bad_files, tmp_path, monkeypatch, script, flags,
                                                                  expected):
    out = tmp_path / "out"
    fill = {"{d}": str(bad_files), "{out}": str(out)}

    def filled(value):
        value = str(value)
        for key, replacement in fill.items():
            value = value.replace(key, replacement)
        return value

    argv = [filled(flag) for flag in flags]
    if script in ("finetune", "pretrain", "dpo", "reward", "rl") and "--output_dir" not in argv:
        argv += ["--output_dir", str(out)]
        if "--base_model" not in argv and "--lora_weights" not in argv:
            argv += ["--base_model", TINY]
    monkeypatch.chdir(tmp_path)  # a relative default (./lora-medlora) lands here, where it is checked
    status, stderr = run_command(script, argv)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("error: ") and filled(expected) in lines[-1], lines[-1]
    assert not out.exists()
    assert not (tmp_path / "lora-medlora").exists()
