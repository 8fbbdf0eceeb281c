"""Train a pairwise reward model (RM) on preference pairs with LoRA or QLoRA, on TRL's RewardTrainer.

    python reward.py                                      # offline: built-in tiny model, data/preference/
    python reward.py --base_model ./hf_ckpt --data_path ../shared/datasets/medicalgpt/dpo_zh_500.jsonl \
        --output_dir ./rm-medlora --prompt_template_name alpaca
    python reward.py --base_model Qwen/Qwen2.5-1.5B-Instruct --prompt_template_name chatml --load_in_4bit
    torchrun --nproc_per_node=4 reward.py --base_model ... --data_path ... --output_dir ...
    python reward.py --help                               # every flag

The model is the base with a one-output score head (AutoModelForSequenceClassification,
num_labels=1), a LoRA adapter and a fully trained head; it learns r(chosen) > r(rejected) with the
pairwise loss -log sigmoid(r_chosen - r_rejected). Data and validation are those of dpo.py; each
reply is rendered with --prompt_template_name and tokenized exactly as finetune.py does, and scored
at its last token (EOS). Pairwise accuracy on the validation pairs (or the training pairs when there
are none) is reported before and after training. The output folder (adapter with the head,
tokenizer, medlora_run.json) is what `rl.py --reward_model OUTPUT_DIR` loads.
"""

import logging
import time

from medlora import cli
from medlora.data.records import usage_lines
from medlora.data.templates import PromptTemplate
from medlora.errors import MedLoRAError
from medlora.models.builtin import DEFAULT_BASE_MODEL, default_template_for
from medlora.paths import DATA_DIR

DEFAULT_DATA = str(DATA_DIR / "preference")
SCORE_HEAD_NAMES = ("score", "classifier")  # what transformers calls the head of *ForSequenceClassification
logger = logging.getLogger("reward")


def train(
    # model and data
    base_model: str = DEFAULT_BASE_MODEL,
    data_path: str = DEFAULT_DATA,
    output_dir: str = "./rm-medlora",
    field_map: str = "",
    skip_bad_records: bool = False,
    prompt_template_name: str = "",
    # training hyperparameters
    batch_size: int = 16,
    micro_batch_size: int = 4,
    num_epochs: int = 1,
    max_steps: int = -1,
    learning_rate: float = 1e-4,
    warmup_steps: int = 10,
    cutoff_len: int = 512,
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
    eval_steps: int = 100,
    save_steps: int = 100,
    save_total_limit: int = 3,
    report_to: str = "none",
    wandb_project: str = "",
    wandb_run_name: str = "",
    resume_from_checkpoint: str | bool | None = None,
):
    """Train a reward model on the preference pairs in DATA_PATH and save it to OUTPUT_DIR.

    Returns the trainer when called from Python.

    Args:
        base_model: Hub id or local folder of a causal LM (often the merged SFT model). The default is the built-in SmolLM2-135M-Instruct (builtin:tiny-llama: a random toy for tests).
        data_path: A .json/.jsonl/.csv/.parquet file of preference pairs, a folder of them, or a hub dataset name.
        output_dir: Where the reward adapter (with its score head), tokenizer, medlora_run.json and checkpoints go.
        field_map: JSON mapping our field names to your columns, e.g. '{"prompt": "question", "chosen": "good"}'.
        skip_bad_records: Drop invalid pairs (listed and counted by reason in the summary) instead of stopping with a list of them.
        prompt_template_name: A template in templates/, or a path to a template .json; use the policy's template. Default: a built-in model's own, else alpaca.
        batch_size: Pairs per optimizer step, all processes together.
        micro_batch_size: Pairs per forward pass on one device; accumulation makes up the rest.
        num_epochs: Passes over the training pairs.
        cutoff_len: Maximum tokens of prompt + reply; longer replies are cut, pairs whose prompt fills it are dropped.
        val_set_size: Pairs held out for validation: a count, or a fraction when below 1; 0 for none.
        seed: Seed for the split, the shuffling, the score head and LoRA initialisation.
        logging_steps: Log the loss, accuracy and margin every this many optimizer steps.
        eval_steps: Evaluate on the validation pairs every this many optimizer steps.
    """
    settings = dict(locals())  # the flags as given, saved in medlora_run.json
    # Imported here, not at the top, so that --help answers without loading torch and transformers.
    import torch

    from medlora.data.preference import encode_pairs, load_preference_pairs
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
    from medlora.training.saving import save_trained_model
    from medlora.training.trainer import (
        MarkCompleteCheckpoints,
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
    report_to = resolve_report_to(report_to, wandb_project)
    resume_from_checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)

    # ---- data: every pair validated and tokenized once (on rank 0), before any model is loaded -------------
    def prepare_data():
        template = PromptTemplate.load(prompt_template_name or default_template_for(base_model))
        loaded = load_preference_pairs(data_path, field_map, skip_bad_records)
        pairs = loaded.pairs
        training_pairs, held_out_pairs = split_validation(pairs, val_set_size, seed, "pairs")
        model_path = resolve_base_model(base_model)
        tokenizer = load_tokenizer(model_path, trust_remote_code)
        train_pairs = encode_pairs(tokenizer, template, training_pairs, cutoff_len)
        val_pairs = encode_pairs(tokenizer, template, held_out_pairs, cutoff_len)
        if not train_pairs.examples:
            raise MedLoRAError(f"{data_path}: no training pair is left after truncation at --cutoff_len {cutoff_len}")
        skipped = (loaded.skipped, loaded.skipped_records)
        return template, loaded.describe(), len(pairs), skipped, train_pairs, val_pairs, model_path

    template, data_description, pairs_read, skipped, train_pairs, val_pairs, model_path = (
        distributed.run_once_and_share(prepare_data))

    # ---- model ---------------------------------------------------------------------------------------------
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    transformers.set_seed(seed)  # the score head starts random
    precision_plan = resolve_precision(precision)
    dtype = precision_plan.weights
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    with suppress_seqcls_warning():  # "lm_head unused, score head new" is expected here, not worth a warning
        model = load_base_model(model_path, dtype, load_in_4bit, load_in_8bit, trust_remote_code,
                                auto_class=AutoModelForSequenceClassification, num_labels=1)
    fit_embeddings_to_tokenizer(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    if load_in_4bit or load_in_8bit:
        model = prepare_quantized_for_training(model, gradient_checkpointing)
    head = [name for name in SCORE_HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
    if not head:
        raise MedLoRAError(f"{model_path}: the {type(model).__name__} score head is not named "
                           f"{' or '.join(SCORE_HEAD_NAMES)}; this architecture is not supported as a reward model")
    targets = resolve_lora_targets(model, lora_target_modules)
    if isinstance(targets, list):
        targets = [name for name in targets if name not in head]
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules=targets, bias="none", task_type="SEQ_CLS",
                                             modules_to_save=head))
    trainable_parameters_to_fp32(model)
    trainable, total = count_parameters(model)
    if is_main:
        reasons, skipped_records = skipped
        dropped = reasons + train_pairs.dropped + val_pairs.dropped
        print("\n".join([
            f"data: {data_description}",
            *usage_lines("pairs", pairs_read + sum(reasons.values()), len(train_pairs.examples),
                         len(val_pairs.examples), dropped, skipped_records),
            f"template: {template.name}; truncated at cutoff_len={cutoff_len}: "
            f"{train_pairs.truncated + val_pairs.truncated} pairs",
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), "
            f"score head '{head[0]}' trained in full",
        ]), flush=True)

    as_dataset = lambda encoded: Dataset.from_dict(  # noqa: E731
        {"chosen_ids": encoded.sequences("chosen"), "rejected_ids": encoded.sequences("rejected")})
    train_dataset = as_dataset(train_pairs)
    val_dataset = as_dataset(val_pairs) if val_pairs.examples else None
    args = RewardConfig(
        output_dir=output_dir,
        **shared_training_arguments(
            micro_batch_size=micro_batch_size, gradient_accumulation_steps=gradient_accumulation_steps,
            num_epochs=num_epochs, max_steps=max_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
            dtype=dtype, autocast_bf16=precision_plan.autocast_bf16,
            gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps,
            save_steps=save_steps, save_total_limit=save_total_limit, report_to=report_to,
            wandb_run_name=wandb_run_name, seed=seed, validation=val_dataset is not None, eval_steps=eval_steps),
        max_length=None,  # pairs are already cut at --cutoff_len
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=val_dataset,
                            processing_class=tokenizer, callbacks=[MarkCompleteCheckpoints()])
    trainable_parameters_to_fp32(trainer.model)  # TRL casts QLoRA adapters (and the head) to bf16; keep fp32
    measured_on = "validation" if val_dataset is not None else "training"
    before = trainer.evaluate(val_dataset or train_dataset)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    after = trainer.evaluate(val_dataset or train_dataset)

    # ---- save ----------------------------------------------------------------------------------------------
    if trainer.is_world_process_zero():
        metrics = {key: {"before": before[f"eval_{key}"], "after": after[f"eval_{key}"]}
                   for key in ("loss", "accuracy", "margin")}
        settings.update(stage="reward", base_model=base_model, resolved_base_model=model_path,
                        prompt_template_name=template.name, lora_target_modules=targets, score_head=head[0],
                        dtype=str(dtype).replace("torch.", ""), world_size=world_size,
                        gradient_accumulation_steps=gradient_accumulation_steps,
                        pairwise_metrics={"measured_on": measured_on, **metrics})
        save_trained_model(trainer.model, tokenizer, output_dir, settings, trainer.state.log_history)
        print(f"done in {time.time() - started:.0f}s: {result.global_step} steps, "
              f"{training_loss_change(trainer.state.log_history)}; on the {measured_on} pairs, pairwise accuracy "
              f"{metrics['accuracy']['before']:.3f} -> {metrics['accuracy']['after']:.3f}, margin "
              f"{metrics['margin']['before']:.4f} -> {metrics['margin']['after']:.4f}; reward model in {output_dir}")
    return trainer


if __name__ == "__main__":
    cli.run(train)
