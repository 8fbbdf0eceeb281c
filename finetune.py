"""Fine-tune a causal LM into a medical chat assistant with LoRA or QLoRA.

    python finetune.py                                    # offline: built-in SmolLM2-135M-Instruct, bundled data
    python finetune.py --base_model meta-llama/Llama-3.1-8B --data_path ../shared/datasets/chatdoctor/genmedgpt_5k.json \
        --output_dir ./lora-chatdoctor --prompt_template_name chatdoctor --load_in_4bit
    torchrun --nproc_per_node=4 finetune.py --base_model ... --data_path ... --output_dir ...
    python finetune.py --help                             # every flag

Reads and validates every record before the model loads, prints a data summary, trains, and saves
the adapter (adapter_config.json, adapter_model.safetensors), the tokenizer and medlora_run.json
(the resolved settings) into --output_dir. Flags keep alpaca-lora's names and meanings.
"""

import logging
import math
import time
from collections import namedtuple
from pathlib import Path

from medlora import cli
from medlora.data.records import usage_lines
from medlora.data.templates import PromptTemplate
from medlora.data.tokenization import DROPPED_BY_TRUNCATION
from medlora.errors import MedLoRAError
from medlora.models.builtin import default_template_for
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "sft")
FinetuneResult = namedtuple("FinetuneResult", "model tokenizer trainer train_report")
logger = logging.getLogger("finetune")


def train(
    # model and data
    base_model: str = "",
    data_path: str = DEFAULT_DATA,
    output_dir: str = "./lora-medlora",
    field_map: str = "",
    skip_bad_records: bool = False,
    split_dialogues: bool = False,
    prompt_template_name: str = "",
    # training hyperparameters
    batch_size: int = 32,
    micro_batch_size: int = 4,
    num_epochs: int = 3,
    max_steps: int = -1,
    learning_rate: float = 3e-4,
    warmup_ratio: float = 0.05,
    warmup_steps: int | None = None,
    cutoff_len: int = 512,
    val_set_size: float = 0.05,
    seed: int = 42,
    # lora hyperparameters
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list | None = None,
    lora_modules_to_save: str | list | None = None,
    use_lora: bool = True,
    lora_weights: str = "",
    use_dora: bool = False,
    use_rslora: bool = False,
    # llm hyperparameters
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
    group_by_length: bool = False,
    packing: bool | None = None,
    precision: str = "auto",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    gradient_checkpointing: bool = False,
    neftune_noise_alpha: float | None = None,
    trust_remote_code: bool = False,
    # logging, evaluation, checkpoints
    logging_steps: int = 10,
    eval_steps: int = 200,
    save_steps: int = 200,
    save_total_limit: int = 3,
    report_to: str = "none",
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: str = "",
    wandb_log_model: str = "",
    resume_from_checkpoint: str | bool | None = None,
    overwrite_output_dir: bool = False,
    list_templates: bool = False,
):
    """Fine-tune BASE_MODEL on DATA_PATH with LoRA and save the adapter to OUTPUT_DIR.

    Returns a FinetuneResult (model, tokenizer, trainer, data report) when called from Python.

    Args:
        base_model: Hub id, local folder, or built-in: builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct, 135M parameters, Apache-2.0, real weights) or builtin:tiny-llama (1.5M-parameter random toy for tests); see docs/models.md. Default: the base of --lora_weights, else builtin:smollm2-135m-instruct.
        data_path: A .json/.jsonl/.csv/.parquet file, a folder of them, or a hub dataset name.
        output_dir: Where the adapter, tokenizer, medlora_run.json and checkpoints go.
        field_map: JSON mapping our field names to your columns, e.g. '{"input": "question", "output": "answer"}'.
        skip_bad_records: Drop invalid records (counted by reason in the summary) instead of stopping with a list of them.
        split_dialogues: Turn records that pack a whole dialogue into one field ('Human: ... Assistant: ...', '患者：... 医生：...') into real turns, every reply trained.
        prompt_template_name: A template in templates/ (see --list_templates) or a template .json; default: a built-in model's own (chat for SmolLM2), else alpaca.
        batch_size: Examples per optimizer step, all processes together (alpaca-lora used 128 for 52k records; 32 gives the bundled data 48 optimizer steps in 3 epochs).
        micro_batch_size: Examples per forward pass on one device; accumulation makes up the rest.
        num_epochs: Passes over the training records.
        cutoff_len: Maximum tokens per record; longer records are truncated (and dropped if no reply token is left).
        val_set_size: Records held out for validation: a count, or a fraction when below 1; 0 for none.
        lora_modules_to_save: Modules trained in full and saved with the adapter (e.g. lm_head,embed_tokens).
        use_lora: False for full fine-tuning (every weight trained; the output folder is a whole model).
        lora_weights: An existing adapter folder to continue training (e.g. from pretrain.py) instead of a new one.
        use_dora: DoRA: weight-decomposed LoRA.
        use_rslora: rank-stabilised LoRA scaling (lora_alpha / sqrt(lora_r)).
        train_on_inputs: Also train on prompt tokens; by default the loss covers the assistant's replies only.
        add_eos_token: End every reply with EOS so that the tuned model learns to stop.
        group_by_length: Draw batches of similar length (less padding when --packing is off).
        packing: Padding-free batches (records of a micro-batch in one row, no pad token). Default: on where the architecture supports it.
        neftune_noise_alpha: NEFTune: add uniform noise of this scale to the input embeddings while training.
        logging_steps: Log the training loss every this many optimizer steps.
        eval_steps: Evaluate on the validation records every this many optimizer steps.
        list_templates: Print the available templates and exit.
    """
    settings = dict(locals())  # the flags as given, saved in medlora_run.json
    # Imported here, not at the top, so that --help answers without loading torch and transformers.
    from medlora.data.records import load_conversations
    from medlora.data.splits import split_validation
    from medlora.data.tokenization import ConversationEncoder
    from medlora.flags import check_numeric_flags
    from medlora.models.loading import (
        continued_adapter_defaults,
        count_parameters,
        fit_embeddings_to_tokenizer,
        load_base_model,
        load_tokenizer,
        resolve_base_model,
        resolve_lora_targets,
        resolve_modules_to_save,
        resolve_precision,
        trainable_parameters_to_fp32,
    )
    from medlora.models.packed_attention import PACKED_ATTENTION, use_packed_attention
    from medlora.run_folder import RunFolder
    from medlora.training import distributed
    from medlora.training.collators import (
        PackedCollator,
        PaddedCollator,
        supports_packing,
    )
    from medlora.training.saving import save_trained_model
    from medlora.training.trainer import (
        LabelOnlyLossTrainer,
        gradient_accumulation_steps_for,
        optimizer_steps,
        prepare_quantized_for_training,
        resolve_report_to,
        resolve_resume_checkpoint,
        resolve_warmup,
        shared_training_arguments,
        training_loss_change,
    )

    if list_templates:
        from medlora.data.templates import available_templates

        for name in available_templates():
            print(f"{name:14s} {PromptTemplate.load(name).description}")
        return
    started = time.time()
    world_size, is_main = distributed.world_size(), distributed.is_main_process()
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    check_numeric_flags(settings)
    gradient_accumulation_steps = gradient_accumulation_steps_for(batch_size, micro_batch_size)
    report_to = resolve_report_to(report_to, wandb_project, wandb_watch, wandb_log_model)
    resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)
    if not (resume_from_checkpoint or overwrite_output_dir):
        RunFolder(output_dir).refuse_finished_run()
    # --lora_weights continues an adapter (e.g. pretrain.py's): its base and template unless given
    base_model, prompt_template_name = continued_adapter_defaults(lora_weights if use_lora else "", base_model,
                                                                  prompt_template_name)

    # ---- data: every record validated and tokenized once (on rank 0), before any model is loaded ----------
    def prepare_data():
        template = PromptTemplate.load(prompt_template_name or default_template_for(base_model))
        loaded = load_conversations(data_path, field_map, skip_bad_records, split_dialogues)
        conversations = loaded.conversations
        train_conversations, val_conversations = split_validation(conversations, val_set_size, seed, "records")
        model_path = resolve_base_model(base_model)
        encoder = ConversationEncoder(load_tokenizer(model_path, trust_remote_code), template, cutoff_len,
                                      train_on_inputs, add_eos_token)
        train_report, val_report = encoder.encode(train_conversations), encoder.encode(val_conversations)
        if not train_report.examples:
            raise MedLoRAError(f"{data_path}: no training record has a trained token left after truncation at "
                               f"--cutoff_len {cutoff_len}")
        return template, loaded, train_report, val_report, model_path

    template, loaded, train_report, val_report, model_path = distributed.run_once_and_share(prepare_data)

    # ---- model ---------------------------------------------------------------------------------------------
    import torch
    import transformers

    transformers.set_seed(seed)
    precision_plan = resolve_precision(precision)
    dtype = precision_plan.weights
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    # Full fine-tuning in fp16 keeps fp32 weights under autocast: fp16 trainable parameters underflow.
    load_dtype = torch.float32 if (not use_lora and dtype == torch.float16) else dtype
    model = load_base_model(model_path, load_dtype, load_in_4bit, load_in_8bit, trust_remote_code)
    fit_embeddings_to_tokenizer(model, tokenizer)
    if packing is None:
        packing = supports_packing(model)
    elif packing and not supports_packing(model):
        raise MedLoRAError(f"--packing: the {model.config.model_type} architecture does not support padding-free batches")
    attention = model.config._attn_implementation
    if packing and use_packed_attention(model, cutoff_len):
        attention = PACKED_ATTENTION
    if load_in_4bit or load_in_8bit:
        if not use_lora:
            raise MedLoRAError("--load_in_4bit/--load_in_8bit need LoRA: quantized weights cannot be trained directly")
        model = prepare_quantized_for_training(model, gradient_checkpointing)
    targets = None
    if use_lora and lora_weights:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, lora_weights, is_trainable=True)
        targets = sorted(model.peft_config["default"].target_modules)
    elif use_lora:
        from peft import LoraConfig, get_peft_model

        targets = resolve_lora_targets(model, lora_target_modules)
        modules_to_save = resolve_modules_to_save(model, lora_modules_to_save) if lora_modules_to_save else None
        model = get_peft_model(model, LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, bias="none",
            task_type="CAUSAL_LM", use_dora=use_dora, use_rslora=use_rslora, modules_to_save=modules_to_save))
    trainable_parameters_to_fp32(model)
    trainable, total = count_parameters(model)

    if is_main:
        print_data_summary(loaded, train_report, val_report, cutoff_len, trainable, total, template)

    total_steps = optimizer_steps(len(train_report.examples), batch_size, num_epochs, max_steps)
    warmup = resolve_warmup(warmup_steps, warmup_ratio, total_steps)
    as_dicts = lambda report: [{"input_ids": e.input_ids, "labels": e.labels} for e in report.examples]  # noqa: E731
    args = transformers.TrainingArguments(
        output_dir=output_dir,
        **shared_training_arguments(
            micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            num_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate, warmup_steps=warmup,
            dtype=dtype, autocast_bf16=precision_plan.autocast_bf16,
            gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps,
            save_steps=save_steps, save_total_limit=save_total_limit, report_to=report_to,
            wandb_run_name=wandb_run_name, seed=seed, validation=bool(val_report.examples), eval_steps=eval_steps),
        neftune_noise_alpha=neftune_noise_alpha,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        remove_unused_columns=False,
        prediction_loss_only=True,
    )
    trainer = LabelOnlyLossTrainer(
        model=model,
        args=args,
        train_dataset=as_dicts(train_report),
        eval_dataset=as_dicts(val_report) or None,
        data_collator=PackedCollator() if packing else PaddedCollator(tokenizer.pad_token_id),
    )
    model.config.use_cache = False
    if is_main:
        processes = "1 process" if world_size == 1 else f"{world_size} processes (data parallel)"
        print(f"training: {processes}, {total_steps} optimizer steps, precision {precision_plan.describe()}, "
              f"{'packed' if packing else 'padded'} batches, {attention} attention, "
              f"{gradient_accumulation_steps} accumulation step(s)", flush=True)
    validation = bool(val_report.examples)
    # Step 0: every run shows where it started (train() starts a new log, so the entry is put back after it).
    start = trainer.evaluate() if validation and not resume_from_checkpoint else None
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if start:
        trainer.state.log_history.insert(0, {**start, "epoch": 0.0, "step": 0})
    if validation and not any(entry.get("step") == result.global_step and "eval_loss" in entry
                              for entry in trainer.state.log_history):
        trainer.evaluate()  # the end point, when the last step was not an evaluation step

    # ---- save ----------------------------------------------------------------------------------------------
    if attention == PACKED_ATTENTION:  # a training-time choice; saved configs keep the stock implementation
        model.set_attn_implementation("sdpa")
    if trainer.is_world_process_zero():
        settings.update(base_model=base_model, resolved_base_model=model_path, prompt_template_name=template.name,
                        lora_target_modules=targets, packing=packing, dtype=str(dtype).replace("torch.", ""),
                        world_size=world_size, gradient_accumulation_steps=gradient_accumulation_steps,
                        autocast_bf16=precision_plan.autocast_bf16,
                        # absolute, so that evaluate.py can split the validation records again from anywhere
                        data_path=str(Path(data_path).resolve()) if Path(data_path).exists() else data_path)
        save_trained_model(model, tokenizer, output_dir, settings, trainer.state.log_history)
        elapsed = time.time() - started
        tokens = train_report.trained_tokens * result.metrics.get("epoch", num_epochs)
        print(f"done in {elapsed:.0f}s: {result.global_step} steps, {training_loss_change(trainer.state.log_history)}, "
              f"~{tokens / max(result.metrics['train_runtime'], 1e-9):.0f} trained tokens/s; adapter in {output_dir}")
        print(validation_change(trainer.state.log_history))
    return FinetuneResult(model, tokenizer, trainer, train_report)


def validation_change(log_history) -> str:
    """First and last validation loss and perplexity of the run (step 0 is the untuned start)."""
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if not evals:
        return "validation: none (--val_set_size 0)"
    first, last = evals[0], evals[-1]
    return (f"validation loss {first['eval_loss']:.4f} (step {first['step']}) -> {last['eval_loss']:.4f} "
            f"(step {last['step']}); perplexity {math.exp(first['eval_loss']):.2f} -> {math.exp(last['eval_loss']):.2f}")


def print_data_summary(loaded, train_report, val_report, cutoff_len, trainable, total, template):
    dropped = loaded.skipped + train_report.dropped + val_report.dropped
    read = len(loaded.conversations) + sum(loaded.skipped.values())
    pct = train_report.percentiles()
    cut_dropped = train_report.dropped[DROPPED_BY_TRUNCATION] + val_report.dropped[DROPPED_BY_TRUNCATION]
    lines = [
        f"data: {loaded.describe()}",
        *usage_lines("records", read, len(train_report.examples), len(val_report.examples), dropped,
                     loaded.skipped_records),
        *filter(None, [loaded.describe_packed_dialogues()]),
        f"template: {template.name}",
        "tokens per training record, before truncation: " + ", ".join(f"p{p} {v}" for p, v in pct.items()).replace(
            "p100", "max"),
        f"cut at cutoff_len={cutoff_len}: {train_report.truncated + val_report.truncated} records kept truncated, "
        f"{cut_dropped} dropped (no reply token left)",
        f"trained tokens per epoch: {train_report.trained_tokens}",
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    from medlora.training.malloc import restart_with_lean_malloc

    restart_with_lean_malloc()  # once, before anything loads: glibc's tcache off (less memory on CPU)
    cli.run(train)
