"""What every training stage does around its own data and trainer, written once.

finetune.py, pretrain.py, dpo.py, reward.py and rl.py each read their data and build their trainer; the rest
(flags checked before any work, the run folder, the base model and template inherited from an adapter,
precision, loading and preparing the model, the Trainer arguments, saving, the closing line) is here:

    stage = TrainingStage("sft", flags)        # checks; refuses a finished run; resolves the defaults
    ...                                        # the stage's data phase
    model, tokenizer = stage.load_model(model_path)
    trainer = SomeTrainer(args=stage.training_arguments(TrainingArguments, ...), ...)
    stage.save(model, tokenizer, trainer, lora_target_modules=...)
"""

import logging
import time

from medlora.errors import MedLoRAError


class TrainingStage:
    def __init__(self, name: str, flags):
        from medlora.flags import check_numeric_flags
        from medlora.models.loading import continued_adapter_defaults, resolve_precision
        from medlora.run_folder import RunFolder
        from medlora.training import distributed
        from medlora.training.trainer import (
            gradient_accumulation_steps_for,
            resolve_report_to,
            resolve_resume_checkpoint,
        )

        self.name, self.flags, self.started = name, flags, time.time()
        self.settings = flags.as_dict()  # the flags as given, saved in medlora_run.json with what was resolved
        self.world_size, self.is_main = distributed.world_size(), distributed.is_main_process()
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING, format="%(message)s")
        check_numeric_flags(self.settings)
        self.use_lora = getattr(flags, "use_lora", True)
        if not self.use_lora and (flags.load_in_4bit or flags.load_in_8bit):
            raise MedLoRAError("--load_in_4bit/--load_in_8bit need LoRA: quantized weights cannot be trained directly")
        self.gradient_accumulation_steps = gradient_accumulation_steps_for(flags.batch_size, flags.micro_batch_size)
        self.report_to = resolve_report_to(flags.report_to, flags.wandb_project, flags.wandb_watch,
                                           flags.wandb_log_model)
        self.resume_from_checkpoint = resolve_resume_checkpoint(flags.resume_from_checkpoint, flags.output_dir)
        if not (self.resume_from_checkpoint or flags.overwrite_output_dir):
            RunFolder(flags.output_dir).refuse_finished_run()
        # A stage that continues an adapter trains on its base with its template unless told otherwise.
        self.lora_weights = getattr(flags, "lora_weights", "") if self.use_lora else ""
        self.base_model, self.template_name = continued_adapter_defaults(
            self.lora_weights, flags.base_model, getattr(flags, "prompt_template_name", ""))
        self.precision = resolve_precision(flags.precision)  # an unknown value fails here, before any work
        if getattr(flags, "torch_compile", False):
            from medlora.training.compiling import check_compiler

            check_compiler()

    def data_tokenizer(self) -> tuple:
        """(resolved base model path, tokenizer) for the data phase, which runs before the model loads: the
        adapter's tokenizer when continuing one (it may carry an added pad token), else the base's."""
        from medlora.models.loading import load_tokenizer, resolve_base_model

        model_path = resolve_base_model(self.base_model)
        return model_path, load_tokenizer(self.lora_weights or model_path, self.flags.trust_remote_code)

    def load_model(self, model_path: str, **load_options) -> tuple:
        """(model, tokenizer): the base in the stage's precision (quantized and prepared for training with
        --load_in_4bit/8bit), its embeddings fitted to the tokenizer; the adapter's tokenizer when continuing one."""
        import torch
        import transformers

        from medlora.models.loading import (
            fit_embeddings_to_tokenizer,
            load_base_model,
            load_tokenizer,
        )
        from medlora.training.trainer import prepare_quantized_for_training

        flags = self.flags
        transformers.set_seed(flags.seed)
        tokenizer = load_tokenizer(self.lora_weights or model_path, flags.trust_remote_code)
        # Full training in fp16 keeps fp32 weights under autocast: fp16 trainable parameters underflow.
        dtype = torch.float32 if (not self.use_lora and self.precision.weights == torch.float16) else self.precision.weights
        model = load_base_model(model_path, dtype, flags.load_in_4bit, flags.load_in_8bit, flags.trust_remote_code,
                                **load_options)
        fit_embeddings_to_tokenizer(model, tokenizer)
        if flags.load_in_4bit or flags.load_in_8bit:
            model = prepare_quantized_for_training(model, flags.gradient_checkpointing)
        return model, tokenizer

    def training_arguments(self, config_class, *, validation: bool | None, train_examples: int, **extra):
        """The Trainer's (or a TRL config's) arguments: the fields every stage sets the same way (precision from
        the hardware, checkpoints, logging, seeds, torchrun on CPU or GPU) from the shared flags, plus the stage's
        own `extra`. validation: None for a stage that never evaluates, else whether there are validation
        examples; train_examples: what --batch_size counts."""
        import torch

        from medlora.training import distributed
        from medlora.training.trainer import NON_REENTRANT_CHECKPOINTING, optimizer_steps, resolve_warmup

        flags, precision = self.flags, self.precision
        self.total_steps = optimizer_steps(train_examples, flags.batch_size, flags.num_epochs, flags.max_steps)
        on_gpu = torch.cuda.is_available()
        arguments = dict(
            per_device_train_batch_size=flags.micro_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            num_train_epochs=flags.num_epochs,
            max_steps=flags.max_steps,
            learning_rate=flags.learning_rate,
            warmup_steps=resolve_warmup(flags.warmup_steps, flags.warmup_ratio, self.total_steps),
            bf16=(on_gpu and precision.weights == torch.bfloat16) or precision.autocast_bf16,
            fp16=on_gpu and precision.weights == torch.float16,
            # transformers 5's names (gradient_checkpointing* are deprecated aliases); set explicitly, they also
            # override TRL configs' default of checkpointing on
            activation_checkpointing=flags.gradient_checkpointing,
            activation_checkpointing_kwargs=NON_REENTRANT_CHECKPOINTING,
            logging_steps=flags.logging_steps,
            save_strategy="steps",
            save_steps=flags.save_steps,
            save_total_limit=flags.save_total_limit,
            report_to=[] if self.report_to == "none" else [self.report_to],
            run_name=flags.wandb_run_name or None,
            seed=flags.seed,
            data_seed=flags.seed,
            ddp_find_unused_parameters=False if distributed.world_size() > 1 else None,
            disable_tqdm=not distributed.is_main_process(),
            dataloader_pin_memory=on_gpu,
            # Without use_cpu, torchrun on a machine without GPU runs unsynchronised copies of the model.
            use_cpu=not on_gpu and not torch.backends.mps.is_available(),
        )
        if validation is not None:
            arguments.update(per_device_eval_batch_size=flags.micro_batch_size,
                             eval_strategy="steps" if validation else "no", eval_steps=getattr(flags, "eval_steps", None))
        return config_class(output_dir=flags.output_dir, **arguments, **extra)

    def save(self, model, tokenizer, trainer, **resolved) -> bool:
        """On the main process: the model, tokenizer, training log and medlora_run.json (the flags as given
        and what was resolved) into --output_dir. Returns whether this process saved."""
        from medlora.training.saving import save_trained_model
        from medlora.training.trainer import undo_training_changes

        undo_training_changes(trainer)
        if not trainer.is_world_process_zero():
            return False
        self.settings.update(stage=self.name, base_model=self.base_model, dtype=str(self.precision.weights).replace(
            "torch.", ""), autocast_bf16=self.precision.autocast_bf16, world_size=self.world_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, **resolved)
        save_trained_model(model, tokenizer, self.flags.output_dir, self.settings, trainer.state.log_history)
        return True

    def done(self, trainer, result, summary: str) -> None:
        """The closing line: time, steps, the training loss from first to last logged step, the stage's summary."""
        from medlora.training.trainer import training_loss_change

        print(f"done in {time.time() - self.started:.0f}s: {result.global_step} steps, "
              f"{training_loss_change(trainer.state.log_history)}{summary}", flush=True)
