"""Continued pretraining (PT) of a causal LM on plain medical text, with LoRA, QLoRA or full weights.

    python pretrain.py                                    # offline: built-in SmolLM2-135M-Instruct, data/pretrain/
    python pretrain.py --base_model Qwen/Qwen2.5-1.5B --data_path ../shared/datasets/medicalgpt/pretrain_fever_zh.txt \
        --output_dir ./pt-fever --block_size 1024 --load_in_4bit
    python pretrain.py --use_lora False --base_model ... --output_dir ./pt-full   # update every weight
    torchrun --nproc_per_node=4 pretrain.py --base_model ... --data_path ./corpus/ --output_dir ./pt-medlora
    python pretrain.py --help                             # every flag

Reads every document (.txt: one a line; .jsonl/.json: a `text` field; or a folder of them) before
the model loads, holds some documents out for validation, joins the documents with EOS and cuts them
into blocks of --block_size tokens, trains on every token (labels = input_ids) and reports the
validation perplexity before and after. The output folder holds a LoRA adapter (or, with
--use_lora False, a full model), the tokenizer and medlora_run.json. Next stage (docs/pipeline.md):
`python finetune.py --lora_weights OUTPUT_DIR` continues this adapter on chat data.
"""

import logging
import math
import time

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.models.builtin import DEFAULT_BASE_MODEL
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "pretrain")
logger = logging.getLogger("pretrain")


def pretrain(
    # model and data
    base_model: str = DEFAULT_BASE_MODEL,
    data_path: str = DEFAULT_DATA,
    output_dir: str = "./pt-medlora",
    text_field: str = "text",
    skip_bad_records: bool = False,
    block_size: int = 512,
    use_lora: bool = True,
    # training hyperparameters
    batch_size: int = 32,
    micro_batch_size: int = 4,
    num_epochs: int = 1,
    max_steps: int = -1,
    learning_rate: float = 2e-4,
    warmup_steps: int = 10,
    val_set_size: float = 0.05,
    seed: int = 42,
    # lora hyperparameters
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: str | list | None = None,
    # model loading
    precision: str = "auto",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    # logging, evaluation, checkpoints
    logging_steps: int = 10,
    eval_steps: int = 200,
    save_steps: int = 200,
    save_total_limit: int = 3,
    report_to: str = "none",
    wandb_project: str = "",
    wandb_run_name: str = "",
    resume_from_checkpoint: str | bool | None = None,
):
    """Continue pretraining BASE_MODEL on the plain text in DATA_PATH and save the result to OUTPUT_DIR.

    Args:
        base_model: Hub id or local folder of a causal LM. The default is the built-in SmolLM2-135M-Instruct (builtin:tiny-llama: a random toy for tests).
        data_path: A .txt file (one document a line), a .jsonl/.json file of {"text": ...} records, or a folder of them.
        output_dir: Where the adapter (or full model), tokenizer, medlora_run.json and checkpoints go.
        text_field: The field that holds the document in .jsonl/.json records.
        skip_bad_records: Drop invalid records of .json/.jsonl files (each listed in the summary) instead of stopping with a list of them.
        block_size: Tokens per training block; documents are joined with EOS and cut into blocks of exactly this size.
        use_lora: Train a LoRA adapter (True) or every weight of the model (False; needs memory for the full optimizer state).
        batch_size: Blocks per optimizer step, all processes together.
        micro_batch_size: Blocks per forward pass on one device; accumulation makes up the rest.
        num_epochs: Passes over the training blocks.
        val_set_size: Documents held out for validation (perplexity): a count, or a fraction when below 1; 0 for none.
        load_in_4bit: QLoRA: load the base in 4-bit NF4 with double quantization (bitsandbytes); needs --use_lora.
        load_in_8bit: Load the base in 8-bit (bitsandbytes); needs --use_lora.
        logging_steps: Log the training loss every this many optimizer steps.
        eval_steps: Evaluate on the validation blocks every this many optimizer steps.
    """
    settings = dict(locals())  # the flags as given, saved in medlora_run.json
    # Imported here, not at the top, so that --help answers without loading torch and transformers.
    from medlora.data.pretraining import (
        group_into_blocks,
        load_documents,
        tokenize_documents,
    )
    from medlora.data.splits import split_validation
    from medlora.flags import check_numeric_flags
    from medlora.models.loading import (
        count_parameters,
        fit_embeddings_to_tokenizer,
        load_base_model,
        load_tokenizer,
        resolve_base_model,
        resolve_lora_targets,
        resolve_precision,
        trainable_parameters_to_fp32,
    )
    from medlora.training import distributed
    from medlora.training.collators import PaddedCollator
    from medlora.training.saving import save_trained_model
    from medlora.training.trainer import (
        LabelOnlyLossTrainer,
        gradient_accumulation_steps_for,
        prepare_quantized_for_training,
        resolve_report_to,
        resolve_resume_checkpoint,
        shared_training_arguments,
        training_loss_change,
    )

    started = time.time()
    world_size, is_main = distributed.world_size(), distributed.is_main_process()
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(message)s")
    check_numeric_flags(settings)
    gradient_accumulation_steps = gradient_accumulation_steps_for(batch_size, micro_batch_size)
    if not use_lora and (load_in_4bit or load_in_8bit):
        raise MedLoRAError("--load_in_4bit/--load_in_8bit need LoRA: quantized weights cannot be trained directly")
    report_to = resolve_report_to(report_to, wandb_project)
    resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)

    # ---- data: every document read, tokenized and cut into blocks once (on rank 0), before the model loads --
    def prepare_data():
        loaded = load_documents(data_path, text_field, skip_bad_records)
        documents = list(loaded.documents)
        train_documents, val_documents = split_validation(documents, val_set_size, seed, "documents")
        model_path = resolve_base_model(base_model)
        tokenizer = load_tokenizer(model_path, trust_remote_code)
        train_blocks = group_into_blocks(tokenize_documents(tokenizer, train_documents), block_size)
        if not train_blocks.blocks:
            raise MedLoRAError(f"{data_path}: the training documents hold {train_blocks.tokens} tokens, less than "
                               f"one block of --block_size {block_size}; lower --block_size")
        val_tokens = tokenize_documents(tokenizer, val_documents)
        val_blocks = group_into_blocks(val_tokens, block_size)
        if val_documents and not val_blocks.blocks:
            # A small held-out split (the bundled notes) still gets a perplexity: one shorter block of all of it.
            val_blocks = group_into_blocks(val_tokens, val_blocks.tokens)
            logging.getLogger("pretrain").info(
                "validation: the %d held-out documents hold %d tokens, less than --block_size %d: evaluated as one "
                "block of %d tokens", len(val_documents), val_blocks.tokens, block_size, val_blocks.tokens)
        return loaded.describe(), model_path, train_blocks, val_blocks

    data_description, model_path, train_blocks, val_blocks = distributed.run_once_and_share(prepare_data)

    # ---- model ---------------------------------------------------------------------------------------------
    import torch
    import transformers

    transformers.set_seed(seed)
    precision_plan = resolve_precision(precision)
    dtype = precision_plan.weights
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    # Full training in fp16 keeps fp32 weights under autocast: fp16 trainable parameters underflow.
    load_dtype = torch.float32 if (not use_lora and dtype == torch.float16) else dtype
    model = load_base_model(model_path, load_dtype, load_in_4bit, load_in_8bit, trust_remote_code)
    fit_embeddings_to_tokenizer(model, tokenizer)
    if load_in_4bit or load_in_8bit:
        model = prepare_quantized_for_training(model, gradient_checkpointing)
    targets = None
    if use_lora:
        from peft import LoraConfig, get_peft_model

        targets = resolve_lora_targets(model, lora_target_modules)
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                 target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    trainable_parameters_to_fp32(model)
    trainable, total = count_parameters(model)
    if is_main:
        print("\n".join([
            f"data: {data_description}",
            f"documents: {train_blocks.documents + val_blocks.documents} read ({train_blocks.documents} train, "
            f"{val_blocks.documents} validation), {train_blocks.tokens + val_blocks.tokens} tokens with EOS",
            f"blocks of {block_size} tokens: {len(train_blocks.blocks)} train, {len(val_blocks.blocks)} validation; "
            f"{train_blocks.dropped_tokens + val_blocks.dropped_tokens} tail tokens dropped",
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
        ]), flush=True)

    as_dicts = lambda blocks: [{"input_ids": ids, "labels": ids} for ids in blocks.blocks]  # noqa: E731
    args = transformers.TrainingArguments(
        output_dir=output_dir,
        **shared_training_arguments(
            micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            num_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
            dtype=dtype, autocast_bf16=precision_plan.autocast_bf16,
            gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps,
            save_steps=save_steps, save_total_limit=save_total_limit, report_to=report_to,
            wandb_run_name=wandb_run_name, seed=seed, validation=bool(val_blocks.blocks), eval_steps=eval_steps),
        remove_unused_columns=False,
        prediction_loss_only=True,
    )
    trainer = LabelOnlyLossTrainer(
        model=model,
        args=args,
        train_dataset=as_dicts(train_blocks),
        eval_dataset=as_dicts(val_blocks) or None,
        data_collator=PaddedCollator(tokenizer.pad_token_id),  # blocks are all block_size long: no padding
    )
    model.config.use_cache = False
    perplexity_before = perplexity(trainer) if val_blocks.blocks else None
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    perplexity_after = perplexity(trainer) if val_blocks.blocks else None

    # ---- save ----------------------------------------------------------------------------------------------
    if trainer.is_world_process_zero():
        settings.update(stage="pretrain", base_model=base_model, resolved_base_model=model_path,
                        prompt_template_name=None,  # plain text: the SFT stage picks the chat template
                        lora_target_modules=targets, dtype=str(dtype).replace("torch.", ""), world_size=world_size,
                        gradient_accumulation_steps=gradient_accumulation_steps,
                        validation_perplexity_before=perplexity_before, validation_perplexity_after=perplexity_after)
        save_trained_model(model, tokenizer, output_dir, settings, trainer.state.log_history)
        tokens = len(train_blocks.blocks) * block_size * result.metrics.get("epoch", num_epochs)
        ppl = (f"; validation perplexity {perplexity_before:.2f} -> {perplexity_after:.2f}"
               if perplexity_before is not None else "")
        print(f"done in {time.time() - started:.0f}s: {result.global_step} steps, "
              f"{training_loss_change(trainer.state.log_history)}{ppl}, ~{tokens / max(result.metrics['train_runtime'], 1e-9):.0f} tokens/s; "
              f"{'adapter' if use_lora else 'model'} in {output_dir}")
    return trainer


def perplexity(trainer) -> float:
    """exp of the mean next-token loss on the validation blocks."""
    return math.exp(min(trainer.evaluate()["eval_loss"], 50.0))


if __name__ == "__main__":
    cli.run(pretrain)
