"""Batches, the training loss, checkpoints, and the pieces of the Trainer arguments (accumulation, warmup,
reporting) that TrainingStage (stage.py) puts together for every stage.

Two collators build micro-batches from encoded examples:
  PaddedCollator  rows padded to the longest (a multiple of 8), with an attention_mask
  PackedCollator  all examples of the micro-batch in one row, no padding at all: position_ids restart
                  at every example and no attention_mask is passed. The record boundaries go along
                  (cu_seq_lens), so medlora_packed attention works record by record; other attention
                  implementations get transformers' block-diagonal causal mask from the position_ids.
                  Either way attention stays inside each example.

The loss (`LabelOnlyLossTrainer`, with medlora/training/loss.py) runs the model's output layer only at
positions that carry a label: prompt positions need no logits, which saves most of the output-layer
work and memory. It is normalised by the number of trained tokens in the whole accumulated (and distributed) batch,
so that every token weighs the same whatever the micro-batch size, accumulation or world size.
"""

import logging
import math
import os

import torch
from transformers import Trainer, TrainerCallback

from medlora.errors import MedLoRAError
from medlora.run_folder import CHECKPOINT_COMPLETE, RunFolder
from medlora.training import distributed
from medlora.training.compiling import compile_decoder_layers, uncompile_decoder_layers
from medlora.training.loss import label_only_loss
from medlora.training.malloc import trim_malloc, tune_malloc
from medlora.training.memory import forget_casts, reduce_training_memory

logger = logging.getLogger(__name__)


class LabelOnlyLossTrainer(Trainer):
    # compute_loss below already divides by the trained tokens of the whole accumulated batch.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, compile_layers: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # Makes the Trainer count trained tokens per accumulated batch and pass them as num_items_in_batch.
        self.model_accepts_loss_kwargs = True
        self.add_callback(MarkCompleteCheckpoints())
        if compile_layers:  # --torch_compile (compiling.py)
            compile_decoder_layers(self.model)
        if self.args.device.type == "cpu":
            # LoRA branches without float copies of their inputs (memory.py; compiled layers fuse PEFT's instead);
            # glibc set for memory under checkpointing, for reusing freed pages otherwise (malloc.py)
            memory_first = self.args.gradient_checkpointing
            if not compile_layers:
                reduce_training_memory(self.model, trim_between_layers=memory_first and not self.args.bf16)
            tune_malloc(memory_first)
            self.add_callback(TrimMalloc(after_every_step=memory_first))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the plain mean over this batch's trained tokens
            num_items_in_batch = None
        loss = label_only_loss(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens while DDP averages gradients over ranks.
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss


def undo_training_changes(trainer) -> None:
    """What training put on the model taken off, so that what the stage computes next, and the model it hands
    back, match a fresh load: the autocast accelerate leaves around the forward after mixed-precision training
    (bf16 autocast on CPUs with AMX), the bf16 copies of frozen weights kept for it, compiled layers."""
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    forget_casts(trainer.model)
    uncompile_decoder_layers(trainer.model)


class TrimMalloc(TrainerCallback):
    """The heap trimmed after each optimizer step when memory comes first, and at the end of training always:
    what the stage does next (evaluation, generation, saving) starts from what is in use."""

    def __init__(self, after_every_step: bool):
        self.after_every_step = after_every_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.after_every_step:
            trim_malloc()

    def on_train_end(self, args, state, control, **kwargs):
        trim_malloc()


# ---- checkpoints ---------------------------------------------------------------------------------------------
class MarkCompleteCheckpoints(TrainerCallback):
    """Checkpoint bookkeeping for every stage's trainer (TRL's DPO, reward and GRPO trainers too): a marker in
    each checkpoint once every rank has written it, and what Ctrl-C should tell the user at this moment."""

    def on_step_end(self, args, state, control, **kwargs):
        self._note_for_interrupt(args, state)

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its part
        if args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            open(os.path.join(folder, CHECKPOINT_COMPLETE), "w").close()
        self._note_for_interrupt(args, state)

    @staticmethod
    def _note_for_interrupt(args, state):
        from medlora import cli

        checkpoint = RunFolder(args.output_dir).latest_complete_checkpoint()
        resume = (f"the last complete checkpoint is {checkpoint}; rerun the same command with "
                  "--resume_from_checkpoint True to continue from it") if checkpoint else \
            "no checkpoint was written yet, so nothing was saved"
        cli.note_for_interrupt(f"training interrupted at step {state.global_step} of {state.max_steps}; {resume}")


def training_loss_change(log_history) -> str:
    """First and last logged training loss, with their steps: a resumed run's log holds the earlier steps too,
    while the Trainer's own mean divides this session's losses by all steps."""
    logged = [entry for entry in log_history if "loss" in entry]
    if not logged:
        return "no training loss logged (fewer steps than --logging_steps)"
    first, last = logged[0], logged[-1]
    return f"training loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})"


# ---- arguments every stage's trainer shares -----------------------------------------------------------------
NON_REENTRANT_CHECKPOINTING = {"use_reentrant": False}  # reentrant checkpointing loses LoRA gradients


def gradient_accumulation_steps_for(batch_size: int, micro_batch_size: int) -> int:
    """--batch_size examples per optimizer step, made of --micro_batch_size on every torchrun process."""
    per_pass = micro_batch_size * distributed.world_size()
    if batch_size % per_pass:
        raise MedLoRAError(f"--batch_size {batch_size} must be a multiple of --micro_batch_size {micro_batch_size} "
                           f"x {distributed.world_size()} processes")
    return batch_size // per_pass


def resolve_report_to(report_to: str, wandb_project: str = "", wandb_watch: str = "", wandb_log_model: str = "") -> str:
    """--report_to checked; a --wandb_* flag turns Weights & Biases on (alpaca-lora's flags), through its variables."""
    if report_to not in ("none", "tensorboard", "wandb"):
        raise MedLoRAError(f"--report_to: unknown value {report_to!r}; use none, tensorboard or wandb")
    if not (wandb_project or report_to == "wandb"):
        return report_to
    for key, value in dict(WANDB_PROJECT=wandb_project, WANDB_WATCH=wandb_watch, WANDB_LOG_MODEL=wandb_log_model).items():
        if value:
            os.environ[key] = value
    return "wandb"


def prepare_quantized_for_training(model, gradient_checkpointing: bool):
    """PEFT's preparation of a 4-bit or 8-bit base for training, with non-reentrant checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs=NON_REENTRANT_CHECKPOINTING)


def resolve_warmup(warmup_steps: int | None, warmup_ratio: float, total_steps: int) -> int | float:
    """The warmup for TrainingArguments: --warmup_steps when given (0: none), else --warmup_ratio of the run.
    Warns when warmup would take most of the run: the learning rate would then never reach its peak."""
    if (warmup_steps is not None and warmup_steps < 0) or not 0 <= warmup_ratio < 1:
        raise MedLoRAError(f"--warmup_steps must be >= 0 and --warmup_ratio in [0, 1); got {warmup_steps}, {warmup_ratio}")
    if warmup_steps is not None:
        warmup_steps = int(warmup_steps)
    steps = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * total_steps)
    if total_steps and steps > total_steps / 2:
        logger.warning("warning: warmup takes %d of %d optimizer steps: the learning rate reaches its peak only "
                       "after most of the run; lower --warmup_steps or use --warmup_ratio", steps, total_steps)
    return warmup_steps if warmup_steps is not None else warmup_ratio


def optimizer_steps(train_examples: int, batch_size: int, num_epochs: float, max_steps: int) -> int:
    """Optimizer steps of a run (what the learning-rate schedule spans)."""
    return max_steps if max_steps > 0 else math.ceil(math.ceil(train_examples / batch_size) * num_epochs)


def resolve_resume_checkpoint(resume_from_checkpoint, output_dir):
    """--resume_from_checkpoint: True (the newest complete checkpoint in output_dir), a checkpoint folder, or None."""
    return RunFolder(output_dir).resume_checkpoint(resume_from_checkpoint)


