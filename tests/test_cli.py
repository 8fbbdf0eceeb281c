"""Flags are checked against the script's function before any work: an unknown one is refused at once."""

import pytest

import chat
import finetune
import generate
from medlora.cli import unknown_flag_error
from medlora.errors import MedLoRAError
from tests.conftest import run_script


@pytest.mark.parametrize("function, argv, expected", [
    (finetune.train, ["--micro_batchsize", "4"], "unknown flag --micro_batchsize; did you mean --micro_batch_size?"),
    (finetune.train, ["--output_dir=x", "--lerning_rate=1e-3"], "unknown flag --lerning_rate; did you mean --learning_rate?"),
    (chat.main, ["--prompt_templat", "chatml"], "unknown flag --prompt_templat; did you mean --prompt_template_name?"),
    (generate.main, ["--server_prot", "7879"], "unknown flag --server_prot; did you mean --server_port?"),
    (finetune.train, ["--zzz"], "unknown flag --zzz; see --help for every flag"),
])
def test_unknown_flags_are_named_with_the_nearest_valid_one(function, argv, expected):
    assert unknown_flag_error(function, argv) == expected


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["--micro_batch_size", "4", "--output_dir", "x"], ["--micro-batch-size=4"], ["--nopacking"], ["--packing"],
    ["--help"], ["--lora_target_modules", "q_proj,v_proj"], ["--max_steps", "-1"], ["--", "--trace"],
])
def test_valid_flags_pass(argv):
    assert unknown_flag_error(finetune.train, argv) is None


@pytest.mark.parametrize("argv, expected", [
    (["--load_8bit", "--prompt_template", "chatml"], ["--load_in_8bit", "--prompt_template_name", "chatml"]),
    (["--load_4bit=True", "--noload_8bit"], ["--load_in_4bit=True", "--noload_in_8bit"]),
    (["--prompt-template=alpaca", "--", "--prompt_template"], ["--prompt_template_name=alpaca", "--", "--prompt_template"]),
    (["--prompt_template_name", "chat"], ["--prompt_template_name", "chat"]),
])
def test_alpaca_lora_flag_names_are_accepted_as_aliases(argv, expected):
    from medlora.flags import canonical_argv

    assert canonical_argv(chat.main, argv) == expected
    assert unknown_flag_error(chat.main, canonical_argv(chat.main, argv)) is None


@pytest.mark.slow
def test_an_alias_reaches_the_function_under_its_current_name(tmp_path):
    """chat.py --prompt_template (alpaca-lora's name) sets the template: a bad name is refused naming it."""
    result = run_script("chat.py", "--base_model", "builtin:tiny-llama", "--prompt_template", "no-such-template",
                        "--prompt", "hi", check=False)
    assert result.returncode == 2
    assert "no-such-template" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_misspelt_flag_stops_before_any_work(tmp_path):
    result = run_script("finetune.py", "--output_dir", tmp_path / "out", "--micro_batchsize", 4, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown flag --micro_batchsize; did you mean --micro_batch_size?"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path):
    from tests.conftest import TINY

    output_dir = tmp_path / "out"
    flags = ["--base_model", TINY, "--output_dir", output_dir, "--max_steps", 1, "--batch_size", 4,
             "--micro_batch_size", 4, "--val_set_size", 0, "--cutoff_len", 64, "--save_steps", 1000, "--warmup_ratio", 0]
    run_script("finetune.py", *flags)
    weights = (output_dir / "adapter_model.safetensors").read_bytes()
    refused = run_script("finetune.py", *flags, "--learning_rate", 1e-2, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir {output_dir} already holds a finished run")
    assert (output_dir / "adapter_model.safetensors").read_bytes() == weights
    run_script("finetune.py", *flags, "--learning_rate", 1e-2, "--overwrite_output_dir")
    assert (output_dir / "adapter_model.safetensors").read_bytes() != weights


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--num_epochs", 0], "--num_epochs must be > 0 unless --max_steps is; got 0"),
    (["--learning_rate", 0], "--learning_rate must be > 0; got 0"),
    (["--learning_rate", -1e-4], "--learning_rate must be > 0; got -0.0001"),
    (["--val_set_size", -1], "--val_set_size must be >= 0 (a count, or a fraction below 1); got -1"),
    (["--cutoff_len", 0], "--cutoff_len must be > 0; got 0"),
    (["--micro_batch_size", 0], "--micro_batch_size must be > 0; got 0"),
    (["--batch_size", -8], "--batch_size must be > 0; got -8"),
    (["--lora_r", 0], "--lora_r must be > 0; got 0"),
    (["--lora_dropout", 1.5], "--lora_dropout must be in [0, 1); got 1.5"),
    (["--warmup_ratio", 1.5], "--warmup_ratio must be in [0, 1); got 1.5"),
    (["--warmup_steps", -3], "--warmup_steps must be >= 0; got -3"),
])
def test_out_of_range_numbers_are_refused_before_any_work(tmp_path, flags, message):
    import finetune

    output_dir = tmp_path / "out"
    with pytest.raises(MedLoRAError) as raised:
        finetune.train(base_model="builtin:no-such-model-so-nothing-loads", output_dir=str(output_dir),
                       **{flags[0][2:]: flags[1]})
    assert str(raised.value) == message
    assert not output_dir.exists()


@pytest.mark.slow
def test_ctrl_c_during_training_says_where_it_stopped_and_how_to_resume(tmp_path):
    import re
    import signal
    import subprocess
    import sys
    import time

    from medlora.run_folder import CHECKPOINT_COMPLETE
    from tests.conftest import ROOT, TINY, sigint_as_a_terminal_sends_it

    output_dir = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "finetune.py", "--base_model", TINY, "--output_dir", str(output_dir), "--max_steps", "500",
         "--batch_size", "4", "--micro_batch_size", "4", "--val_set_size", "0", "--cutoff_len", "64", "--save_steps", "2"],
        cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=sigint_as_a_terminal_sends_it)
    deadline = time.time() + 300
    while not (output_dir / "checkpoint-2" / CHECKPOINT_COMPLETE).exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"training interrupted at step (\d+) of 500; the last complete checkpoint is (.+); rerun the "
                         r"same command with --resume_from_checkpoint True to continue from it", last)
    assert match, last
    checkpoint = match.group(2)
    assert (ROOT / checkpoint).is_dir()  # absolute, or relative to where the command ran
    assert int(checkpoint.rsplit("-", 1)[1]) <= int(match.group(1))
    assert not (output_dir / "adapter_model.safetensors").exists()  # nothing presented as a finished run


# ---- flags composed from the shared groups ------------------------------------------------------------------
def test_composed_flags_reach_the_stage_as_one_object_with_stage_defaults():
    from medlora.flag_groups import TRAINING
    from medlora.flags import FlagGroup, stage_flags

    @stage_flags(TRAINING.but(batch_size=16).without("cutoff_len"), FlagGroup("own", loss="dpo"))
    def stage(flags):
        return flags.as_dict()

    import inspect

    parameters = inspect.signature(stage).parameters
    assert list(parameters)[:2] == ["batch_size", "micro_batch_size"] and "cutoff_len" not in parameters
    assert parameters["batch_size"].default == 16 and parameters["loss"].default == "dpo"
    values = stage(learning_rate=1e-3)
    assert values["batch_size"] == 16 and values["learning_rate"] == 1e-3 and values["loss"] == "dpo"
    with pytest.raises(TypeError):
        stage(cutoff_len=128)  # left out of this stage
    with pytest.raises(TypeError, match="no flag nope"):
        TRAINING.but(nope=1)
    with pytest.raises(TypeError, match="declared twice"):
        stage_flags(TRAINING, TRAINING)


@pytest.mark.parametrize("script", ["finetune", "pretrain", "dpo", "reward", "rl"])
def test_every_training_stage_shares_the_training_flags_under_one_name(script):
    """One name per concept: a training stage takes the shared groups' flags, not its own variants."""
    import inspect

    from medlora.flag_groups import CHECKPOINTS, LORA, MODEL
    from tests.conftest import stage_function

    parameters = inspect.signature(stage_function(script)).parameters
    shared = {"base_model", "precision", "load_in_4bit", "load_in_8bit", "trust_remote_code", "batch_size",
              "micro_batch_size", "learning_rate", "warmup_steps", "warmup_ratio", "seed", "gradient_checkpointing",
              *LORA.flags, *(set(CHECKPOINTS.flags) - {"eval_steps"})}
    assert shared <= set(parameters), shared - set(parameters)
    assert not {"load_8bit", "load_4bit", "prompt_template"} & set(parameters)
    assert set(MODEL.flags) - {"lora_weights", "prompt_template_name"} <= set(parameters)
