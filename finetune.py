r"""Fine-tune a causal LM into a medical chat assistant with LoRA or QLoRA.

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
from collections import namedtuple
from pathlib import Path

from medlora import cli
from medlora.data.records import usage_lines
from medlora.data.templates import PromptTemplate
from medlora.data.tokenization import DROPPED_BY_TRUNCATION
from medlora.errors import MedLoRAError
from medlora.flag_groups import CHECKPOINTS, DATA, HYGIENE, LORA, MODEL, SPEED, TRAINING
from medlora.flags import Flag, FlagGroup, stage_flags
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "sft")
FinetuneResult = namedtuple("FinetuneResult", "model tokenizer trainer train_report")
logger = logging.getLogger("finetune")


@stage_flags(
    MODEL,
    DATA.but(data_path=DEFAULT_DATA, output_dir="./lora-medlora"),
    FlagGroup("sft data", split_dialogues=False),
    HYGIENE,
    TRAINING.but(num_epochs=3),
    SPEED,
    LORA,
    FlagGroup("lora variants", lora_modules_to_save=Flag(None, str | list | None), use_lora=True, use_dora=False,
              use_rslora=False),
    FlagGroup("llm hyperparameters", train_on_inputs=False, add_eos_token=True, group_by_length=False,
              packing=Flag(None, bool | None), neftune_noise_alpha=Flag(None, float | None)),
    CHECKPOINTS,
    FlagGroup("information", list_templates=False),
)
def train(flags):
    """Fine-tune BASE_MODEL on DATA_PATH with LoRA and save the adapter to OUTPUT_DIR.

    Returns a FinetuneResult (model, tokenizer, trainer, data report) when called from Python.

    Args:
        base_model: Hub id, local folder, or built-in: builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct, 135M parameters, Apache-2.0, real weights) or builtin:tiny-llama (1.5M-parameter random toy for tests); see docs/models.md. Default: the base of --lora_weights, else builtin:smollm2-135m-instruct.
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
    if flags.list_templates:
        from medlora.data.templates import available_templates

        for name in available_templates():
            print(f"{name:14s} {PromptTemplate.load(name).description}")
        return None
    from medlora.training import distributed
    from medlora.training.stage import TrainingStage

    stage = TrainingStage("sft", flags)
    template, loaded, hygiene, train_report, val_report, model_path = distributed.run_once_and_share(
        lambda: prepare_data(flags, stage))
    model, tokenizer, packing, attention, targets = build_model(flags, stage, model_path)
    if stage.is_main:
        print_data_summary(loaded, hygiene, train_report, val_report, flags.cutoff_len, model, template)
    trainer = build_trainer(flags, stage, model, tokenizer, train_report, val_report, packing)
    if stage.is_main:
        processes = "1 process" if stage.world_size == 1 else f"{stage.world_size} processes (data parallel)"
        print(f"training: {processes}, {stage.total_steps} optimizer steps, precision {stage.precision.describe()}, "
              f"{'packed' if packing else 'padded'} batches, {attention} attention, "
              f"{stage.gradient_accumulation_steps} accumulation step(s)"
              f"{', decoder layers compiled (the first step includes compiling)' if flags.torch_compile else ''}",
              flush=True)
    result = train_with_start_and_end_evaluation(trainer, stage.resume_from_checkpoint)

    # ---- save ----------------------------------------------------------------------------------------------
    from medlora.models.packed_attention import PACKED_ATTENTION

    if attention == PACKED_ATTENTION:  # a training-time choice; saved configs keep the stock implementation
        model.set_attn_implementation("sdpa")
    data_path = flags.data_path  # absolute, so that evaluate.py can split the validation records again from anywhere
    if stage.save(model, tokenizer, trainer, resolved_base_model=model_path, prompt_template_name=template.name,
                  lora_target_modules=targets, packing=packing,
                  data_path=str(Path(data_path).resolve()) if Path(data_path).exists() else data_path):
        tokens = train_report.trained_tokens * result.metrics.get("epoch", flags.num_epochs)
        stage.done(trainer, result, f", ~{tokens / max(result.metrics['train_runtime'], 1e-9):.0f} trained tokens/s; "
                                    f"adapter in {flags.output_dir}")
        print(validation_change(trainer.state.log_history))
    return FinetuneResult(model, tokenizer, trainer, train_report)


def prepare_data(flags, stage) -> tuple:
    """Every record read, validated, checked for duplicates, evaluation questions and personal identifiers,
    split and tokenized (on rank 0), before any model is loaded."""
    from medlora.data.hygiene import clean_conversations
    from medlora.data.records import load_conversations
    from medlora.data.splits import split_validation
    from medlora.data.tokenization import ConversationEncoder

    template = PromptTemplate.load(stage.template_name)
    loaded = load_conversations(flags.data_path, flags.field_map, flags.skip_bad_records, flags.split_dialogues)
    loaded.conversations, hygiene = clean_conversations(loaded.conversations, flags)
    train_conversations, val_conversations = split_validation(loaded.conversations, flags.val_set_size, flags.seed,
                                                              "records")
    model_path, tokenizer = stage.data_tokenizer()
    encoder = ConversationEncoder(tokenizer, template, flags.cutoff_len, flags.train_on_inputs, flags.add_eos_token)
    train_report, val_report = encoder.encode(train_conversations), encoder.encode(val_conversations)
    if not train_report.examples:
        longest = train_report.percentiles((50, 100))
        raise MedLoRAError(f"{flags.data_path}: no training record has a trained token left after truncation at "
                           f"--cutoff_len {flags.cutoff_len} (the records are {longest.get(50)} tokens at the median, "
                           f"{longest.get(100)} at most: raise --cutoff_len)")
    return template, loaded, hygiene, train_report, val_report, model_path


def build_model(flags, stage, model_path) -> tuple:
    """(model, tokenizer, packing, attention, LoRA targets): the base with a new or continued adapter (or
    every weight trainable with --use_lora False), trainable parameters in fp32."""
    from medlora.models.loading import (
        resolve_lora_targets,
        resolve_modules_to_save,
        trainable_parameters_to_fp32,
    )
    from medlora.models.packed_attention import PACKED_ATTENTION, use_packed_attention
    from medlora.training.collators import supports_packing

    model, tokenizer = stage.load_model(model_path)
    packing = supports_packing(model) if flags.packing is None else flags.packing
    if packing and not supports_packing(model):
        raise MedLoRAError(f"--packing: the {model.config.model_type} architecture does not support padding-free batches")
    attention = model.config._attn_implementation
    if packing and use_packed_attention(model, flags.cutoff_len):
        attention = PACKED_ATTENTION
    targets = None
    if stage.lora_weights:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, stage.lora_weights, is_trainable=True)
        targets = sorted(model.peft_config["default"].target_modules)
    elif flags.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = resolve_lora_targets(model, flags.lora_target_modules)
        modules_to_save = (resolve_modules_to_save(model, flags.lora_modules_to_save)
                           if flags.lora_modules_to_save else None)
        model = get_peft_model(model, LoraConfig(
            r=flags.lora_r, lora_alpha=flags.lora_alpha, lora_dropout=flags.lora_dropout, target_modules=targets,
            bias="none", task_type="CAUSAL_LM", use_dora=flags.use_dora, use_rslora=flags.use_rslora,
            modules_to_save=modules_to_save))
    trainable_parameters_to_fp32(model)
    model.config.use_cache = False
    return model, tokenizer, packing, attention, targets


def build_trainer(flags, stage, model, tokenizer, train_report, val_report, packing):
    """The label-only-loss Trainer on packed (or padded) micro-batches."""
    import transformers

    from medlora.training.collators import PackedCollator, PaddedCollator
    from medlora.training.trainer import LabelOnlyLossTrainer

    as_dicts = lambda report: [{"input_ids": e.input_ids, "labels": e.labels} for e in report.examples]  # noqa: E731
    args = stage.training_arguments(
        transformers.TrainingArguments, validation=bool(val_report.examples),
        train_examples=len(train_report.examples), neftune_noise_alpha=flags.neftune_noise_alpha,
        train_sampling_strategy="group_by_length" if flags.group_by_length else "random",
        remove_unused_columns=False, prediction_loss_only=True)
    return LabelOnlyLossTrainer(
        model=model, args=args, train_dataset=as_dicts(train_report), eval_dataset=as_dicts(val_report) or None,
        data_collator=PackedCollator() if packing else PaddedCollator(tokenizer.pad_token_id),
        compile_layers=flags.torch_compile)


def train_with_start_and_end_evaluation(trainer, resume_from_checkpoint):
    """Train, with the validation loss at step 0 (every run shows where it started) and at the last step."""
    validation = trainer.eval_dataset is not None
    start = trainer.evaluate() if validation and not resume_from_checkpoint else None
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if start:  # train() starts a new log, so the entry is put back after it
        trainer.state.log_history.insert(0, {**start, "epoch": 0.0, "step": 0})
    if validation and not any(entry.get("step") == result.global_step and "eval_loss" in entry
                              for entry in trainer.state.log_history):
        trainer.evaluate()  # the end point, when the last step was not an evaluation step
    return result


def validation_change(log_history) -> str:
    """First and last validation loss and perplexity of the run (step 0 is the untuned start)."""
    evals = [entry for entry in log_history if "eval_loss" in entry]
    if not evals:
        return "validation: none (--val_set_size 0)"
    first, last = evals[0], evals[-1]
    return (f"validation loss {first['eval_loss']:.4f} (step {first['step']}) -> {last['eval_loss']:.4f} "
            f"(step {last['step']}); perplexity {math.exp(first['eval_loss']):.2f} -> {math.exp(last['eval_loss']):.2f}")


def print_data_summary(loaded, hygiene, train_report, val_report, cutoff_len, model, template):
    from medlora.models.loading import count_parameters

    trainable, total = count_parameters(model)
    dropped = loaded.skipped + hygiene.dropped + train_report.dropped + val_report.dropped
    read = hygiene.checked + sum(loaded.skipped.values())
    pct = train_report.percentiles()
    cut_dropped = train_report.dropped[DROPPED_BY_TRUNCATION] + val_report.dropped[DROPPED_BY_TRUNCATION]
    lines = [
        f"data: {loaded.describe()}",
        *usage_lines("records", read, len(train_report.examples), len(val_report.examples), dropped,
                     loaded.skipped_records),
        *filter(None, [loaded.describe_packed_dialogues()]),
        *hygiene.lines(),
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
