"""--torch_compile (medlora/training/compiling.py): compiled decoder layers compute what eager training computes,
with the same dropout masks in the same order, a mask of its own for every LoRA layer, and leave nothing behind.
The documented `python finetune.py --torch_compile` runs on SmolLM2 in tests/test_documented_commands.py."""

import json
import os
import sys

import pytest
import torch

import finetune
from medlora.training import compiling
from medlora.training.compiling import (
    compile_decoder_layers,
    is_compiled,
    uncompile_decoder_layers,
)
from medlora.training.memory import reduce_training_memory
from tests.conftest import run_script
from tests.test_training_memory import assert_close_to_scale, lora_model, loss_and_grads

pytestmark = pytest.mark.slow  # each test compiles (tens of seconds on 2 cores)


@pytest.fixture
def counted_masks(monkeypatch):
    """The masks the compiled layers draw, in order (shapes)."""
    drawn = []
    original = compiling.dropout_drop_mask

    def counting(shape, p):
        drawn.append(tuple(shape))
        return original(shape, p)

    monkeypatch.setattr(compiling, "dropout_drop_mask", counting)
    return drawn


@pytest.mark.parametrize("dropout, checkpointing", [(0.05, False), (0.05, True), (0.0, False)])
def test_compiled_layers_give_eager_loss_and_gradients(tiny_model_path, counted_masks, dropout, checkpointing):
    eager, compiled = lora_model(tiny_model_path, dropout), lora_model(tiny_model_path, dropout)
    for model in (eager, compiled):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    reduce_training_memory(eager)  # what CPU training runs without --torch_compile
    layers = eager.config.num_hidden_layers
    assert compile_decoder_layers(compiled) == layers
    expected = loss_and_grads(eager, seed=1)
    for seed in (1, 1):  # the second call reuses the compiled graphs
        counted_masks.clear()
        actual = loss_and_grads(compiled, seed=seed)
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)
        for name in expected[1]:
            assert_close_to_scale(actual[1][name], expected[1][name], 1e-5, name)
        assert torch.equal(actual[2], expected[2])  # as many random numbers drawn as eager training
    # one mask per LoRA layer and forward pass (checkpointing recomputes them: the same draws again), never one
    # shared by q, k and v, which read the same input: the compiler merged those until each got its own salt
    per_forward = 7 * layers if dropout else 0
    assert len(counted_masks) == per_forward * (2 if checkpointing else 1)
    uncompile_decoder_layers(compiled)
    assert not any("forward" in module.__dict__ for module in compiled.modules())


# A small learning rate: Adam's first steps move every weight by about the learning rate whatever its gradient's
# size, so gradient elements near zero that differ in their last bits (fused kernels round differently) flip their
# update's sign; at 1e-2 that moved the tiny model's next loss by 2e-4 of it, at 1e-4 by under 3e-6. A different
# dropout mask moves a step's own loss by far more.
LEARNING_RATE = 1e-4


def train_tiny(tiny_model_path, output_dir, torch_compile):
    return finetune.train(base_model=str(tiny_model_path), output_dir=str(output_dir), max_steps=3, batch_size=8,
                          micro_batch_size=4, val_set_size=8, warmup_steps=0, learning_rate=LEARNING_RATE,
                          cutoff_len=128, lora_target_modules="all-linear", logging_steps=1, save_steps=1000,
                          precision="fp32", torch_compile=torch_compile)


def test_finetune_with_torch_compile_logs_the_eager_losses_and_saves_a_plain_model(tiny_model_path, tmp_path,
                                                                                   capsys):
    eager = train_tiny(tiny_model_path, tmp_path / "eager", torch_compile=False)
    capsys.readouterr()
    compiled = train_tiny(tiny_model_path, tmp_path / "compiled", torch_compile=True)
    assert "decoder layers compiled" in capsys.readouterr().out
    losses = [[entry[key] for entry in run.trainer.state.log_history for key in ("loss", "eval_loss") if key in entry]
              for run in (eager, compiled)]
    assert len(losses[0]) == 3 + 2  # three steps, the validation loss before and after
    for actual, expected in zip(*losses):  # packed batches, the eager attention, the same masks: the same run
        assert actual == pytest.approx(expected, rel=1e-5)
    assert not any(is_compiled(module) for module in compiled.model.modules())  # nothing left behind
    settings = json.loads((tmp_path / "compiled" / "medlora_run.json").read_text())
    assert settings["torch_compile"] is True


def test_pretrain_with_torch_compile_logs_the_eager_losses(tiny_model_path, tmp_path):
    import pretrain

    runs = {}
    for torch_compile in (False, True):
        output_dir = tmp_path / f"compiled-{torch_compile}"
        result = pretrain.pretrain(base_model=str(tiny_model_path), output_dir=str(output_dir), block_size=64,
                                   batch_size=8, micro_batch_size=8, max_steps=3, learning_rate=LEARNING_RATE,
                                   val_set_size=6, warmup_steps=0, lora_target_modules="all-linear",
                                   precision="fp32", logging_steps=1, save_steps=1000, torch_compile=torch_compile)
        log = json.loads((output_dir / "training_log.json").read_text())
        runs[torch_compile] = [entry["loss"] for entry in log if "loss" in entry]
        assert not any(is_compiled(module) for module in result.model.modules())
    assert len(runs[False]) == 3
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_torch_compile_without_a_cpp_compiler_stops_before_any_work(tmp_path):
    # A process of its own: inductor remembers the compiler it found for the rest of a process.
    python_only = os.path.dirname(sys.executable)  # a PATH with Python on it and no C++ compiler
    result = run_script("finetune.py", "--base_model", "builtin:tiny-llama", "--output_dir", tmp_path / "out",
                        "--torch_compile", check=False, env={**os.environ, "PATH": python_only})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: --torch_compile: No working C++ compiler found")
    assert result.stderr.count("\n") == 1 and "apt-get install g++" in result.stderr
    assert not (tmp_path / "out").exists()
