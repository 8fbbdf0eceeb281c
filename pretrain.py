r"""Continued pretraining (PT) of a causal LM on plain medical text, with LoRA, QLoRA or full weights.

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

from medlora import cli
from medlora.errors import MedLoRAError
from medlora.flag_groups import CHECKPOINTS, DATA, HYGIENE, LORA, MODEL, SPEED, TRAINING
from medlora.flags import FlagGroup, stage_flags
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "pretrain")
logger = logging.getLogger("pretrain")


@stage_flags(
    MODEL.without("lora_weights", "prompt_template_name"),
    DATA.but(data_path=DEFAULT_DATA, output_dir="./pt-medlora").without("field_map"),
    FlagGroup("text", text_field="text", block_size=512, use_lora=True),
    HYGIENE,
    TRAINING.but(learning_rate=2e-4, warmup_steps=10).without("cutoff_len"),
    SPEED,
    LORA,
    CHECKPOINTS,
)
def pretrain(flags):
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
    from medlora.training import distributed
    from medlora.training.stage import TrainingStage

    stage = TrainingStage("pretrain", flags)
    data_description, hygiene, model_path, train_blocks, val_blocks = distributed.run_once_and_share(
        lambda: prepare_data(flags, stage))
    model, tokenizer, targets = build_model(flags, stage, model_path)
    if stage.is_main:
        print_data_summary(flags, data_description, hygiene, train_blocks, val_blocks, model)
    trainer = build_trainer(flags, stage, model, tokenizer, train_blocks, val_blocks)
    perplexity_before = perplexity(trainer) if val_blocks.blocks else None
    result = trainer.train(resume_from_checkpoint=stage.resume_from_checkpoint)
    perplexity_after = perplexity(trainer) if val_blocks.blocks else None

    if stage.save(model, tokenizer, trainer, resolved_base_model=model_path,
                  prompt_template_name=None,  # plain text: the SFT stage picks the chat template
                  lora_target_modules=targets, validation_perplexity_before=perplexity_before,
                  validation_perplexity_after=perplexity_after):
        tokens = len(train_blocks.blocks) * flags.block_size * result.metrics.get("epoch", flags.num_epochs)
        ppl = (f"; validation perplexity {perplexity_before:.2f} -> {perplexity_after:.2f}"
               if perplexity_before is not None else "")
        stage.done(trainer, result, f"{ppl}, ~{tokens / max(result.metrics['train_runtime'], 1e-9):.0f} tokens/s; "
                                    f"{'adapter' if flags.use_lora else 'model'} in {flags.output_dir}")
    return trainer


def prepare_data(flags, stage) -> tuple:
    """Every document read, checked (duplicates, evaluation questions, personal identifiers), split, tokenized
    and cut into blocks (on rank 0), before the model loads."""
    from medlora.data.hygiene import clean_documents
    from medlora.data.pretraining import (
        group_into_blocks,
        load_documents,
        tokenize_documents,
    )
    from medlora.data.splits import split_validation

    loaded = load_documents(flags.data_path, flags.text_field, flags.skip_bad_records)
    documents, hygiene = clean_documents(loaded.documents, loaded.sources, flags)
    train_documents, val_documents = split_validation(documents, flags.val_set_size, flags.seed,
                                                      "documents")
    model_path, tokenizer = stage.data_tokenizer()
    train_blocks = group_into_blocks(tokenize_documents(tokenizer, train_documents), flags.block_size)
    if not train_blocks.blocks:
        raise MedLoRAError(f"{flags.data_path}: the training documents hold {train_blocks.tokens} tokens, less than "
                           f"one block of --block_size {flags.block_size}; lower --block_size")
    val_tokens = tokenize_documents(tokenizer, val_documents)
    val_blocks = group_into_blocks(val_tokens, flags.block_size)
    if val_documents and not val_blocks.blocks:
        # A small held-out split (the bundled notes) still gets a perplexity: one shorter block of all of it.
        val_blocks = group_into_blocks(val_tokens, val_blocks.tokens)
        logger.info("validation: the %d held-out documents hold %d tokens, less than --block_size %d: evaluated as "
                    "one block of %d tokens", len(val_documents), val_blocks.tokens, flags.block_size,
                    val_blocks.tokens)
    return loaded.describe(), hygiene, model_path, train_blocks, val_blocks


def build_model(flags, stage, model_path) -> tuple:
    """(model, tokenizer, LoRA targets): the base with a fresh adapter, or every weight with --use_lora False."""
    from medlora.models.loading import (
        resolve_lora_targets,
        trainable_parameters_to_fp32,
    )

    model, tokenizer = stage.load_model(model_path)
    targets = None
    if flags.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = resolve_lora_targets(model, flags.lora_target_modules)
        model = get_peft_model(model, LoraConfig(r=flags.lora_r, lora_alpha=flags.lora_alpha,
                                                 lora_dropout=flags.lora_dropout, target_modules=targets, bias="none",
                                                 task_type="CAUSAL_LM"))
    trainable_parameters_to_fp32(model)
    model.config.use_cache = False
    return model, tokenizer, targets


def build_trainer(flags, stage, model, tokenizer, train_blocks, val_blocks):
    """The label-only-loss Trainer on whole blocks (labels = input_ids: every token trained)."""
    import transformers

    from medlora.training.collators import PaddedCollator
    from medlora.training.trainer import LabelOnlyLossTrainer

    as_dicts = lambda blocks: [{"input_ids": ids, "labels": ids} for ids in blocks.blocks]  # noqa: E731
    args = stage.training_arguments(transformers.TrainingArguments, validation=bool(val_blocks.blocks),
                                    train_examples=len(train_blocks.blocks), remove_unused_columns=False,
                                    prediction_loss_only=True)
    return LabelOnlyLossTrainer(model=model, args=args, train_dataset=as_dicts(train_blocks),
                                eval_dataset=as_dicts(val_blocks) or None,
                                data_collator=PaddedCollator(tokenizer.pad_token_id),  # equal-length blocks: no padding
                                compile_layers=flags.torch_compile)


def print_data_summary(flags, data_description, hygiene, train_blocks, val_blocks, model):
    from medlora.data.records import usage_lines
    from medlora.models.loading import count_parameters

    trainable, total = count_parameters(model)
    print("\n".join([
        f"data: {data_description}",
        *usage_lines("documents", hygiene.checked, train_blocks.documents, val_blocks.documents, hygiene.dropped, []),
        *hygiene.lines(),
        f"tokens with EOS: {train_blocks.tokens + val_blocks.tokens}",
        f"blocks of {flags.block_size} tokens: {len(train_blocks.blocks)} train, {len(val_blocks.blocks)} validation; "
        f"{train_blocks.dropped_tokens + val_blocks.dropped_tokens} tail tokens dropped",
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)",
    ]), flush=True)


def perplexity(trainer) -> float:
    """exp of the mean next-token loss on the validation blocks."""
    return math.exp(min(trainer.evaluate()["eval_loss"], 50.0))


if __name__ == "__main__":
    cli.run(pretrain)
